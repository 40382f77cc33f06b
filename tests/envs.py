"""Small deterministic environments for the tests."""

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class CountingEnv(gym.Env):
    """Observation = (step counter, episode length); any action; ends by termination after ``length`` steps.

    :param length: steps per episode
    :param truncate: end episodes by truncation instead of termination
    :param obs_space: ``"vector"``, ``"image"`` (64x64x1 uint8, channel-last), ``"dict"`` or ``"grid"`` (bool 10x10x4)
    :param action_space: the action space (default ``Discrete(2)``)
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, length: int = 20, truncate: bool = False, obs_space: str = "vector",
                 action_space: spaces.Space | None = None, render_mode: str | None = None) -> None:
        self.length, self.truncate, self.kind = length, truncate, obs_space
        self.action_space = action_space if action_space is not None else spaces.Discrete(2)
        vector = spaces.Box(-1.0, 1.0, (3,), np.float32)
        image = spaces.Box(0, 255, (64, 64, 1), np.uint8)
        self.observation_space = {
            "vector": vector,
            "image": image,
            "dict": spaces.Dict({"image": spaces.Box(0, 255, (16, 16, 3), np.uint8), "state": vector}),
            "grid": spaces.Box(0, 1, (10, 10, 4), bool),
        }[obs_space]
        self.render_mode = render_mode
        self.t = 0

    def _obs(self) -> Any:
        phase = self.t / self.length
        vector = np.array([phase, 1.0 - phase, 0.5], np.float32)
        if self.kind == "vector":
            return vector
        if self.kind == "image":
            return np.full((64, 64, 1), int(255 * phase), np.uint8)
        if self.kind == "grid":
            grid = np.zeros((10, 10, 4), bool)
            grid[self.t % 10, :, 0] = True
            return grid
        return {"image": np.full((16, 16, 3), int(255 * phase), np.uint8), "state": vector}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        self.t += 1
        done = self.t >= self.length
        reward = 1.0 if done else 0.1
        return self._obs(), reward, done and not self.truncate, done and self.truncate, {}

    def render(self) -> np.ndarray:
        return np.zeros((32, 32, 3), np.uint8)
