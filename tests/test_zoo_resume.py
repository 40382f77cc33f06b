"""Resumable zoo runs (sb3_dreamer.zoo_resume): rolling atomic checkpoints, ``train --resume``, and the learning
harness pausing and continuing a job."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.save_util import load_from_pkl
from stable_baselines3.common.vec_env import DummyVecEnv
from test_zoo import FAST, TESTS_DIR, TINY, run_zoo

from sb3_dreamer import DreamerV2
from sb3_dreamer.zoo_resume import (
    PAUSE_SIGNAL,
    RollingCheckpointCallback,
    checkpoint_files,
    find_resume_point,
    latest_run_dir,
    list_checkpoints,
    restore_evaluations,
    resumable_experiment_manager,
)

ROOT = TESTS_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import learning  # noqa: E402

CRASH_MARKER = "SB3_DREAMER_TEST_CRASH_MARKER"


class CrashOnceAtStep(BaseCallback):
    """Used through ``-params callback:...``: kill the training process at step 250 (as a crash or a killed session
    would), once: the marker file named by $SB3_DREAMER_TEST_CRASH_MARKER records that it happened."""

    def _on_step(self) -> bool:
        marker = Path(os.environ[CRASH_MARKER])
        if self.num_timesteps == 250 and not marker.exists():
            marker.write_text("crashed")
            os._exit(3)
        return True


def cartpole_dqn(**kwargs) -> DQN:
    return DQN("MlpPolicy", "CartPole-v1", learning_starts=20, buffer_size=1000, policy_kwargs=dict(net_arch=[8]),
               seed=0, **kwargs)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# In-process: the checkpoint files, the callback, the evaluation history


def test_rolling_checkpoints_keep_the_newest_complete_ones(tmp_path):
    model = cartpole_dqn()
    model.learn(220, callback=RollingCheckpointCallback(50, str(tmp_path), keep=2))
    # every 50 steps and at the end of training (220); the two newest kept, each model with its replay buffer
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rl_model_200_steps.zip", "rl_model_220_steps.zip",
        "rl_model_replay_buffer_200_steps.pkl", "rl_model_replay_buffer_220_steps.pkl",
    ]  # fmt: skip  (no temporary files left, no VecNormalize file without VecNormalize)
    assert find_resume_point(tmp_path, require_buffer=True) is None  # a run folder's checkpoints are in checkpoints/
    (point,) = list_checkpoints(tmp_path, require_buffer=True)[-1:]
    assert point.steps == 220 and DQN.load(point.model).num_timesteps == 220
    assert load_from_pkl(point.replay_buffer).size() == 220
    with pytest.raises(ValueError, match="keep"):
        RollingCheckpointCallback(50, str(tmp_path), keep=0)


class InterruptAt(BaseCallback):
    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def _on_step(self) -> bool:
        if self.num_timesteps == self.step:
            raise KeyboardInterrupt
        return True


def test_no_checkpoint_at_the_end_of_an_interrupted_run(tmp_path):
    model = cartpole_dqn()
    checkpoints = RollingCheckpointCallback(50, str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        model.learn(300, callback=[checkpoints, InterruptAt(120)])
    checkpoints.on_training_end()  # as rl-zoo3 does after catching the interruption
    assert [c.steps for c in list_checkpoints(tmp_path, require_buffer=True)] == [100]


class SignalAt(BaseCallback):
    """Sends ``signum`` to this process at env step ``step``, as `kill -USR1 <pid>` from outside would."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1):
        super().__init__()
        self.step, self.signum = step, signum

    def _on_step(self) -> bool:
        if self.num_timesteps == self.step:
            os.kill(os.getpid(), self.signum)
        return True


def test_pause_signal_checkpoints_the_current_step_and_stops(tmp_path):
    assert PAUSE_SIGNAL == learning.PAUSE_SIGNAL == signal.SIGUSR1  # the harness sends what the callback handles
    before = signal.getsignal(signal.SIGUSR1)
    model = cartpole_dqn()
    checkpoints = RollingCheckpointCallback(50, str(tmp_path))
    model.learn(300, callback=[checkpoints, SignalAt(130)])
    # the signal arrived after the checkpoint callback's turn at step 130: the next step is checkpointed and ends training
    assert model.num_timesteps == 131 and checkpoints.pause_requested
    assert [c.steps for c in list_checkpoints(tmp_path, require_buffer=True)] == [131]  # replaces the one at 100
    assert DQN.load(tmp_path / "rl_model_131_steps.zip").num_timesteps == 131
    # SB3 stores a step's transition after the callbacks (a stop returns before it), as at any periodic checkpoint
    assert load_from_pkl(tmp_path / "rl_model_replay_buffer_131_steps.pkl").size() == 130
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler lives only while training runs
    model.learn(50, callback=checkpoints, reset_num_timesteps=False)  # a later learn() is not paused by the old request
    assert model.num_timesteps >= 181 and not checkpoints.pause_requested  # (in whole train_freq chunks of 4)


def test_zoo_run_paused_by_signal_resumes_from_that_step(tmp_path):
    """``kill -USR1`` on a zoo run: a checkpoint of the step it was at, exit 0; ``--resume`` continues from there."""
    base = ["train", "--algo", "dqn", "--env", "CartPole-v1", "-f", "logs", "--eval-freq", "-1", "--checkpoint-freq",
            "200", *FAST, "-params", "learning_starts:50", "train_freq:1", "gradient_steps:1"]  # fmt: skip
    env = {**os.environ, "MPLBACKEND": "Agg"}
    zoo = subprocess.Popen([sys.executable, "-m", "sb3_dreamer.zoo", *base[:-4], "-n", "1000000", *base[-4:]],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "logs" / "dqn" / "CartPole-v1_1"
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "rl_model_200_steps.zip").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # training has started (the pause handler is in place once the first checkpoint is written)
    zoo.send_signal(signal.SIGUSR1)
    output = zoo.communicate(timeout=120)[0]
    assert zoo.returncode == 0, output[-3000:]
    (point,) = list_checkpoints(run_dir / "checkpoints", require_buffer=True)
    assert point.steps >= 200 and f"Paused at {point.steps} steps on request" in output
    assert DQN.load(run_dir / "CartPole-v1.zip").num_timesteps == point.steps  # the zoo's own save, same step
    resumed = run_zoo(*base[:-4], "-n", str(point.steps + 100), "--resume", *base[-4:], cwd=tmp_path)
    assert f"from its checkpoint at {point.steps} steps" in resumed.stdout
    assert DQN.load(run_dir / "CartPole-v1.zip").num_timesteps == point.steps + 100


def test_a_checkpoint_without_its_replay_buffer_is_incomplete(tmp_path):
    model = cartpole_dqn()
    model.learn(100, callback=RollingCheckpointCallback(100, str(tmp_path)))
    zip_300, _, _ = checkpoint_files(tmp_path, 300)
    zip_300.write_bytes((tmp_path / "rl_model_100_steps.zip").read_bytes())  # a model whose buffer was never written
    assert [c.steps for c in list_checkpoints(tmp_path, require_buffer=True)] == [100]
    assert [c.steps for c in list_checkpoints(tmp_path, require_buffer=False)] == [100, 300]
    (tmp_path / "rl_model_x_steps.zip").write_bytes(b"")  # not a checkpoint name
    assert len(list_checkpoints(tmp_path, require_buffer=False)) == 2


def test_restore_evaluations_keeps_the_history_up_to_the_checkpoint(tmp_path):
    np.savez(tmp_path / "evaluations.npz", timesteps=np.array([100, 200, 300]),
             results=np.array([[1.0, 3.0], [5.0, 7.0], [2.0, 2.0]]), ep_lengths=np.array([[9, 9], [8, 8], [7, 7]]))
    callback = EvalCallback(DummyVecEnv([lambda: gym.make("CartPole-v1")]), log_path=str(tmp_path))
    assert restore_evaluations(callback, up_to_step=250) == 2
    assert callback.evaluations_timesteps == [100, 200]
    assert callback.evaluations_results == [[1.0, 3.0], [5.0, 7.0]] and callback.evaluations_length == [[9, 9], [8, 8]]
    assert callback.best_mean_reward == 6.0 and callback.last_mean_reward == 6.0
    with np.load(tmp_path / "evaluations.npz") as saved:  # the file matches: the evaluation at 300 is to be redone
        assert saved["timesteps"].tolist() == [100, 200] and saved["results"].tolist() == [[1.0, 3.0], [5.0, 7.0]]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    fresh = EvalCallback(DummyVecEnv([lambda: gym.make("CartPole-v1")]), log_path=str(tmp_path / "x"))
    assert restore_evaluations(fresh, up_to_step=250) == 0 and fresh.evaluations_timesteps == []


def test_latest_run_dir_and_bad_options(tmp_path):
    for name in ("CartPole-v1_1", "CartPole-v1_10", "CartPole-v1_2", "CartPole-v1_x", "Other_30"):
        (tmp_path / name).mkdir()
    assert latest_run_dir(tmp_path, "CartPole-v1").name == "CartPole-v1_10"
    assert latest_run_dir(tmp_path, "Pendulum-v1") is None
    with pytest.raises(ValueError, match="checkpoint-freq"):
        resumable_experiment_manager(checkpoint_freq=-1)
    with pytest.raises(ValueError, match="keep-checkpoints"):
        resumable_experiment_manager(keep_checkpoints=0)


# --------------------------------------------------------------------------------------------------------------------
# The launcher end to end


def test_zoo_resume_continues_the_same_run(tmp_path):
    """A finished run (checkpointed at its end) continued to a larger -n: same folder, counters and evaluation grid."""
    base = ["train", "--algo", "dreamerv2", "--env", "CartPole-v1", "-f", "logs", "--eval-freq", "100",
            "--eval-episodes", "1", "--checkpoint-freq", "150", *FAST]  # fmt: skip
    first = run_zoo(*base, "-n", "300", "-params", *TINY, cwd=tmp_path)
    assert "--resume" not in first.stdout
    run_dir = tmp_path / "logs" / "dreamerv2" / "CartPole-v1_1"
    updates_first = DreamerV2.load(run_dir / "CartPole-v1.zip")._n_updates
    proc = run_zoo(*base, "-n", "500", "--resume", "-params", *TINY, cwd=tmp_path)
    assert "from its checkpoint at 300 steps" in proc.stdout and "Kept 3 evaluations up to step 300" in proc.stdout
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["CartPole-v1_1"]  # no new run folder
    with np.load(run_dir / "evaluations.npz") as evaluations:
        assert evaluations["timesteps"].tolist() == [100, 200, 300, 400, 500]
    model = DreamerV2.load(run_dir / "CartPole-v1.zip")
    assert model.num_timesteps == 500 and model._n_updates == updates_first + 200 // 5  # train_freq 5, 1 step each
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "rl_model_500_steps.zip", "rl_model_replay_buffer_500_steps.pkl", "rl_model_vecnormalize_500_steps.pkl",
    ]  # fmt: skip  (only the newest kept; CartPole's entry normalizes observations)
    assert load_from_pkl(run_dir / "checkpoints" / "rl_model_replay_buffer_500_steps.pkl").size() >= 500
    monitor = (run_dir / "0.monitor.csv").read_text().splitlines()
    assert sum(line.startswith("#") for line in monitor) == 1  # appended to, not overwritten
    assert sum(int(line.split(",")[1]) for line in monitor[2:]) <= 500  # one episode log, no step counted twice


def test_zoo_resume_without_a_checkpoint_starts_a_new_run_and_refuses_optimize(tmp_path):
    proc = run_zoo("train", "--algo", "dqn", "--env", "CartPole-v1", "-n", "100", "-f", "logs", "--eval-freq", "-1",
                   "--resume", *FAST, "-params", "learning_starts:50", cwd=tmp_path)  # fmt: skip
    assert "no checkpoint" in proc.stdout and (tmp_path / "logs" / "dqn" / "CartPole-v1_1" / "CartPole-v1.zip").is_file()
    proc = run_zoo("train", "--algo", "dqn", "--env", "CartPole-v1", "-optimize", "--resume", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "not to -optimize" in proc.stderr
    proc = run_zoo("train", "--algo", "dqn", "--env", "CartPole-v1", "--checkpoint-freq", "-5", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--checkpoint-freq must be >= 0" in proc.stderr


# --------------------------------------------------------------------------------------------------------------------
# The learning harness: a crashed job is continued from its checkpoint


def test_harness_continues_a_crashed_job_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_MARKER, str(tmp_path / "crashed"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    (job,) = learning.build_jobs(
        learning.SUITES["cartpole"], results_dir=tmp_path / "learning", algos=["dreamerv2"], seeds=[0], budget=400,
        eval_freq=100, eval_episodes=1, threads=1, checkpoint_freq=100,
        algo_params={"dreamerv2": [*TINY, "callback:'test_zoo_resume.CrashOnceAtStep'"]},
    )  # fmt: skip
    assert "--checkpoint-freq" in job.command() and "--resume" not in job.command()
    first = learning.run_job(job, echo=False)
    assert first["status"] == "failed" and first["returncode"] == 3  # killed at step 250, after the checkpoint at 200
    assert learning.resume_point(job).steps == 200
    # as if the session had ended: job.json still says "running", its segment has no end, no process is left
    running = {**first, "status": "running", "pid": 1 << 30, "zoo_pid": 1 << 30, "host": learning.socket.gethostname()}
    begun = ("start_time", "resumed_from_step", "command")
    running["segments"] = [{key: value for key, value in first["segments"][0].items() if key in begun}]
    job.job_file.write_text(json.dumps(running))
    log_written = os.path.getmtime(job.dir / "train.log")
    outcome = learning.run_jobs([job])
    assert outcome["ok"] == [job]
    record = learning.read_job(job.dir)
    assert [(s["resumed_from_step"], s["status"]) for s in record["segments"]] == [(None, "killed"), (200, "ok")]
    killed = record["segments"][0]
    started = learning.datetime.fromisoformat(killed["start_time"]).timestamp()
    assert killed["wall_seconds"] == pytest.approx(log_written - started, abs=1.01)  # up to train.log's last write
    assert record["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in record["segments"]), abs=0.02)
    assert record["start_time"] == first["start_time"] and "--resume" in record["segments"][1]["command"]
    assert "--resume" not in record["command"]  # the job's own command; each segment keeps the one it ran
    (run_dir,) = (job.dir / "dreamerv2").iterdir()
    with np.load(run_dir / "evaluations.npz") as evaluations:
        assert evaluations["timesteps"].tolist() == [100, 200, 300, 400]  # 300's first try was lost, then redone
    assert DreamerV2.load(run_dir / "CartPole-v1.zip").num_timesteps == 400
    log = (job.dir / "train.log").read_text()
    assert "resuming from the checkpoint at step 200" in log and log.count("Kept 2 evaluations") == 1
    assert learning.run_jobs([job])["skipped"] == [job]  # finished now


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads command lines from /proc")
def test_harness_skips_a_job_that_is_running_and_knows_dead_ones(tmp_path):
    (job,) = learning.build_jobs(learning.SUITES["cartpole"], results_dir=tmp_path, algos=["dqn"], seeds=[0])
    job.dir.mkdir(parents=True)
    # a process whose command line names the zoo launcher stands in for a job's zoo run
    zoo = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "sb3_dreamer.zoo"])
    cmdline = Path(f"/proc/{zoo.pid}/cmdline")
    for _ in range(500):  # until it has exec'd (its command line is empty before)
        if b"sb3_dreamer.zoo" in cmdline.read_bytes():
            break
        time.sleep(0.01)
    try:
        running = dict(status="running", host=socket.gethostname(), pid=1 << 30, zoo_pid=zoo.pid)
        job.job_file.write_text(json.dumps(running))
        assert learning.is_alive(running)
        assert learning.run_jobs([job], dry_run=True)["busy"] == [job]  # not started a second time
        assert not learning.is_alive({**running, "host": running["host"] + "-elsewhere"})  # results copied from elsewhere
        assert not learning.is_alive({**running, "status": "paused"})
        assert not learning.is_alive({**running, "zoo_pid": os.getpid()})  # alive, but not a zoo run (pid reused)
    finally:
        zoo.kill()
        zoo.wait()
    assert not learning.is_alive(running)  # the process is gone: the job can be continued
    assert learning.run_jobs([job], dry_run=True)["planned"] == [job]
    assert not learning.process_running(None, "python") and not learning.process_running(1 << 30, "python")
