"""Issue 6, "never lose a run": exact resume from checkpoints, atomic writes, kill-and-resume.

Exactness is checked on CPU with a fixed seed: a run stopped at step k by a callback right after
``CheckpointCallback(save_replay_buffer=True)`` wrote its files, then resumed with ``DreamerV2.load`` +
``load_replay_buffer`` + ``learn(reset_num_timesteps=False)``, must end with the same parameters, optimizer states,
counters, replay buffer and logged ``train/*`` values as an uninterrupted run. The env object is handed over
(``force_reset=False``) so that its own state continues; a resume with a new env (``force_reset=True``, a new process)
is a documented clean restart of collection, checked for exact counters and buffer and for determinism.
"""

import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from helpers import RecordingLogger
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.save_util import load_from_pkl
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_dreamer import DreamerV2
from sb3_dreamer.common import checkpointing

TINY = dict(
    learning_starts=64, batch_size=4, sequence_length=8, imagination_horizon=3, train_freq=4,
    policy_kwargs=dict(deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_layers=1, mlp_units=32),
    seed=0, device="cpu",
)
BUFFER_FIELDS = ("observations", "actions", "rewards", "is_first", "is_terminal", "is_last", "env_pos", "env_full",
                 "needs_first")


class RandomWalkEnv(gym.Env):
    """Stochastic dynamics, rewards and episode ends, all drawn from the env's own ``np_random``."""

    observation_space = spaces.Box(-10.0, 10.0, (3,), np.float32)

    def __init__(self, action_space: spaces.Space | None = None) -> None:
        self.action_space = action_space if action_space is not None else spaces.Discrete(3)
        self.t, self.x = 0, np.zeros(3, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.x = 0, self.np_random.normal(size=3).astype(np.float32)
        return self.x.copy(), {}

    def step(self, action):
        self.t += 1
        push = float(np.sum(action)) - 1.0
        self.x = np.clip(self.x + 0.1 * push + 0.1 * self.np_random.normal(size=3), -10, 10).astype(np.float32)
        terminated = bool(self.np_random.random() < 0.05)
        return self.x.copy(), float(self.np_random.normal()), terminated, self.t >= 25, {}


def make_venv(n_envs: int = 1, **env_kwargs) -> DummyVecEnv:
    return DummyVecEnv([lambda: Monitor(RandomWalkEnv(**env_kwargs)) for _ in range(n_envs)])


class StopAt(BaseCallback):
    """Stops ``learn`` (as a crash would) at the ``k``-th env step, after the callbacks before it ran."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def _on_step(self) -> bool:
        return self.n_calls < self.k


def scramble_global_rngs() -> None:
    """What a fresh process would have: unrelated global RNG states."""
    random.seed(1234)
    np.random.seed(4321)
    th.manual_seed(999)


def assert_same_run(a: DreamerV2, b: DreamerV2) -> None:
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert th.equal(sa[key], sb[key]), key
    for name in ("model_optimizer", "actor_optimizer", "critic_optimizer"):
        oa, ob = getattr(a.policy, name).state_dict(), getattr(b.policy, name).state_dict()
        assert oa["param_groups"] == ob["param_groups"], name
        for idx, state in oa["state"].items():
            for key, value in state.items():
                assert th.equal(value, ob["state"][idx][key]), (name, idx, key)
    for attr in ("num_timesteps", "_n_updates", "_episode_num", "_current_progress_remaining"):
        assert getattr(a, attr) == getattr(b, attr), attr
    np.testing.assert_array_equal(a._last_obs, b._last_obs)
    np.testing.assert_array_equal(a._last_episode_starts, b._last_episode_starts)
    for field in BUFFER_FIELDS:
        np.testing.assert_array_equal(getattr(a.replay_buffer, field), getattr(b.replay_buffer, field), err_msg=field)
    assert a.replay_buffer.rng.bit_generator.state == b.replay_buffer.rng.bit_generator.state
    assert [ep["r"] for ep in a.ep_info_buffer] == [ep["r"] for ep in b.ep_info_buffer]


@pytest.mark.parametrize(
    "n_envs, k, action_space",
    [
        (1, 96, None),  # checkpoint at the end of a train_freq chunk, in the training phase
        (1, 98, None),  # mid-chunk: the resumed run collects the rest of the chunk first
        (2, 30, spaces.Box(-2.0, 2.0, (2,), np.float32)),  # during prefill (random actions), 2 envs, continuous actions
    ],
)
def test_exact_resume_through_checkpoint_callback(tmp_path, n_envs, k, action_space):
    total = 2 * 96
    kwargs = {} if action_space is None else {"action_space": action_space}
    # A: uninterrupted
    logs_a: list = []
    model_a = DreamerV2("MlpPolicy", make_venv(n_envs, **kwargs), **TINY)
    model_a.set_logger(RecordingLogger(logs_a))
    model_a.learn(total)

    # B: the same run, stopped at step k right after the checkpoint was written...
    logs_b: list = []
    env_b = make_venv(n_envs, **kwargs)
    model_b = DreamerV2("MlpPolicy", env_b, **TINY)
    model_b.set_logger(RecordingLogger(logs_b))
    checkpoint = CheckpointCallback(save_freq=k, save_path=str(tmp_path), save_replay_buffer=True)
    model_b.learn(total, callback=[checkpoint, StopAt(k)])
    steps = k * n_envs
    assert model_b.num_timesteps == steps
    del model_b
    scramble_global_rngs()

    # ... and resumed from the files, with the env object continuing where it was
    model_b = DreamerV2.load(tmp_path / f"rl_model_{steps}_steps.zip", env=env_b, force_reset=False, device="cpu")
    model_b.load_replay_buffer(tmp_path / f"rl_model_replay_buffer_{steps}_steps.pkl")
    model_b.set_logger(RecordingLogger(logs_b))
    model_b.learn(total - steps, reset_num_timesteps=False)

    assert model_a._n_updates > 0
    assert_same_run(model_a, model_b)
    assert logs_a == logs_b
    assert any(key == "train/model_loss" for key, _ in logs_a)


def test_optimizer_and_slow_critic_round_trip(tmp_path):
    model = DreamerV2("MlpPolicy", make_venv(), **{**TINY, "target_update_interval": 3}).learn(96)
    model.save(tmp_path / "model")
    loaded = DreamerV2.load(tmp_path / "model.zip", device="cpu")
    for name in ("model_optimizer", "actor_optimizer", "critic_optimizer"):
        saved, restored = getattr(model.policy, name).state_dict(), getattr(loaded.policy, name).state_dict()
        assert saved["state"].keys() == restored["state"].keys() and len(saved["state"]) > 0
        for idx in saved["state"]:
            for key in saved["state"][idx]:
                assert th.equal(saved["state"][idx][key], restored["state"][idx][key])
    slow, slow_loaded = model.policy.actor_critic.slow_critic, loaded.policy.actor_critic.slow_critic
    for p, q in zip(slow.parameters(), slow_loaded.parameters()):
        assert th.equal(p, q)
    assert loaded._n_updates == model._n_updates and loaded.num_timesteps == model.num_timesteps


def test_in_process_continue_completes_the_stopped_step():
    """learn() stopped by a callback, then learn(reset_num_timesteps=False) on the same object: no transition is lost."""
    model_a = DreamerV2("MlpPolicy", make_venv(), **TINY).learn(160)
    model_b = DreamerV2("MlpPolicy", make_venv(), **TINY)
    model_b.learn(160, callback=StopAt(90))
    model_b.learn(70, reset_num_timesteps=False)
    assert_same_run(model_a, model_b)


KILLED_WRITER = """
import os, signal, sys
import numpy as np, torch as th
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
sys.path.insert(0, {tests!r})
from test_resume import TINY, make_venv
from sb3_dreamer import DreamerV2
th.set_num_threads(1)

class Die(BaseCallback):
    def _on_step(self):
        if self.n_calls == {die}:
            os.kill(os.getpid(), signal.SIGKILL)
        return True

model = DreamerV2("MlpPolicy", make_venv(), **TINY)
model.learn(10_000, callback=[CheckpointCallback({k}, {path!r}, save_replay_buffer=True), Die()])
"""


def _run_killed_writer(folder: pathlib.Path, k: int, die: int) -> None:
    code = KILLED_WRITER.format(tests=os.path.dirname(__file__), die=die, k=k, path=str(folder))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_resume_after_sigkill_in_a_new_process(tmp_path):
    """A run SIGKILLed after its checkpoint resumes in another process with a new env (clean restart of collection):
    counters and buffer continue exactly, losses stay finite, and resuming twice gives the same run."""
    k = 80
    _run_killed_writer(tmp_path, k=k, die=k + 7)
    zip_path, buffer_path = checkpointing.latest_checkpoint(tmp_path)
    assert zip_path.name == f"rl_model_{k}_steps.zip"
    saved_buffer = load_from_pkl(buffer_path)

    runs = []
    for _ in range(2):
        logs: list = []
        model = DreamerV2.load(zip_path, env=make_venv(), device="cpu")  # force_reset=True: a new env
        model.load_replay_buffer(buffer_path)
        # the checkpoint is taken inside step k, before that step's transition is stored and its training runs
        assert model.num_timesteps == k and model._n_updates == (k - TINY["learning_starts"]) // 4 - 1
        model.set_logger(RecordingLogger(logs))
        model.learn(40, reset_num_timesteps=False)
        assert model.num_timesteps == k + 40
        assert model._n_updates == (k + 40 - TINY["learning_starts"]) // 4  # as if never interrupted
        values = np.array([v for _, v in logs])
        assert len(values) > 0 and np.all(np.isfinite(values))
        buffer = model.replay_buffer
        old_rows = int(saved_buffer.env_pos[0])
        for field in ("observations", "actions", "rewards", "is_first", "is_terminal"):
            np.testing.assert_array_equal(getattr(buffer, field)[:old_rows], getattr(saved_buffer, field)[:old_rows])
        # row old_rows is step k's transition (kept from the checkpoint); the trajectory is cut there...
        assert not buffer.is_first[old_rows, 0] and buffer.is_last[old_rows, 0]
        assert buffer.is_first[old_rows + 1, 0]  # ... and collection restarts with a new episode
        assert buffer.env_pos[0] == old_rows + 2 + 40 + int(buffer.is_first[old_rows + 2 : buffer.env_pos[0], 0].sum())
        runs.append((model.policy.state_dict(), logs))
    (params_1, logs_1), (params_2, logs_2) = runs
    assert logs_1 == logs_2
    assert all(th.equal(params_1[key], params_2[key]) for key in params_1)


def test_zoo_style_resume(tmp_path):
    """What ``python -m sb3_dreamer.zoo train -i model.zip`` does: load(env, seed, **hyperparams) +
    load_replay_buffer(replay_buffer.pkl) + learn(n) with the default reset_num_timesteps=True."""
    model = DreamerV2("MlpPolicy", make_venv(), **TINY).learn(96)
    model.save(tmp_path / "RandomWalk.zip")
    model.save_replay_buffer(tmp_path / "replay_buffer.pkl")
    size, n_updates = model.replay_buffer.size(), model._n_updates
    hyperparams = {k: v for k, v in TINY.items() if k not in ("policy_kwargs", "seed", "device")}
    loaded = DreamerV2.load(tmp_path / "RandomWalk.zip", env=make_venv(), seed=1, device="cpu", **hyperparams)
    loaded.load_replay_buffer(tmp_path / "replay_buffer.pkl", truncate_last_traj=True)
    assert loaded.replay_buffer.size() == size
    loaded.learn(72)
    assert loaded.num_timesteps == 72
    assert loaded.replay_buffer.size() > size
    assert loaded._n_updates == n_updates + (72 - TINY["learning_starts"]) // 4


# ------------------------------------------------------------------------------------------------------ atomic writes
@pytest.fixture
def trained(tmp_path):
    model = DreamerV2("MlpPolicy", make_venv(), **{**TINY, "learning_starts": 10**6}).learn(40)
    model.save(tmp_path / "model.zip")
    model.save_replay_buffer(tmp_path / "buffer.pkl")
    return model


def _half_write_then_fail(real):
    def write(path, *args, **kwargs):
        real(path, *args, **kwargs)
        data = pathlib.Path(path).read_bytes()
        pathlib.Path(path).write_bytes(data[: len(data) // 2])
        raise OSError("No space left on device (simulated)")

    return write


def test_failed_save_keeps_previous_files(tmp_path, trained, monkeypatch):
    import stable_baselines3.common.base_class as base_class
    import stable_baselines3.common.off_policy_algorithm as off_policy

    zip_bytes, pkl_bytes = (tmp_path / "model.zip").read_bytes(), (tmp_path / "buffer.pkl").read_bytes()
    monkeypatch.setattr(base_class, "save_to_zip_file", _half_write_then_fail(base_class.save_to_zip_file))
    monkeypatch.setattr(off_policy, "save_to_pkl", _half_write_then_fail(off_policy.save_to_pkl))
    trained.learn(8, reset_num_timesteps=False)  # the state to save differs from the files on disk
    with pytest.raises(OSError, match="simulated"):
        trained.save(tmp_path / "model.zip")
    with pytest.raises(OSError, match="simulated"):
        trained.save_replay_buffer(tmp_path / "buffer.pkl")
    with pytest.raises(OSError, match="simulated"):
        trained.save(tmp_path / "new_model")  # no previous file: nothing is left behind
    assert (tmp_path / "model.zip").read_bytes() == zip_bytes
    assert (tmp_path / "buffer.pkl").read_bytes() == pkl_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer.pkl", "model.zip"]
    DreamerV2.load(tmp_path / "model.zip", device="cpu")


def test_save_paths_and_file_objects(tmp_path, trained):
    import io

    trained.save(tmp_path / "sub" / "no_suffix")  # SB3 conventions: appends .zip, creates folders
    trained.save_replay_buffer(str(tmp_path / "sub" / "buffer"))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["buffer.pkl", "no_suffix.zip"]
    assert oct((tmp_path / "sub" / "no_suffix.zip").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    stream = io.BytesIO()
    trained.save(stream)
    stream.seek(0)
    assert DreamerV2.load(stream, device="cpu").num_timesteps == trained.num_timesteps


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


SAVE_LOOP = """
import sys
import numpy as np, torch as th
from gymnasium import spaces
sys.path.insert(0, {tests!r})
from sb3_dreamer import DreamerV2
th.set_num_threads(1)
from test_resume import TINY
import gymnasium as gym

class Big(gym.Env):
    observation_space = spaces.Box(-1, 1, (4096,), np.float32)
    action_space = spaces.Discrete(2)
    def reset(self, *, seed=None, options=None):
        return np.zeros(4096, np.float32), {{}}
    def step(self, a):
        return np.ones(4096, np.float32), 0.0, False, False, {{}}

model = DreamerV2("MlpPolicy", Big(), **{{**TINY, "buffer_size": 1200, "learning_starts": 10**6}})
model.learn(1000)
model.save({zip!r}); model.save_replay_buffer({pkl!r})
print("READY", flush=True)
while True:
    model.save_replay_buffer({pkl!r})
    model.save({zip!r})
"""


def _kill_when_writing(proc: subprocess.Popen, pattern: str, folder: pathlib.Path, timeout: float = 30.0) -> bool:
    """SIGKILL ``proc`` as soon as a non-empty temporary file matching ``pattern`` exists, i.e. mid-save."""
    deadline = time.monotonic() + timeout
    hit = False
    while time.monotonic() < deadline and not hit:
        hit = any(p.stat().st_size > 0 for p in folder.glob(pattern) if p.exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return hit


@pytest.mark.parametrize("target", ["buffer.pkl", "model.zip"])
def test_sigkill_during_save_never_corrupts(tmp_path, target):
    zip_path, pkl_path = tmp_path / "model.zip", tmp_path / "buffer.pkl"
    code = SAVE_LOOP.format(tests=os.path.dirname(__file__), zip=str(zip_path), pkl=str(pkl_path))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        assert _kill_when_writing(proc, f".{target}.*.tmp", tmp_path), "never caught the writer mid-save"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    # killed mid-write (the temporary file is left, unless the write finished in the last microseconds)...
    assert len(list(tmp_path.glob(f".{target}.*.tmp"))) <= 1
    buffer = load_from_pkl(pkl_path)  # ... and the destinations are the last complete saves
    assert buffer.size() == 1001 and np.all(buffer.observations[1:1001] == 1.0)
    model = DreamerV2.load(zip_path, device="cpu")
    assert model.num_timesteps == 1000
    model.save(zip_path)  # a later save removes the dead writer's temporary files
    model.save_replay_buffer(pkl_path)
    assert list(tmp_path.glob(".*.tmp")) == []


def test_remove_stale_temp_files_keeps_live_writers(tmp_path):
    final = tmp_path / "m.zip"
    live = tmp_path / f".m.zip.{os.getpid()}.abc.tmp"
    dead_pid = 2**22 + 12345  # above the default pid_max
    dead = tmp_path / f".m.zip.{dead_pid}.abc.tmp"
    other = tmp_path / f".other.zip.{dead_pid}.abc.tmp"
    for path in (live, dead, other):
        path.write_bytes(b"x")
    assert checkpointing.remove_stale_temp_files(final) == [dead]
    assert live.exists() and other.exists() and not dead.exists()


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    assert checkpointing.latest_checkpoint(tmp_path) is None
    for steps in (100, 200, 1000):
        (tmp_path / f"rl_model_{steps}_steps.zip").write_bytes(b"z")
    for steps in (100, 200):
        (tmp_path / f"rl_model_replay_buffer_{steps}_steps.pkl").write_bytes(b"p")
    (tmp_path / "rl_model_vecnormalize_300_steps.pkl").write_bytes(b"v")
    assert checkpointing.latest_checkpoint(tmp_path) == (tmp_path / "rl_model_200_steps.zip",
                                                         tmp_path / "rl_model_replay_buffer_200_steps.pkl")
    assert checkpointing.latest_checkpoint(tmp_path, require_buffer=False) == (tmp_path / "rl_model_1000_steps.zip", None)
    assert checkpointing.latest_checkpoint(tmp_path, name_prefix="other") is None


def test_model_stays_copyable_after_a_stopped_learn():
    import copy

    model = DreamerV2("MlpPolicy", make_venv(), **TINY)
    model.learn(100, callback=StopAt(70))
    clone = copy.deepcopy(model)
    assert clone.num_timesteps == 70 and clone._stopped_step is not None
