"""DreamerV2 on a CUDA device (skipped without one; run on a lent GPU machine, CI has none)."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from envs import CountingEnv
from gymnasium import spaces

from sb3_dreamer import DreamerV2

pytestmark = pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("policy, make_env", [
    ("CnnPolicy", lambda: CountingEnv(obs_space="image")),
    ("MlpPolicy", lambda: gym.make("Pendulum-v1")),
])
def test_learn_save_load_across_devices(policy, make_env, tiny_kwargs, tmp_path):
    model = DreamerV2(policy, make_env(), seed=0, **{**tiny_kwargs, "device": "cuda"})
    model.learn(150)
    assert model._n_updates > 0
    assert all(p.device.type == "cuda" for p in model.policy.parameters())
    assert all(np.isfinite(v) for k, v in model.logger.name_to_value.items() if k.startswith("train/"))
    batch = model.replay_buffer.sample(2)
    assert batch.observations.device.type == "cuda"  # replay stays in host memory; the batch is moved once

    model.save(tmp_path / "model.zip")
    on_cpu = DreamerV2.load(tmp_path / "model.zip", env=make_env(), device="cpu")
    for key, value in model.policy.state_dict().items():
        th.testing.assert_close(on_cpu.policy.state_dict()[key], value.cpu(), msg=key)
    obs, _ = make_env().reset(seed=1)
    action, state = on_cpu.predict(obs, deterministic=True)
    assert make_env().action_space.contains(action)

    back = DreamerV2.load(tmp_path / "model.zip", env=make_env(), device="cuda")
    back.learn(50, reset_num_timesteps=False)  # optimizer state restored onto the GPU
    assert back._n_updates > model._n_updates


def test_bf16_autocast_on_cuda(tiny_kwargs):
    model = DreamerV2("CnnPolicy", CountingEnv(obs_space="image", action_space=spaces.Discrete(3)), seed=0,
                      precision="bf16", **{**tiny_kwargs, "device": "cuda"})
    dtypes = []
    model.policy.world_model.reward_head[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    model.learn(150)
    assert th.bfloat16 in dtypes  # training forward passes
    assert dtypes[-1] == th.bfloat16
    assert all(p.dtype == th.float32 for p in model.policy.parameters())
    assert all(np.isfinite(v) for k, v in model.logger.name_to_value.items() if k.startswith("train/"))
