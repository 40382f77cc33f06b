"""Issue 6, "never lose a run": divergence, env faults, endless episodes, bad inputs and bad files.

* non-finite losses or gradients raise ``ValueError`` naming the component and the update, before that component's
  parameters or optimizer state change;
* an env that raises in ``step`` propagates its error (with a note), and the model and buffer can still be saved;
* an env that never terminates runs in bounded memory (the buffer is a ring);
* wrong observations for ``predict`` and unreadable or foreign files for ``load``/``load_replay_buffer`` give clear
  ``ValueError``s.
"""

import copy
import io
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from helpers import RecordingLogger
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.save_util import load_from_pkl
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_dreamer import DreamerV2

TINY = dict(
    learning_starts=64, batch_size=4, sequence_length=8, imagination_horizon=3, train_freq=4,
    policy_kwargs=dict(deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_layers=1, mlp_units=32),
    seed=0, device="cpu",
)


class WalkEnv(gym.Env):
    """A small stochastic env; ``fail_at`` makes ``step`` raise, ``nan_reward`` returns NaN rewards, ``endless`` never
    ends an episode."""

    observation_space = spaces.Box(-10.0, 10.0, (3,), np.float32)
    action_space = spaces.Discrete(3)

    def __init__(self, fail_at: int | None = None, nan_reward: bool = False, endless: bool = False) -> None:
        self.fail_at, self.nan_reward, self.endless = fail_at, nan_reward, endless
        self.total_steps, self.t, self.x = 0, 0, np.zeros(3, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.x = 0, self.np_random.normal(size=3).astype(np.float32)
        return self.x.copy(), {}

    def step(self, action):
        self.total_steps += 1
        if self.fail_at is not None and self.total_steps >= self.fail_at:
            raise RuntimeError(f"simulator crashed at step {self.total_steps}")
        self.t += 1
        self.x = np.clip(self.x + 0.1 * (int(action) - 1) + 0.1 * self.np_random.normal(size=3), -10, 10).astype(np.float32)
        reward = float("nan") if self.nan_reward else float(self.np_random.normal())
        if self.endless:
            return self.x.copy(), reward, False, False, {}
        return self.x.copy(), reward, bool(self.np_random.random() < 0.05), self.t >= 25, {}


def _snapshot(module: th.nn.Module, optimizer: th.optim.Optimizer) -> tuple[list[th.Tensor], dict]:
    return [p.detach().clone() for p in module.parameters()], copy.deepcopy(optimizer.state_dict())


def _assert_unchanged(snapshot: tuple[list[th.Tensor], dict], module: th.nn.Module, optimizer: th.optim.Optimizer) -> None:
    params, opt_state = snapshot
    for before, after in zip(params, module.parameters()):
        assert th.equal(before, after)
    now = optimizer.state_dict()
    assert now["param_groups"] == opt_state["param_groups"]
    assert now["state"].keys() == opt_state["state"].keys()
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            assert th.equal(value, now["state"][idx][key]), (idx, key)


# ------------------------------------------------------------------------------------------------------ divergence
def test_nan_reward_raises_before_the_first_update():
    model = DreamerV2("MlpPolicy", WalkEnv(nan_reward=True), **TINY)
    snapshot = _snapshot(model.policy, model.policy.model_optimizer)
    with pytest.raises(ValueError, match=r"non-finite model loss .* at update 0; no parameter was changed"):
        model.learn(80)
    _assert_unchanged(snapshot, model.policy, model.policy.model_optimizer)
    assert model._n_updates == 0


def _components(model: DreamerV2) -> dict[str, tuple[th.nn.Module, th.optim.Optimizer]]:
    policy = model.policy
    return {
        "model": (policy.world_model, policy.model_optimizer),
        "actor": (policy.actor_critic.actor, policy.actor_optimizer),
        "critic": (policy.actor_critic.critic, policy.critic_optimizer),
    }


@pytest.fixture(scope="module")
def warm_files():
    model = DreamerV2("MlpPolicy", WalkEnv(), **TINY).learn(80)  # optimizers have state
    assert model._n_updates > 0
    model_file, buffer_file = io.BytesIO(), io.BytesIO()
    model.save(model_file)
    model.save_replay_buffer(buffer_file)
    return model_file.getvalue(), buffer_file.getvalue()


@pytest.mark.parametrize("component", ["model", "actor", "critic"])
@pytest.mark.parametrize("fault", ["loss", "gradient norm"])
def test_divergence_names_component_and_leaves_it_untouched(warm_files, monkeypatch, component, fault):
    model = DreamerV2.load(io.BytesIO(warm_files[0]), env=WalkEnv(), device="cpu")
    model.load_replay_buffer(io.BytesIO(warm_files[1]))
    model.set_logger(RecordingLogger([]))
    components = _components(model)
    module, optimizer = components[component]
    if fault == "loss":
        if component == "model":
            real = model.policy.world_model.loss

            def poisoned(*args, **kwargs):
                loss, post, metrics = real(*args, **kwargs)
                return loss * float("nan"), post, metrics

            monkeypatch.setattr(model.policy.world_model, "loss", poisoned)
        else:
            real_behaviour = model.policy.actor_critic.loss
            field = f"{component}_loss"

            def poisoned_behaviour(*args, **kwargs):
                losses = real_behaviour(*args, **kwargs)
                return losses._replace(**{field: getattr(losses, field) * float("inf")})

            monkeypatch.setattr(model.policy.actor_critic, "loss", poisoned_behaviour)
    else:  # finite loss, infinite gradient
        next(module.parameters()).register_hook(lambda grad: grad * float("inf"))

    later = list(components)[list(components).index(component):]  # this component and those updated after it
    snapshots = {name: _snapshot(*components[name]) for name in later}
    update = model._n_updates
    with pytest.raises(ValueError, match=rf"non-finite {component} {fault} .* at update {update}; no parameter was changed"):
        model.train(gradient_steps=1, batch_size=4)
    for name in later:
        _assert_unchanged(snapshots[name], *components[name])
    assert model._n_updates == update


def test_grad_norms_and_losses_are_logged_and_finite():
    logs: list = []
    model = DreamerV2("MlpPolicy", WalkEnv(), **TINY)
    model.set_logger(RecordingLogger(logs))
    model.learn(80)
    keys = {key for key, _ in logs}
    for name in ("model", "actor", "critic"):
        assert f"train/{name}_grad_norm" in keys
    assert {"train/model_loss", "train/actor_loss", "train/critic_loss", "train/kl"} <= keys
    assert all(np.isfinite(value) for _, value in logs)


# ------------------------------------------------------------------------------------------------------ env faults
def test_env_raising_in_step_keeps_buffer_and_model(tmp_path):
    model = DreamerV2("MlpPolicy", WalkEnv(fail_at=100), **TINY)
    with pytest.raises(RuntimeError, match="simulator crashed at step 100") as info:
        model.learn(300)
    assert any("model.save_replay_buffer" in note for note in getattr(info.value, "__notes__", []))
    assert model.num_timesteps == 99
    buffer = model.replay_buffer
    transitions = int((~buffer.is_first[: buffer.size()]).sum())
    assert transitions == 99  # every step before the fault is stored

    model.save(tmp_path / "model.zip")
    model.save_replay_buffer(tmp_path / "buffer.pkl")
    restored = load_from_pkl(tmp_path / "buffer.pkl")
    for field in ("observations", "actions", "rewards", "is_first", "is_terminal", "is_last", "env_pos"):
        np.testing.assert_array_equal(getattr(restored, field), getattr(buffer, field))

    # the run continues from the saved files with a working env
    resumed = DreamerV2.load(tmp_path / "model.zip", env=WalkEnv(), device="cpu")
    resumed.load_replay_buffer(tmp_path / "buffer.pkl")
    resumed.learn(20, reset_num_timesteps=False)
    assert resumed.num_timesteps == 119
    assert resumed.replay_buffer.size() > buffer.size()
    assert resumed._n_updates > model._n_updates


class RecordNbytes(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def _on_step(self) -> bool:
        self.sizes.append(self.model.replay_buffer.nbytes())
        return True


def test_never_terminating_env_runs_in_bounded_memory():
    buffer_size = 64
    model = DreamerV2("MlpPolicy", WalkEnv(endless=True),
                      **{**TINY, "buffer_size": buffer_size, "learning_starts": 32, "train_freq": 16})
    recorder = RecordNbytes()
    model.learn(3 * buffer_size + 16, callback=recorder)
    buffer = model.replay_buffer
    sizes = set(recorder.sizes[1:])  # allocated at the first add
    assert sizes == {buffer.rows * buffer.n_envs * buffer.bytes_per_step}
    assert buffer.nbytes() == buffer.rows * buffer.bytes_per_step and buffer.rows == buffer_size
    assert buffer.env_full.all() and buffer.size() == buffer_size
    assert not buffer.is_first.any() and not buffer.is_last.any()  # one endless episode, its start overwritten
    assert len(model.ep_info_buffer) == 0
    batch = buffer.sample(5)
    assert batch.observations.shape == (5, TINY["sequence_length"], 3)
    assert model._n_updates == (3 * buffer_size + 16 - 32) // 16


# ------------------------------------------------------------------------------------------------------ bad inputs
def test_predict_rejects_wrong_observations_with_value_error():
    model = DreamerV2("MlpPolicy", WalkEnv(), **TINY)
    for obs in (np.zeros(4, np.float32), np.zeros((2, 4), np.float32), np.zeros((2, 3, 1), np.float32), "obs", None):
        with pytest.raises(ValueError, match="observation shape"):
            model.predict(obs)
    with pytest.raises(ValueError, match="mixing Gym API"):
        model.predict((np.zeros(3, np.float32), {}))
    _, state = model.predict(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="state h has shape"):
        model.predict(np.zeros((3, 3), np.float32), state=state)
    with pytest.raises(ValueError, match="state must be"):
        model.predict(np.zeros((2, 3), np.float32), state=state[:2])
    with pytest.raises(ValueError, match="episode_start has 3 entries"):
        model.predict(np.zeros((2, 3), np.float32), state=state, episode_start=np.ones(3, bool))


def test_predict_rejects_wrong_dict_observations():
    class DictEnv(gym.Env):
        observation_space = spaces.Dict({"pos": spaces.Box(-1, 1, (2,), np.float32), "mode": spaces.Discrete(3)})
        action_space = spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, False, False, {}

    model = DreamerV2("MultiInputPolicy", DictEnv(), **TINY)
    good = {"pos": np.zeros(2, np.float32), "mode": 1}
    assert model.predict(good)[0] in (0, 1)
    for bad in ({"pos": np.zeros(2, np.float32)}, {**good, "extra": 0}, np.zeros(2, np.float32)):
        with pytest.raises(ValueError, match="Dict observations need exactly the keys"):
            model.predict(bad)
    with pytest.raises(ValueError, match="observation shape"):
        model.predict({"pos": np.zeros(3, np.float32), "mode": 1})


# ------------------------------------------------------------------------------------------------------ bad files
@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    model = DreamerV2("MlpPolicy", WalkEnv(), **{**TINY, "learning_starts": 10**6}).learn(24)
    model.save(folder / "dreamer.zip")
    model.save_replay_buffer(folder / "dreamer_buffer.pkl")
    dqn = DQN("MlpPolicy", DummyVecEnv([WalkEnv]), buffer_size=100, learning_starts=10, device="cpu").learn(20)
    dqn.save(folder / "dqn.zip")
    dqn.save_replay_buffer(folder / "dqn_buffer.pkl")
    other = DreamerV2("MlpPolicy", gym.make("CartPole-v1"), **{**TINY, "learning_starts": 10**6}).learn(24)
    other.save_replay_buffer(folder / "cartpole_buffer.pkl")
    return folder


def _corrupt_member(source, target, member: str) -> None:
    """Rewrite the zip with one member's bytes flipped in the middle, keeping the stored CRC."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = archive.getinfo(member)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    middle = start + info.compress_size // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    target.write_bytes(bytes(data))


def test_load_rejects_bad_model_files(saved_files, tmp_path):
    good = saved_files / "dreamer.zip"
    raw = good.read_bytes()
    cases = {
        "random.zip": (np.random.default_rng(0).bytes(4096), "not a readable model zip"),
        "empty.zip": (b"", "not a readable model zip"),
        "truncated.zip": (raw[: len(raw) // 2], "not a readable model zip"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            DreamerV2.load(tmp_path / name, device="cpu")
    for member in ("policy.pth", "data"):
        _corrupt_member(good, tmp_path / "flipped.zip", member)
        with pytest.raises(ValueError, match=rf"corrupted: archive member '{member}' fails its CRC check"):
            DreamerV2.load(tmp_path / "flipped.zip", device="cpu")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "bad_json.zip", "w") as dst:
        for item in src.infolist():
            dst.writestr(item, b"{not json" if item.filename == "data" else src.read(item.filename))
    with pytest.raises(ValueError, match="'data' entry is not valid JSON"):
        DreamerV2.load(tmp_path / "bad_json.zip", device="cpu")
    with pytest.raises(ValueError, match=r"not a DreamerV2 model: it lacks .*policy.model_optimizer.pth.*another algorithm"):
        DreamerV2.load(saved_files / "dqn.zip", device="cpu")
    with pytest.raises(ValueError, match="not a DreamerV2 model"):
        DreamerV2.load(io.BytesIO((saved_files / "dqn.zip").read_bytes()), device="cpu")
    with pytest.raises(FileNotFoundError):
        DreamerV2.load(tmp_path / "missing.zip", device="cpu")
    DreamerV2.load(good, device="cpu")  # the good file still loads
    DreamerV2.load(saved_files / "dreamer", device="cpu")  # as does the path without suffix (SB3 convention)


def test_load_replay_buffer_rejects_bad_files(saved_files, tmp_path):
    model = DreamerV2.load(saved_files / "dreamer.zip", env=WalkEnv(), device="cpu")
    buffer = model.replay_buffer
    raw = (saved_files / "dreamer_buffer.pkl").read_bytes()
    (tmp_path / "random.pkl").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "truncated.pkl").write_bytes(raw[: len(raw) // 2])
    for name in ("random.pkl", "truncated.pkl"):
        with pytest.raises(ValueError, match="truncated, corrupted or not a pickled replay buffer"):
            model.load_replay_buffer(tmp_path / name)
    with pytest.raises(ValueError, match="holds a ReplayBuffer, but this DreamerV2 model needs a SequenceReplayBuffer"):
        model.load_replay_buffer(saved_files / "dqn_buffer.pkl")
    with pytest.raises(ValueError, match="was collected with observation_space"):
        model.load_replay_buffer(saved_files / "cartpole_buffer.pkl")
    assert model.replay_buffer is buffer  # a failed load leaves the current buffer in place
    model.load_replay_buffer(saved_files / "dreamer_buffer.pkl")
    assert model.replay_buffer.size() == 25
