"""Tests of SequenceReplayBuffer: row convention, window sampling, dtypes, memory, pickling."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl

from sb3_dreamer.common.buffers import SequenceReplayBuffer

SCALAR_OBS = spaces.Box(-1e6, 1e6, (1,), np.float32)


def _col(arr: np.ndarray, env: int, n: int) -> np.ndarray:
    return arr[:n, env]  # first n rows of one env column


def _add(buf, obs, next_obs, action, reward, done, infos=None):
    n = len(obs)
    infos = infos if infos is not None else [{} for _ in range(n)]
    buf.add(
        np.asarray(obs, np.float32).reshape(n, 1),
        np.asarray(next_obs, np.float32).reshape(n, 1),
        np.asarray(action),
        np.asarray(reward, np.float32),
        np.asarray(done),
        infos,
    )


def test_rows_and_flags_termination_and_truncation():
    buf = SequenceReplayBuffer(100, SCALAR_OBS, spaces.Discrete(3), n_envs=2, sequence_length=2)
    assert isinstance(buf, ReplayBuffer)
    assert buf.nbytes() == 0
    _add(buf, [10, 20], [11, 21], [1, 2], [1.0, 2.0], [False, False])
    # env 0 terminates: 12 is its terminal observation (SB3 already swapped it in), 100 the reset observation
    _add(buf, [11, 21], [12, 22], [0, 1], [0.5, 0.25], [True, False])
    # env 1 is truncated by a time limit: 23 is its terminal observation
    _add(buf, [100, 22], [101, 23], [2, 0], [3.0, 4.0], [False, True], [{}, {"TimeLimit.truncated": True}])
    _add(buf, [101, 200], [102, 201], [1, 1], [0.0, 7.0], [False, False])
    np.testing.assert_array_equal(buf.env_pos, [6, 6])
    assert buf.size() == 12

    expected = {
        # env 0: 10 11 12(term) | 100 101 102
        0: {
            "obs": [10, 11, 12, 100, 101, 102],
            "act": [0, 1, 0, 0, 2, 1],
            "rew": [0, 1, 0.5, 0, 3, 0],
            "first": [1, 0, 0, 1, 0, 0],
            "term": [0, 0, 1, 0, 0, 0],
            "last": [0, 0, 1, 0, 0, 0],
        },
        # env 1: 20 21 22 23(truncated) | 200 201
        1: {
            "obs": [20, 21, 22, 23, 200, 201],
            "act": [0, 2, 1, 0, 0, 1],
            "rew": [0, 2, 0.25, 4, 0, 7],
            "first": [1, 0, 0, 0, 1, 0],
            "term": [0, 0, 0, 0, 0, 0],
            "last": [0, 0, 0, 1, 0, 0],
        },
    }
    for env, exp in expected.items():
        np.testing.assert_array_equal(_col(buf.observations, env, 6)[:, 0], exp["obs"])
        np.testing.assert_array_equal(_col(buf.actions, env, 6)[:, 0], exp["act"])
        np.testing.assert_array_equal(_col(buf.rewards, env, 6), np.asarray(exp["rew"], np.float32))
        np.testing.assert_array_equal(_col(buf.is_first, env, 6), np.asarray(exp["first"], bool))
        np.testing.assert_array_equal(_col(buf.is_terminal, env, 6), np.asarray(exp["term"], bool))
        np.testing.assert_array_equal(_col(buf.is_last, env, 6), np.asarray(exp["last"], bool))
    assert buf.actions.dtype == np.float32 and buf.rewards.dtype == np.float32
    assert buf.is_first.dtype == buf.is_terminal.dtype == buf.is_last.dtype == np.bool_

    # env 0 is reset without done (e.g. a new learn() call): the cut trajectory is closed and a new episode starts
    _add(buf, [555, 201], [556, 202], [2, 2], [1.0, 1.0], [False, False])
    np.testing.assert_array_equal(buf.observations[5:8, 0, 0], [102, 555, 556])
    np.testing.assert_array_equal(buf.is_last[5:8, 0], [True, False, False])
    np.testing.assert_array_equal(buf.is_terminal[5:8, 0], [False, False, False])
    np.testing.assert_array_equal(buf.is_first[5:8, 0], [False, True, False])
    np.testing.assert_array_equal(buf.observations[5:7, 1, 0], [201, 202])
    np.testing.assert_array_equal(buf.is_first[5:7, 1], [False, False])


def _fill_counter_buffer(buf: SequenceReplayBuffer, n_steps: int, episode_lengths: list[int]) -> None:
    """Each env emits consecutive counters ``env * 10_000 + k`` (reset observations included) and ends episodes regularly."""
    n_envs = buf.n_envs
    counters = np.array([env * 10_000 for env in range(n_envs)], dtype=np.int64)
    steps_in_episode = np.zeros(n_envs, dtype=np.int64)
    obs = counters.copy()
    for _ in range(n_steps):
        counters += 1
        next_obs = counters.copy()  # terminal observation at done
        steps_in_episode += 1
        done = steps_in_episode >= np.array(episode_lengths)
        _add(buf, obs, next_obs, np.zeros(n_envs, dtype=np.int64), np.ones(n_envs), done)
        counters[done] += 1  # the reset observation gets the next counter
        steps_in_episode[done] = 0
        obs = counters.copy()


def test_windows_never_cross_write_head_or_envs():
    buf = SequenceReplayBuffer(2 * 12, SCALAR_OBS, spaces.Discrete(2), n_envs=2, sequence_length=5, seed=0)
    assert buf.rows == 12
    _fill_counter_buffer(buf, n_steps=53, episode_lengths=[4, 7])
    assert buf.env_full.all() and buf.size() == 24
    assert buf.env_pos[0] != buf.env_pos[1]  # extra is_first rows make the heads drift apart

    samples = buf.sample(600)
    obs = samples.observations[..., 0].numpy().astype(np.int64)  # [B, T]
    assert obs.shape == (600, 5)
    np.testing.assert_array_equal(np.diff(obs, axis=1), 1)  # strictly consecutive: no head crossing, no env mixing
    env_ids = obs // 10_000
    assert set(np.unique(env_ids)) == {0, 1}
    assert samples.is_first[:, 0].all()
    assert (samples.actions[:, 0] == 0).all()
    # every window lies inside what is currently stored, and both the oldest and newest rows are reachable
    for env in range(2):
        stored = buf.observations[:, env, 0].astype(np.int64)
        in_env = obs[env_ids == env]
        assert np.isin(in_env, stored).all()
        assert in_env.min() == stored.min() and in_env.max() == stored.max()
    # non-forced flags come from storage: is_first inside a window marks a real episode start
    inner_first = samples.is_first[:, 1:].numpy()
    stored_first = {
        (env, int(v)) for env in range(2) for v, f in zip(buf.observations[:, env, 0], buf.is_first[:, env], strict=True) if f
    }
    for b, t in zip(*np.nonzero(inner_first), strict=True):
        assert (int(env_ids[b, 0]), int(obs[b, t + 1])) in stored_first


def test_sampling_only_from_columns_with_enough_rows():
    buf = SequenceReplayBuffer(100, SCALAR_OBS, spaces.Discrete(2), n_envs=2, sequence_length=5, seed=1)
    with pytest.raises(ValueError, match="no env column"):
        buf.sample(4)
    # env 0 ends an episode every step (2 rows per add), env 1 never (1 row per add, plus its first row)
    _fill_counter_buffer(buf, n_steps=3, episode_lengths=[1, 100])
    np.testing.assert_array_equal(buf.env_pos, [6, 4])
    samples = buf.sample(50)
    assert (samples.observations[..., 0] < 10_000).all()


def test_same_seed_same_samples_and_reseed():
    def make(seed):
        buf = SequenceReplayBuffer(40, SCALAR_OBS, spaces.Discrete(2), n_envs=2, sequence_length=4, seed=seed)
        _fill_counter_buffer(buf, n_steps=30, episode_lengths=[5, 3])
        return buf

    a, b = make(3), make(3)
    for _ in range(3):
        sa, sb = a.sample(16), b.sample(16)
        for field_a, field_b in zip(sa, sb, strict=True):
            assert th.equal(field_a, field_b)
    a.seed(7)
    b.seed(7)
    assert th.equal(a.sample(8).observations, b.sample(8).observations)


def test_uint8_images_memory_and_lazy_allocation():
    image = spaces.Box(0, 255, (1, 64, 64), np.uint8)
    big = SequenceReplayBuffer(2_000_000, image, spaces.Discrete(6), sequence_length=50)
    assert big.nbytes() == 0  # lazy: nothing allocated before the first add
    assert big.capacity * big.bytes_per_step <= 1.1 * 2_000_000 * 4096

    buf = SequenceReplayBuffer(1000, image, spaces.Discrete(6), n_envs=2, sequence_length=3)
    assert buf.nbytes() == 0
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 256, (2, 1, 64, 64), dtype=np.uint8)
    for _ in range(4):
        next_obs = rng.integers(0, 256, (2, 1, 64, 64), dtype=np.uint8)
        buf.add(obs, next_obs, np.array([1, 5]), np.zeros(2), np.zeros(2, bool), [{}, {}])
        obs = next_obs
    assert buf.observations.dtype == np.uint8
    assert buf.nbytes() == buf.capacity * buf.bytes_per_step
    assert buf.nbytes() / buf.capacity <= 1.1 * 4096
    np.testing.assert_array_equal(buf.observations[4], obs)
    samples = buf.sample(5)
    assert samples.observations.dtype == th.uint8 and samples.observations.shape == (5, 3, 1, 64, 64)
    assert samples.actions.dtype == th.float32 and samples.actions.shape == (5, 3, 1)
    assert samples.rewards.dtype == th.float32 and samples.is_terminal.dtype == th.bool


def test_dict_obs_and_box_actions():
    obs_space = spaces.Dict({"image": spaces.Box(0, 255, (3, 8, 8), np.uint8), "vec": spaces.Box(-1, 1, (5,), np.float32)})
    action_space = spaces.Box(-1, 1, (2,), np.float32)
    buf = SequenceReplayBuffer(64, obs_space, action_space, n_envs=2, sequence_length=3, seed=0)

    def obs_at(k):
        return {
            "image": np.full((2, 3, 8, 8), k, np.uint8) + np.arange(2, dtype=np.uint8)[:, None, None, None] * 100,
            "vec": np.full((2, 5), k / 10, np.float32),
        }

    for k in range(5):
        action = np.array([[0.5, -0.5], [k / 10, 1.0]], np.float32)
        buf.add(obs_at(k), obs_at(k + 1), action, np.full(2, k, np.float32), np.zeros(2, bool), [{}, {}])
    assert buf.observations["image"].dtype == np.uint8 and buf.observations["vec"].dtype == np.float32
    assert buf.actions.shape[-1] == 2
    np.testing.assert_array_equal(
        buf.actions[:6, 1], np.array([[0, 0], [0, 1], [0.1, 1], [0.2, 1], [0.3, 1], [0.4, 1]], np.float32)
    )
    assert buf.bytes_per_step == 3 * 64 + 5 * 4 + 2 * 4 + 4 + 3

    samples = buf.sample(20)
    image, vec = samples.observations["image"], samples.observations["vec"]
    assert image.shape == (20, 3, 3, 8, 8) and image.dtype == th.uint8
    assert vec.shape == (20, 3, 5) and vec.dtype == th.float32
    assert samples.actions.shape == (20, 3, 2)
    step = image[:, :, 0, 0, 0].long() % 100  # [B, T] step counter, env id in the hundreds
    assert (step.diff(dim=1) == 1).all()
    assert th.allclose(vec[:, :, 0], step.float() / 10)
    assert th.equal(samples.rewards[:, 1:], (step[:, 1:] - 1).float())  # reward r_t of row t was received at step t-1


def test_bool_obs_and_multidiscrete_actions():
    obs_space = spaces.Box(0, 1, (10, 10, 4), bool)
    buf = SequenceReplayBuffer(32, obs_space, spaces.MultiDiscrete([3, 4]), sequence_length=2)
    obs = np.zeros((1, 10, 10, 4), bool)
    next_obs = obs.copy()
    next_obs[0, 1, 2, 3] = True
    buf.add(obs, next_obs, np.array([[2, 3]]), np.array([1.5]), np.array([True]), [{}])
    assert buf.observations.dtype == np.bool_
    np.testing.assert_array_equal(buf.actions[:2, 0], [[0, 0], [2, 3]])
    assert buf.bytes_per_step == 400 + 2 * 4 + 4 + 3
    samples = buf.sample(3)
    assert samples.observations.dtype == th.bool and samples.observations.shape == (3, 2, 10, 10, 4)
    assert samples.observations[:, 1, 1, 2, 3].all() and not samples.observations[:, 0].any()
    assert samples.is_terminal[:, 1].all() and samples.is_last[:, 1].all()
    assert th.equal(samples.actions[:, 1], th.tensor([[2.0, 3.0]] * 3))


def test_pickles_hold_only_the_rows_written(tmp_path):
    image = spaces.Box(0, 255, (8, 8, 3), np.uint8)
    buf = SequenceReplayBuffer(1000, image, spaces.Discrete(3), n_envs=2, sequence_length=4, seed=3)
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    for step in range(60):
        next_obs = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
        done = np.array([step % 17 == 16, False])
        buf.add(obs, next_obs, np.array([step % 3, 1]), np.ones(2), done, [{}, {}])
        obs = np.where(done[:, None, None, None], rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), next_obs)
    assert buf.env_pos.tolist() == [64, 61] and buf._written_rows() == 64  # 60 steps + the first row of each episode
    path = tmp_path / "partial.pkl"
    save_to_pkl(path, buf)
    full_size = buf.nbytes()  # 500 rows x 2 envs allocated
    assert path.stat().st_size < 0.2 * full_size  # 64 of 500 rows, plus pickle overhead
    loaded = load_from_pkl(path)
    assert loaded.observations.shape == buf.observations.shape and loaded.nbytes() == full_size
    for name in ("observations", "actions", "rewards", "is_first", "is_terminal", "is_last"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(buf, name))  # the unwritten rows are zeros again
    for field_a, field_b in zip(buf.sample(8), loaded.sample(8), strict=True):
        assert th.equal(field_a, field_b)
    for step in range(500):  # past the end: env 0 wraps around, and then the whole capacity is pickled
        obs = np.full((2, 8, 8, 3), step % 256, np.uint8)
        buf.add(obs, obs, np.array([0, 0]), np.zeros(2), np.array([False, False]), [{}, {}])
    assert buf.env_full.all() and buf._written_rows() == buf.rows
    save_to_pkl(path, buf)
    assert path.stat().st_size > full_size
    wrapped = load_from_pkl(path)
    np.testing.assert_array_equal(wrapped.observations, buf.observations)
    np.testing.assert_array_equal(wrapped.env_pos, buf.env_pos)


def test_save_load_round_trip(tmp_path):
    buf = SequenceReplayBuffer(40, SCALAR_OBS, spaces.Discrete(2), n_envs=2, sequence_length=4, seed=11)
    empty_path = tmp_path / "empty.pkl"
    save_to_pkl(empty_path, buf)
    empty = load_from_pkl(empty_path)
    assert empty.nbytes() == 0 and empty.size() == 0

    _fill_counter_buffer(buf, n_steps=27, episode_lengths=[5, 9])
    buf.sample(3)  # advance the rng before saving
    path = tmp_path / "buffer.pkl"
    save_to_pkl(path, buf)
    loaded = load_from_pkl(path)
    assert isinstance(loaded, SequenceReplayBuffer)
    np.testing.assert_array_equal(loaded.env_pos, buf.env_pos)
    np.testing.assert_array_equal(loaded.env_full, buf.env_full)
    np.testing.assert_array_equal(loaded.needs_first, buf.needs_first)
    assert loaded.nbytes() == buf.nbytes() and loaded.size() == buf.size()
    for _ in range(2):
        for field_a, field_b in zip(buf.sample(10), loaded.sample(10), strict=True):
            assert th.equal(field_a, field_b)
    # adding after load continues the same trajectories: one row per env (plus a first row where an episode just ended)
    envs = np.arange(2)
    last_obs = loaded.observations[(loaded.env_pos - 1) % loaded.rows, envs, 0]
    expected_pos = (loaded.env_pos + 1 + loaded.needs_first) % loaded.rows
    _add(loaded, last_obs, last_obs + 1, [0, 0], [0, 0], [False, False])
    np.testing.assert_array_equal(loaded.env_pos, expected_pos)
    assert not loaded.is_first[(expected_pos - 1) % loaded.rows, envs].any()


def test_inherited_transition_sampling_is_refused():
    buf = SequenceReplayBuffer(10, SCALAR_OBS, spaces.Discrete(2), sequence_length=2)
    with pytest.raises(NotImplementedError, match="sample"):
        buf._get_samples(np.array([0]))


def test_vec_normalize_statistics_apply_at_sampling_time():
    """Raw values are stored; ``sample(env=VecNormalize)`` normalizes them with the env's current statistics."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    venv = VecNormalize(DummyVecEnv([lambda: gym.make("CartPole-v1")]), norm_obs=True, norm_reward=True, clip_obs=1e6)
    venv.obs_rms.mean[:] = [1.0, 2.0, 3.0, 4.0]
    venv.obs_rms.var[:] = [4.0, 4.0, 4.0, 4.0]
    venv.ret_rms.var = np.array(16.0)
    space = spaces.Box(-1e6, 1e6, (4,), np.float32)
    buf = SequenceReplayBuffer(50, space, spaces.Discrete(2), n_envs=1, sequence_length=3, seed=0)
    for t in range(6):
        obs = np.full((1, 4), t, np.float32)
        buf.add(obs, obs + 1, np.array([0]), np.array([2.0], np.float32), np.array([False]), [{}])
    buf.rng = np.random.default_rng(0)
    normalized = buf.sample(4, env=venv)
    buf.rng = np.random.default_rng(0)
    raw = buf.sample(4)  # the same windows
    assert buf.observations.max() == 6  # stored raw
    expected = (raw.observations.numpy() - np.array([1.0, 2.0, 3.0, 4.0])) / np.sqrt(4.0 + venv.epsilon)
    np.testing.assert_allclose(normalized.observations.numpy(), expected, rtol=1e-5)
    assert normalized.observations.dtype == th.float32
    # rewards are divided by the return std (no centring)
    np.testing.assert_allclose(normalized.rewards.numpy(), raw.rewards.numpy() / np.sqrt(16.0 + venv.epsilon), rtol=1e-5)
