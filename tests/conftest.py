import os
import sys

import gymnasium as gym
import pytest
import torch as th

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("MPLBACKEND", "Agg")
th.set_num_threads(1)  # the suite runs one process per core (pytest -n 2)


def _register_minatar() -> None:
    if "MinAtar/Breakout-v1" not in gym.registry:
        import minatar.gym

        minatar.gym.register_envs()


_register_minatar()

#: A model small enough for learn() to run in a second or two on a CPU.
TINY_POLICY = dict(deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_layers=1, mlp_units=32, cnn_depth=4)
TINY = dict(
    learning_starts=64, batch_size=4, sequence_length=8, imagination_horizon=3, train_freq=4, buffer_size=2000,
    policy_kwargs=TINY_POLICY, device="cpu",
)


@pytest.fixture
def tiny_kwargs() -> dict:
    return {**TINY, "policy_kwargs": dict(TINY_POLICY)}
