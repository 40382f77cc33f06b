"""DreamerV2 on a CUDA device (skipped without one; run on a lent GPU machine, CI has none)."""

import copy
import os
import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from envs import CountingEnv
from gymnasium import spaces

from sb3_dreamer import DreamerV2
from sb3_dreamer.dreamerv2.dreamerv2 import EAGER_STEPS_BEFORE_CAPTURE, TORCH_OPTIMIZERS

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


def _snapshot(model: DreamerV2) -> dict:
    return {"policy": copy.deepcopy(model.policy.state_dict()),
            **{name: copy.deepcopy(getattr(model.policy, name).state_dict()) for name in TORCH_OPTIMIZERS}}


def _restore(model: DreamerV2, snapshot: dict) -> None:
    model.policy.load_state_dict(snapshot["policy"])  # in place: the parameters the graphs read stay the same tensors
    for name in TORCH_OPTIMIZERS:
        getattr(model.policy, name).load_state_dict(snapshot[name])


@pytest.mark.parametrize("policy, env, kwargs", [
    ("CnnPolicy", lambda: CountingEnv(obs_space="image"), {}),  # Reinforce actor
    ("MlpPolicy", lambda: gym.make("Pendulum-v1"), {"return_normalization": True}),  # dynamics backpropagation
])
def test_graphed_update_computes_the_eager_update(policy, env, kwargs, tiny_kwargs):
    # Learning rates and weight decay 0: every run starts from the parameters it is given, so sampled latents and
    # actions cannot flip on the last-bit differences of non-deterministic gradient kernels (atomics) between runs.
    model = DreamerV2(policy, env(), seed=0, learning_rate=0.0, actor_lr=0.0, critic_lr=0.0, weight_decay=0.0,
                      **{**tiny_kwargs, "device": "cuda", **kwargs})
    model.learn(150)  # eager steps (library handles, optimizer state, cached gather tables), a filled buffer
    batch = model.replay_buffer.sample(4)
    entropy_coef, reinforce_mix = 3e-3, model.reinforce_mix()
    before, rng = _snapshot(model), th.cuda.get_rng_state()
    params = [p for name in TORCH_OPTIMIZERS for group in getattr(model.policy, name).param_groups for p in group["params"]]

    def run(update, scale=1.0):
        _restore(model, before)
        with th.no_grad():  # other weights than at capture: replays must read the current ones
            for param in model.policy.parameters():
                param.mul_(scale)
        th.cuda.set_rng_state(rng)
        metrics = update(batch, entropy_coef, reinforce_mix)
        return metrics, [p.grad.clone() for p in params]

    model.cuda_graph = True
    graphed, graphed_grads = run(model._graphed_update)  # capture, then the first replay
    graphs = model._graphs
    replayed, replayed_grads = run(model._graphed_update)
    assert model._graphs is graphs  # replayed, not captured again
    assert all(p.grad is grad for p, grad in graphs.grads)  # the optimizers read the graphs' gradient memory
    changed, changed_grads = run(model._graphed_update, scale=1.1)
    eager, eager_grads = run(model._update, scale=1.1)  # its zero_grad(set_to_none=True) cuts the graphs' grads loose
    assert not graphs.fits(reinforce_mix < 1)

    assert set(changed) == set(eager)
    for key in eager:
        th.testing.assert_close(replayed[key], graphed[key], rtol=1e-5, atol=1e-6, msg=key)  # replays are deterministic
        th.testing.assert_close(changed[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
    assert all(grad.abs().sum() > 0 for grad in eager_grads[:3])
    for graph_grad, replay_grad in zip(graphed_grads, replayed_grads, strict=True):
        th.testing.assert_close(replay_grad, graph_grad, rtol=1e-4, atol=1e-6)
    for changed_grad, eager_grad in zip(changed_grads, eager_grads, strict=True):
        th.testing.assert_close(changed_grad, eager_grad, rtol=1e-4, atol=1e-6)

    graphed_again, _ = run(model._graphed_update, scale=1.1)  # captured again (the gradients were replaced)
    assert model._graphs is not graphs
    for key in eager:
        th.testing.assert_close(graphed_again[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_pass_that_cannot_be_captured_raises_a_clear_error():
    # in a fresh process: a failed capture can leave the CUDA random number generator unusable
    script = textwrap.dedent("""
        import torch as th
        from envs import CountingEnv
        from sb3_dreamer import DreamerV2
        from conftest import TINY
        model = DreamerV2("CnnPolicy", CountingEnv(obs_space="image"), seed=0, cuda_graph=True,
                          **{**TINY, "device": "cuda"})
        loss = model.policy.world_model.loss
        def synchronizing_loss(*args, **kwargs):
            out = loss(*args, **kwargs)
            out[0].item()  # a host synchronization: not allowed while capturing
            return out
        model.policy.world_model.loss = synchronizing_loss
        try:
            model.learn(300)
        except RuntimeError as error:
            print("RAISED", model._n_updates, error)
    """)
    tests = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", script], cwd=tests, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests),
                                                                           os.environ.get("PYTHONPATH", "")])})
    assert f"RAISED {EAGER_STEPS_BEFORE_CAPTURE} DreamerV2 could not capture" in out.stdout, out.stderr[-2000:]
    assert "train with cuda_graph=False" in out.stdout


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_learn_with_cuda_graphs_saves_loads_and_learns_on(precision, tiny_kwargs, tmp_path):
    model = DreamerV2("CnnPolicy", CountingEnv(obs_space="image"), seed=0, precision=precision, cuda_graph=True,
                      **{**tiny_kwargs, "device": "cuda"})
    model.learn(300)
    assert model._n_updates > EAGER_STEPS_BEFORE_CAPTURE and model._graphs is not None
    assert all(np.isfinite(v) for k, v in model.logger.name_to_value.items() if k.startswith("train/"))
    model.save(tmp_path / "model.zip")
    loaded = DreamerV2.load(tmp_path / "model.zip", env=CountingEnv(obs_space="image"))
    assert loaded.cuda_graph is True and loaded._graphs is None
    params = copy.deepcopy(loaded.policy.state_dict())
    loaded.learn(100, reset_num_timesteps=False)
    assert loaded._graphs is not None
    assert any(not th.equal(value, params[key]) for key, value in loaded.policy.state_dict().items())
