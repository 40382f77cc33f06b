"""Sequence replay buffer for DreamerV2.

Layout
------
Storage is organised in ``n_envs`` env *columns* of ``rows = max(buffer_size // n_envs, sequence_length)`` rows each.
Every array is ``[rows, n_envs, ...]`` and every env column is its own ring buffer, with its own write head
``env_pos[i]`` and its own ``env_full[i]`` flag. Heads are per env because an env writes one extra row at the start of
each episode, so columns advance at different speeds.

Row convention (Dreamer's, see :class:`~sb3_dreamer.common.type_aliases.SequenceSamples`)
-----------------------------------------------------------------------------------------
Row ``t`` holds the observation x_t, the action a_{t-1} that led to it (zeros where ``is_first``), the reward r_t received
on arriving at x_t (zero where ``is_first``) and the flags of x_t: ``is_first`` (first step of an episode),
``is_terminal`` (the episode ended here by termination) and ``is_last`` (it ended here, by termination or truncation).
An episode of n transitions therefore takes n + 1 rows: its reset observation, then one row per ``env.step``.

Memory
------
Each observation is stored once (no ``next_observations`` copy), in the observation space's own dtype (uint8 images
stay uint8, bool grids stay bool). Per env step we store the observation, ``action_dim`` float32 actions, one float32
reward and three bool flags: a (1, 64, 64) uint8 observation with a Discrete action costs 4096 + 4 + 4 + 3 bytes.
Arrays are allocated on the first :meth:`SequenceReplayBuffer.add`, so a model loaded for inference costs nothing.
"""

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer, ReplayBuffer
from stable_baselines3.common.vec_env import VecNormalize

from sb3_dreamer.common.type_aliases import SequenceSamples

ObsArray = np.ndarray | dict[str, np.ndarray]


class SequenceReplayBuffer(ReplayBuffer):
    """
    Replay buffer storing per-env time series and sampling fixed-length windows of consecutive steps.

    It subclasses :class:`~stable_baselines3.common.buffers.ReplayBuffer` only so that SB3's ``load_replay_buffer``
    accepts it; it does not allocate ``ReplayBuffer``'s arrays.

    :param buffer_size: Max number of rows over all envs (each env column gets ``buffer_size // n_envs`` rows,
        at least ``sequence_length``)
    :param observation_space: Observation space (Box, Discrete, MultiBinary, ... or a Dict of those)
    :param action_space: Action space
    :param device: PyTorch device to which sampled tensors are moved
    :param n_envs: Number of parallel environments
    :param optimize_memory_usage: Accepted for SB3 compatibility, ignored (each observation is stored once anyway)
    :param handle_timeout_termination: Accepted for SB3 compatibility, ignored (truncation is always tracked)
    :param sequence_length: Length T of the sampled windows
    :param seed: Seed of the buffer's own random generator
    """

    observations: ObsArray | None  # [rows, n_envs, *obs_shape] (one array per key for Dict spaces)
    actions: np.ndarray | None  # [rows, n_envs, action_dim] float32
    rewards: np.ndarray | None  # [rows, n_envs] float32
    is_first: np.ndarray | None  # [rows, n_envs] bool
    is_terminal: np.ndarray | None  # [rows, n_envs] bool
    is_last: np.ndarray | None  # [rows, n_envs] bool

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        sequence_length: int = 50,
        seed: int | None = None,
    ):
        BaseBuffer.__init__(self, buffer_size, observation_space, action_space, device, n_envs=n_envs)
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        self.sequence_length = sequence_length
        self.rows = max(buffer_size // n_envs, sequence_length)
        self.buffer_size = self.rows  # SB3 convention: rows per env column
        self.optimize_memory_usage = optimize_memory_usage
        self.handle_timeout_termination = handle_timeout_termination
        self.is_dict_obs = isinstance(observation_space, spaces.Dict)
        self.obs_specs = self._obs_specs()  # {key or None: (shape, dtype)}
        self.observations = self.actions = self.rewards = None
        self.is_first = self.is_terminal = self.is_last = None
        self.rng = np.random.default_rng(seed)
        self.reset()

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget all stored rows (allocated arrays are kept and overwritten)."""
        super().reset()
        self.env_pos = np.zeros(self.n_envs, dtype=np.int64)  # next row to write, per env column
        self.env_full = np.zeros(self.n_envs, dtype=bool)  # whether the column has wrapped around
        self.needs_first = np.ones(self.n_envs, dtype=bool)  # next add starts an episode for that env

    def seed(self, seed: int | None = None) -> None:
        """
        Reseed the buffer's random generator.

        :param seed: Seed (None for fresh entropy)
        """
        self.rng = np.random.default_rng(seed)

    def _stored_rows(self) -> np.ndarray:
        return np.where(self.env_full, self.rows, self.env_pos)  # [n_envs]

    def size(self) -> int:
        """:return: Total number of rows stored over all env columns"""
        return int(self._stored_rows().sum())

    def can_sample(self) -> bool:
        """:return: Whether some env column holds at least ``sequence_length`` rows (a window can be sampled)"""
        return bool(np.any(self._stored_rows() >= self.sequence_length))

    @property
    def capacity(self) -> int:
        """:return: Total number of rows the buffer can hold (``rows * n_envs``)"""
        return self.rows * self.n_envs

    def _obs_specs(self) -> dict[str | None, tuple[tuple[int, ...], np.dtype]]:
        space_dict = self.observation_space.spaces if self.is_dict_obs else {None: self.observation_space}
        shapes = self.obs_shape if self.is_dict_obs else {None: self.obs_shape}
        return {key: (tuple(shapes[key]), np.dtype(space.dtype)) for key, space in space_dict.items()}  # type: ignore[index]

    @property
    def bytes_per_step(self) -> int:
        """:return: Bytes stored per row of one env column (observation, actions, reward and three flags)"""
        obs_bytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.obs_specs.values())
        return obs_bytes + 4 * self.action_dim + 4 + 3

    def nbytes(self) -> int:
        """:return: Bytes of all allocated arrays (0 before the first ``add``)"""
        if self.actions is None:
            return 0
        obs = self.observations.values() if isinstance(self.observations, dict) else [self.observations]
        arrays = [*obs, self.actions, self.rewards, self.is_first, self.is_terminal, self.is_last]
        return int(sum(arr.nbytes for arr in arrays))  # type: ignore[union-attr]

    def _allocate(self) -> None:
        shape = (self.rows, self.n_envs)
        obs = {key: np.zeros((*shape, *s), dtype=dt) for key, (s, dt) in self.obs_specs.items()}
        self.observations = obs if self.is_dict_obs else obs[None]
        self.actions = np.zeros((*shape, self.action_dim), dtype=np.float32)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.is_first = np.zeros(shape, dtype=bool)
        self.is_terminal = np.zeros(shape, dtype=bool)
        self.is_last = np.zeros(shape, dtype=bool)

    # ------------------------------------------------------------------ pickling (save_replay_buffer, checkpoints)
    _ROW_ARRAYS = ("actions", "rewards", "is_first", "is_terminal", "is_last")

    def _written_rows(self) -> int:
        """Rows 0..n-1 hold everything written so far in every env column (all rows once a column wrapped)."""
        return self.rows if self.env_full.any() else int(self.env_pos.max())

    def __getstate__(self) -> dict[str, Any]:
        """The buffer without the rows never written: a checkpoint of a buffer filled to 10 % is about 10 % its size."""
        state = self.__dict__.copy()
        if self.actions is None:
            return state
        written = self._written_rows()
        for name in self._ROW_ARRAYS:
            state[name] = getattr(self, name)[:written]
        obs = {key: arr[:written] for key, arr in self._obs_arrays().items()}
        state["observations"] = obs if self.is_dict_obs else obs[None]
        state["_pickled_rows"] = written
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        written = state.pop("_pickled_rows", None)
        self.__dict__.update(state)
        if written is None:  # not allocated yet, or pickled whole (older files)
            return
        stored = {name: getattr(self, name) for name in self._ROW_ARRAYS}
        stored_obs = self._obs_arrays()
        self._allocate()  # full capacity again (np.zeros: the rows not written cost no memory until used)
        for name, arr in stored.items():
            getattr(self, name)[:written] = arr
        for key, arr in self._obs_arrays().items():
            arr[:written] = stored_obs[key]

    # ------------------------------------------------------------------ adding
    def _as_env_obs(self, obs: ObsArray) -> dict[str | None, np.ndarray]:
        """Observation(s) as ``{key: [n_envs, *shape]}`` (key ``None`` for non-Dict spaces)."""
        obs_dict = obs if self.is_dict_obs else {None: obs}
        return {key: np.asarray(obs_dict[key]).reshape((self.n_envs, *s)) for key, (s, _) in self.obs_specs.items()}

    def _obs_arrays(self) -> dict[str | None, np.ndarray]:
        return self.observations if self.is_dict_obs else {None: self.observations}  # type: ignore[return-value]

    def _write(self, envs: np.ndarray, obs: dict, action: Any, reward: Any, first: bool, terminal: Any, last: Any) -> None:
        """Write one row in each env column of ``envs`` (obs values are ``[len(envs), *shape]``) and advance their heads."""
        rows = self.env_pos[envs]
        for key, arr in self._obs_arrays().items():
            arr[rows, envs] = obs[key]
        self.actions[rows, envs] = action  # type: ignore[index]
        self.rewards[rows, envs] = reward  # type: ignore[index]
        self.is_first[rows, envs] = first  # type: ignore[index]
        self.is_terminal[rows, envs] = terminal  # type: ignore[index]
        self.is_last[rows, envs] = last  # type: ignore[index]
        rows = rows + 1
        wrapped = rows == self.rows
        self.env_full[envs[wrapped]] = True
        self.env_pos[envs] = np.where(wrapped, 0, rows)
        self.pos, self.full = int(self.env_pos[0]), bool(self.env_full[0])  # mirrors of env column 0 for SB3 code

    def _continues(self, obs: dict[str | None, np.ndarray], envs: np.ndarray) -> np.ndarray:
        """Whether ``obs`` of each env in ``envs`` equals the newest stored observation of its column."""
        prev = (self.env_pos[envs] - 1) % self.rows
        same = np.ones(len(envs), dtype=bool)
        for key, arr in self._obs_arrays().items():
            stored, new = arr[prev, envs].reshape(len(envs), -1), obs[key][envs].reshape(len(envs), -1)
            equal = stored == new
            if np.issubdtype(stored.dtype, np.floating):
                equal |= np.isnan(stored) & np.isnan(new)
            same &= equal.all(axis=1)
        return same

    def add(
        self,
        obs: ObsArray,
        next_obs: ObsArray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        """
        Store one ``env.step`` of every env (arrays have a leading ``n_envs`` dim, dicts of those for Dict spaces).

        At the start of an episode (first add for that env, previous add had ``done``, or ``obs`` differs from the
        newest stored observation, e.g. after an env reset between two ``learn`` calls) the row
        ``(obs, zero action, reward 0, is_first)`` is written first; then ``(next_obs, action, reward, flags)``.

        :param obs: Observations before the step
        :param next_obs: Observations after the step (the real terminal observation at ``done``)
        :param action: Buffer actions taken
        :param reward: Rewards received
        :param done: Whether the episode ended (termination or truncation)
        :param infos: Info dicts; ``TimeLimit.truncated`` marks truncation
        """
        if self.actions is None:
            self._allocate()
        if isinstance(infos, dict):  # BaseBuffer.extend with n_envs=1 passes single dicts
            infos = [infos]
        obs_d, next_obs_d = self._as_env_obs(obs), self._as_env_obs(next_obs)
        action = np.asarray(action).reshape((self.n_envs, self.action_dim))
        reward = np.asarray(reward, dtype=np.float32).reshape(self.n_envs)
        done = np.asarray(done, dtype=bool).reshape(self.n_envs)
        truncated = np.array([bool(info.get("TimeLimit.truncated", False)) for info in infos], dtype=bool)

        envs = np.arange(self.n_envs)
        starts = self.needs_first.copy()
        if not starts.all():
            cont = envs[~starts]
            broken = cont[~self._continues(obs_d, cont)]
            if len(broken) > 0:  # trajectory cut (env reset outside of done): close it as truncated
                self.is_last[(self.env_pos[broken] - 1) % self.rows, broken] = True  # type: ignore[index]
                starts[broken] = True
        if starts.any():
            first = envs[starts]
            self._write(first, {k: v[first] for k, v in obs_d.items()}, 0.0, 0.0, True, False, False)
        self._write(envs, next_obs_d, action, reward, False, done & ~truncated, done)
        self.needs_first = done.copy()

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, env: VecNormalize | None = None) -> SequenceSamples:  # type: ignore[override]
        """
        Sample windows of ``sequence_length`` consecutive rows of one env column, uniformly over all valid windows.

        Windows never cross a column's write head and never mix env columns, but may cross episode boundaries.
        ``is_first[:, 0]`` is forced True (and ``actions[:, 0]`` zeroed) since the model starts from a zero state.

        :param batch_size: Number B of windows
        :param env: the VecNormalize wrapper, if any: observations and rewards are stored raw and normalized here with
            its current statistics (as SB3's ReplayBuffer does)
        :return: ``SequenceSamples`` of ``[B, T, ...]`` tensors on ``self.device``
        """
        T = self.sequence_length
        counts = np.maximum(self._stored_rows() - T + 1, 0)  # [n_envs] valid window starts per column
        total = int(counts.sum())
        if total == 0:
            raise ValueError(
                f"Cannot sample windows of {T} steps: no env column holds {T} rows yet "
                f"(rows per column: {self._stored_rows().tolist()})"
            )
        flat = self.rng.integers(0, total, size=batch_size)  # [B] uniform over all valid windows
        ends = np.cumsum(counts)
        env_idx = np.searchsorted(ends, flat, side="right")  # [B]
        offset = flat - (ends[env_idx] - counts[env_idx])  # [B] chronological offset from the column's oldest row
        oldest = np.where(self.env_full, self.env_pos, 0)  # [n_envs]
        rows = (oldest[env_idx, None] + offset[:, None] + np.arange(T)) % self.rows  # [B, T]
        cols = env_idx[:, None]  # [B, 1], broadcast against rows

        obs_arrays = {key: arr[rows, cols] for key, arr in self._obs_arrays().items()}
        rewards = self.rewards[rows, cols]  # type: ignore[index]
        if env is not None:  # VecNormalize: raw values are stored, normalized with the env's current statistics
            normalized = env.normalize_obs(obs_arrays if self.is_dict_obs else obs_arrays[None])
            obs_arrays = normalized if self.is_dict_obs else {None: normalized}  # type: ignore[dict-item]
            rewards = env.normalize_reward(rewards).astype(np.float32)
        obs = {key: th.as_tensor(arr, device=self.device) for key, arr in obs_arrays.items()}
        actions = self.actions[rows, cols]  # type: ignore[index]
        actions[:, 0] = 0.0
        is_first = self.is_first[rows, cols]  # type: ignore[index]
        is_first[:, 0] = True
        return SequenceSamples(
            observations=obs if self.is_dict_obs else obs[None],  # type: ignore[arg-type]
            actions=th.as_tensor(actions, device=self.device),
            rewards=th.as_tensor(rewards, device=self.device),
            is_first=th.as_tensor(is_first, device=self.device),
            is_terminal=th.as_tensor(self.is_terminal[rows, cols], device=self.device),  # type: ignore[index]
            is_last=th.as_tensor(self.is_last[rows, cols], device=self.device),  # type: ignore[index]
        )

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None):  # type: ignore[override]
        raise NotImplementedError(
            "SequenceReplayBuffer samples windows of consecutive steps with sample(batch_size); "
            "transition-level _get_samples (ReplayBufferSamples) is not supported"
        )
