"""RL Zoo integration (sb3_dreamer.zoo): registration, packaged hyperparameters, the launcher end to end, Optuna storages.

End-to-end tests run ``python -m sb3_dreamer.zoo ...`` in subprocesses with tiny models and budgets of a few hundred
steps. The PostgreSQL test starts its own server from the Debian binaries and skips when they are absent.
"""

import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from glob import glob
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch as th
import yaml
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.save_util import load_from_pkl

from sb3_dreamer import DreamerV2, zoo

TESTS_DIR = Path(__file__).resolve().parent
SIZES = "deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_layers=1, mlp_units=32, cnn_depth=4"
TINY = [f"policy_kwargs:dict({SIZES})", "learning_starts:100", "batch_size:4", "sequence_length:8", "buffer_size:2000"]
TINY_MINATAR = [f"policy_kwargs:dict({SIZES}, image_dist='binary')", *TINY[1:]]
FAST = ["--num-threads", "1", "--seed", "0"]


def run_zoo(*args: str, cwd: Path, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """Run the launcher in a subprocess; on failure show its output."""
    python_path = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])  # for the test callback
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": python_path}
    proc = subprocess.run(
        [sys.executable, "-m", "sb3_dreamer.zoo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


def optimize_args(storage: str, study: str, n_trials: int = 2, pruner: str = "median") -> list[str]:
    return [
        "-optimize", "--n-trials", str(n_trials), "--n-jobs", "1", "--sampler", "tpe", "--pruner", pruner,
        "--n-evaluations", "2", "--n-startup-trials", "1", "--no-optim-plots", "--eval-episodes", "1",
        "--storage", storage, "--study-name", study,
    ]  # fmt: skip


class PoisonRewardHeadOnce(BaseCallback):
    """Used through ``-params callback:...`` by the divergence test: before the first training phase of the first trial
    (the zoo builds one instance per trial), fill the reward head's weights with NaN. Collection does not use that
    head, so the NaN first shows up in the world-model loss, where DreamerV2 must raise its ValueError."""

    fired = False

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if not PoisonRewardHeadOnce.fired and self.model.num_timesteps >= self.model.learning_starts:
            PoisonRewardHeadOnce.fired = True
            with th.no_grad():
                for param in self.model.policy.world_model.reward_head.parameters():
                    param.fill_(float("nan"))


# --------------------------------------------------------------------------------------------------------------------
# In-process: registration, default config, sampler/converter, packaged files


def test_register_is_idempotent_and_in_place():
    import gymnasium as gym
    from rl_zoo3 import ALGOS, exp_manager, hyperparams_opt, train

    from sb3_dreamer import DreamerV2

    zoo.register()
    zoo.register()
    assert ALGOS["dreamerv2"] is DreamerV2 and train.ALGOS is ALGOS
    assert exp_manager.HYPERPARAMS_SAMPLER["dreamerv2"] is zoo.sample_dreamerv2_params
    assert hyperparams_opt.HYPERPARAMS_CONVERTER["dreamerv2"] is zoo.convert_dreamerv2_params
    assert all(env_id in gym.registry for env_id in ("MinAtar/Breakout-v1", "MinAtar/SpaceInvaders-v1"))


def test_default_conf_file():
    ours = zoo.HYPERPARAMS_DIR
    assert zoo._default_conf_file(["--algo", "dreamerv2", "--env", "CartPole-v1"]) == str(ours / "dreamerv2.yml")
    assert zoo._default_conf_file(["--algo", "dreamerv2", "-conf", "x.yml"]) is None
    assert zoo._default_conf_file(["--algo=dreamerv2", "--conf-file=x.yml"]) is None
    assert zoo._default_conf_file(["--algo", "dqn", "--env", "MinAtar/Breakout-v1"]) == str(ours / "dqn.yml")
    assert zoo._default_conf_file(["--algo", "dqn", "--env", "CartPole-v1"]) is None  # the zoo's tuned entry
    assert zoo._default_conf_file(["--algo", "ppo", "--env", "CartPole-v1"]) is None


def test_packaged_hyperparams():
    files = {path.name for path in zoo.HYPERPARAMS_DIR.glob("*.yml")}
    assert {"dreamerv2.yml", "dqn.yml"} <= files
    dreamer = yaml.safe_load((zoo.HYPERPARAMS_DIR / "dreamerv2.yml").read_text())
    minatar = [f"MinAtar/{game}-v1" for game in ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")]
    default_entropy_coef = inspect.signature(DreamerV2).parameters["actor_entropy_coef"].default  # what unset keys get
    assert {"CartPole-v1", "Pendulum-v1", "atari", "default", *minatar} <= set(dreamer)
    for env_id in minatar:
        assert dreamer[env_id]["policy"] == "CnnPolicy" and "image_dist='binary'" in dreamer[env_id]["policy_kwargs"]
        entry = dreamer[env_id]
        assert (entry["batch_size"], entry["sequence_length"], entry["train_freq"]) == (16, 32, 8)
        # Breakout's actor collapses to NOOP at the default η = 1e-3; Freeway's stays uniform at 1e-2 (docs/results.md)
        assert entry.get("actor_entropy_coef", default_entropy_coef) == (1e-2 if "Breakout" in env_id else 1e-3)
    atari = dreamer["atari"]
    assert "frame_stack" not in atari and atari["env_kwargs"]["frameskip"] == 1
    assert (atari["kl_scale"], atari["discount_scale"], atari["gamma"], atari["reward_transform"]) == (0.1, 5.0, 0.999, "tanh")
    assert (atari["learning_rate"], atari["actor_lr"], atari["critic_lr"]) == (2e-4, 4e-5, 1e-4)
    assert (atari["batch_size"], atari["sequence_length"], atari["train_freq"]) == (16, 50, 16)
    assert (atari["learning_starts"], atari["buffer_size"], atari["actor_entropy_coef"]) == (50000, 2e6, 1e-3)
    assert set(yaml.safe_load((zoo.HYPERPARAMS_DIR / "dqn.yml").read_text())) == set(minatar)


def test_sampler_keeps_configured_policy_kwargs():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    class ExperimentManager:  # stands in for rl_zoo3's: the sampler reads the caller's configured policy_kwargs
        _hyperparams = {"policy_kwargs": {"image_dist": "binary", "deter_size": 32}}

        def objective(self, trial):
            return zoo.sample_dreamerv2_params(trial, 0, 1, {})

        def read_hyperparameters(self, params):
            hyperparams = {"policy_kwargs": "dict(preset='small', image_dist='binary')"}  # noqa: F841 (read by the converter)
            return zoo.convert_dreamerv2_params(params)

    manager = ExperimentManager()
    kwargs = manager.objective(study.ask())
    assert kwargs["kl_scale"] in zoo.KL_SCALES and kwargs["actor_entropy_coef"] in zoo.ENTROPY_COEFS
    assert kwargs["exploration_noise"] in zoo.EXPLORATION_NOISES
    assert kwargs["gamma"] in zoo.GAMMAS and isinstance(kwargs["train_freq"], int)
    assert 3e-5 <= kwargs["learning_rate"] <= 1e-3
    assert kwargs["policy_kwargs"]["image_dist"] == "binary" and kwargs["policy_kwargs"]["deter_size"] == 32
    assert kwargs["policy_kwargs"]["preset"] in zoo.PRESETS
    converted = manager.read_hyperparameters({"kl_scale": 0.3, "preset": "medium"})
    assert eval(converted["policy_kwargs"]) == {"preset": "medium", "image_dist": "binary"}
    assert zoo.convert_dreamerv2_params({"preset": "small"})["policy_kwargs"] == {"preset": "small"}  # no zoo caller


def test_main_usage():
    with pytest.raises(SystemExit):
        zoo.main(["not-a-script"])


# --------------------------------------------------------------------------------------------------------------------
# The launcher end to end


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    """One CartPole training run with evaluation and a saved replay buffer, shared by the tests below."""
    cwd = tmp_path_factory.mktemp("cartpole")
    start = time.time()
    proc = run_zoo(
        "train", "--algo", "dreamerv2", "--env", "CartPole-v1", "-n", "400", "-f", "logs", "--eval-freq", "200",
        "--eval-episodes", "2", "--save-replay-buffer", *FAST, "-params", *TINY, cwd=cwd,
    )  # fmt: skip
    print(f"cartpole train: {time.time() - start:.1f}s")
    return cwd, proc


def test_train_cartpole(cartpole_run):
    cwd, proc = cartpole_run
    assert str(zoo.HYPERPARAMS_DIR / "dreamerv2.yml") in proc.stdout  # the packaged file was supplied
    run_dir = cwd / "logs" / "dreamerv2" / "CartPole-v1_1"
    for name in ("CartPole-v1.zip", "best_model.zip", "evaluations.npz", "replay_buffer.pkl", "CartPole-v1/config.yml"):
        assert (run_dir / name).is_file(), name
    assert len(np.load(run_dir / "evaluations.npz")["timesteps"]) == 2


def test_resume_with_replay_buffer(cartpole_run):
    cwd, _ = cartpole_run
    run_dir = cwd / "logs" / "dreamerv2" / "CartPole-v1_1"
    saved = load_from_pkl(run_dir / "replay_buffer.pkl").size()
    assert saved >= 400
    proc = run_zoo(
        "train", "--algo", "dreamerv2", "--env", "CartPole-v1", "-n", "100", "-f", "logs", "--eval-freq", "-1",
        "--save-replay-buffer", "-i", str(run_dir / "CartPole-v1.zip"), *FAST, "-params", *TINY[1:], cwd=cwd,
    )  # fmt: skip
    assert "Loading pretrained agent" in proc.stdout and "Loading replay buffer" in proc.stdout
    resumed = load_from_pkl(cwd / "logs" / "dreamerv2" / "CartPole-v1_2" / "replay_buffer.pkl").size()
    assert resumed >= saved + 100  # the old transitions were reloaded, the new ones appended


def test_enjoy_load_best_and_plots(cartpole_run):
    cwd, _ = cartpole_run
    proc = run_zoo(
        "enjoy", "--algo", "dreamerv2", "--env", "CartPole-v1", "-f", "logs", "--exp-id", "1", "--load-best",
        "--no-render", "-n", "100", "--deterministic", cwd=cwd,
    )  # fmt: skip
    assert "best_model.zip" in proc.stdout
    run_zoo("all_plots", "-a", "dreamerv2", "-e", "CartPole", "-f", "logs", "--no-display", "-o", "curves", cwd=cwd)
    assert (cwd / "curves.pkl").is_file()


def test_train_minatar(tmp_path):
    run_zoo(
        "train", "--algo", "dreamerv2", "--env", "MinAtar/Breakout-v1", "-n", "300", "-f", "logs", "--eval-freq", "150",
        "--eval-episodes", "1", *FAST, "-params", *TINY_MINATAR, cwd=tmp_path,
    )  # fmt: skip
    run_dir = tmp_path / "logs" / "dreamerv2" / "MinAtar-Breakout-v1_1"
    assert (run_dir / "evaluations.npz").is_file() and (run_dir / "MinAtar-Breakout-v1.zip").is_file()


def test_dqn_minatar(tmp_path):
    from stable_baselines3 import DQN

    from sb3_dreamer.baselines import MinAtarCNN

    proc = run_zoo(
        "train", "--algo", "dqn", "--env", "MinAtar/Breakout-v1", "-n", "300", "-f", "logs", "--eval-freq", "-1", *FAST,
        "-params", "learning_starts:100", "buffer_size:1000", cwd=tmp_path,
    )  # fmt: skip
    assert str(zoo.HYPERPARAMS_DIR / "dqn.yml") in proc.stdout
    model = DQN.load(tmp_path / "logs" / "dqn" / "MinAtar-Breakout-v1_1" / "MinAtar-Breakout-v1.zip")
    assert isinstance(model.q_net.features_extractor, MinAtarCNN)
    assert isinstance(model.policy.optimizer, th.optim.RMSprop) and model.policy.optimizer.defaults["centered"]


def test_optimize_sqlite_and_trial_id(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = ["--algo", "dreamerv2", "--env", "CartPole-v1", "-f", "logs", *FAST]
    run_zoo("train", *common, "-n", "200", *optimize_args(storage, "s"), "-params", *TINY, cwd=tmp_path)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert len(trials) == 2 and {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert glob(str(tmp_path / "logs" / "dreamerv2" / "report_CartPole-v1_2-trials-200-*.csv"))
    # --trial-id (1: the zoo ignores 0) retrains with the trial's params, mapped by HYPERPARAMS_CONVERTER
    proc = run_zoo("train", *common, "-n", "100", "--storage", storage, "--study-name", "s", "--trial-id", "1",
                   "--eval-freq", "-1", "-params", *TINY, cwd=tmp_path)  # fmt: skip
    assert "Loading from Optuna study" in proc.stdout
    config_path = glob(str(tmp_path / "logs" / "dreamerv2" / "CartPole-v1_*" / "CartPole-v1" / "config.yml"))[-1]
    config = dict(yaml.load(Path(config_path).read_text(), Loader=yaml.UnsafeLoader))
    assert config["kl_scale"] == trials[1].params["kl_scale"] and config["train_freq"] == trials[1].params["train_freq"]


def test_optimize_journal_prunes_diverging_trial(tmp_path):
    """Journal-file storage; the first trial diverges (NaN loss -> ValueError -> pruned) and the study goes on."""
    storage = str(tmp_path / "study.log")
    proc = run_zoo(
        "train", "--algo", "dreamerv2", "--env", "CartPole-v1", "-n", "200", "-f", "logs", *FAST,
        *optimize_args(storage, "nan", pruner="none"), "-params", *TINY, "callback:'test_zoo.PoisonRewardHeadOnce'",
        cwd=tmp_path,
    )  # fmt: skip
    assert "DreamerV2 diverged" in proc.stdout
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    states = [t.state for t in optuna.load_study(study_name="nan", storage=journal).trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]


@pytest.mark.skipif(shutil.which("ffmpeg") is None and not __import__("importlib").util.find_spec("moviepy"),
                    reason="record_video needs moviepy (with imageio-ffmpeg) or ffmpeg")  # fmt: skip
def test_atari_train_and_record_video(tmp_path):
    """The atari block (DreamerAtariWrapper on a v5 id) trains, and record_video renders it (ALE renders natively;
    CartPole needs pygame and MinAtar needs seaborn to render)."""
    run_zoo(
        "train", "--algo", "dreamerv2", "--env", "ALE/Pong-v5", "-n", "150", "-f", "logs", "--eval-freq", "-1", *FAST,
        "-params", f"policy_kwargs:dict(preset='atari', {SIZES})", *TINY[1:], cwd=tmp_path,
    )  # fmt: skip
    run_zoo("record_video", "--algo", "dreamerv2", "--env", "ALE/Pong-v5", "-f", "logs", "-n", "30", cwd=tmp_path)
    assert glob(str(tmp_path / "logs" / "dreamerv2" / "ALE-Pong-v5_1" / "videos" / "*.mp4"))


# --------------------------------------------------------------------------------------------------------------------
# Multi-worker tuning


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_workers(cwd: Path, storage: str, study: str, n: int, extra: list[str], steps: str = "200") -> list[subprocess.Popen]:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    args = [
        sys.executable, "-m", "sb3_dreamer.zoo", "train", "--algo", "dreamerv2", "--env", "CartPole-v1", "-n", steps,
        "-f", "logs", *FAST, *optimize_args(storage, study), *extra, "-params", *TINY,
    ]  # fmt: skip
    workers = []
    for _ in range(n):
        workers.append(subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(1.0)
    return workers


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server (Debian's binaries) on 127.0.0.1 with an empty database ``optuna``."""
    bin_dirs = sorted(glob("/usr/lib/postgresql/*/bin"))
    if not bin_dirs or not Path(bin_dirs[-1], "initdb").exists():
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    pytest.importorskip("psycopg2")
    bin_dir = Path(bin_dirs[-1])
    root = Path(tempfile.mkdtemp(prefix="sb3_dreamer_pg_"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    try:
        subprocess.run([*as_user, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True)  # fmt: skip
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run([*as_user, bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", root / "log", "-w", "start"],
                       check=True, capture_output=True)  # fmt: skip
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE optuna")
        connection.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"  # SQLAlchemy 2.1 defaults to psycopg 3
    finally:
        subprocess.run([*as_user, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.postgres
def test_two_workers_postgres(tmp_path, postgres_url):
    optuna.create_study(study_name="s", storage=postgres_url, direction="maximize")  # once, before the workers
    workers = start_workers(tmp_path, postgres_url, "s", 2, ["--max-total-trials", "4"], steps="150")
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-6000:]
    trials = optuna.load_study(study_name="s", storage=postgres_url).trials
    # The cap is checked after each trial and is not atomic with the start of the next one (rl-zoo3's
    # MaxTrialsCallback), so two workers finishing at the same moment can each start one: at most workers - 1 extra.
    assert sorted(t.number for t in trials) in ([0, 1, 2, 3], [0, 1, 2, 3, 4])
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert all("Trial" in output for output in outputs)  # both workers ran trials


@pytest.mark.slow
def test_heartbeat_fails_and_retries_killed_worker_trial(tmp_path):
    """With --heartbeat-interval, the trial of a SIGKILLed worker is marked FAIL and re-run by the next worker."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    heartbeat = ["--heartbeat-interval", "1", "--grace-period", "2"]
    optuna.create_study(study_name="hb", storage=storage, direction="maximize")
    (doomed,) = start_workers(tmp_path, storage, "hb", 1, [*heartbeat, "--max-total-trials", "2"], steps="100000")
    deadline = time.time() + 120
    while not optuna.load_study(study_name="hb", storage=storage).trials and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    assert [t.state for t in optuna.load_study(study_name="hb", storage=storage).trials] == [optuna.trial.TrialState.RUNNING]
    time.sleep(3.0)  # past the grace period
    (worker,) = start_workers(tmp_path, storage, "hb", 1, [*heartbeat, "--max-total-trials", "2"])
    output = worker.communicate(timeout=300)[0]
    assert worker.returncode == 0, output[-6000:]
    trials = optuna.load_study(study_name="hb", storage=storage).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params == trials[0].params
