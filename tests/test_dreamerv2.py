"""DreamerV2 as an SB3 algorithm: learn/predict across spaces, save/load, callbacks, seeding, VecEnvs."""

import os
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from envs import CountingEnv
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_dreamer import DreamerV2, SequenceReplayBuffer
from sb3_dreamer.dreamerv2 import dreamerv2 as dreamerv2_module


def rollout_actions(model: DreamerV2, env: gym.Env, steps: int = 20) -> list:
    """Deterministic actions over a recurrent rollout (state threaded through predict)."""
    obs, _ = env.reset(seed=3)
    state, start, actions = None, np.ones(1, bool), []
    for _ in range(steps):
        action, state = model.predict(obs[None] if not isinstance(obs, dict) else {k: v[None] for k, v in obs.items()},
                                      state=state, episode_start=start, deterministic=True)
        actions.append(action[0].tolist())
        obs, _, terminated, truncated, _ = env.step(action[0])
        start = np.array([terminated or truncated])
        if start[0]:
            obs, _ = env.reset()
    return actions


ENVS = {
    "cartpole-mlp": ("MlpPolicy", lambda: gym.make("CartPole-v1")),
    "minatar-cnn-bool": ("CnnPolicy", lambda: gym.make("MinAtar/Breakout-v1")),
    "image64-cnn": ("CnnPolicy", lambda: CountingEnv(obs_space="image")),
    "pendulum-box": ("MlpPolicy", lambda: gym.make("Pendulum-v1")),
    "dict-multiinput": ("MultiInputPolicy", lambda: CountingEnv(obs_space="dict")),
    "multidiscrete": ("MlpPolicy", lambda: CountingEnv(action_space=spaces.MultiDiscrete([3, 2]))),
}


@pytest.mark.parametrize("name", sorted(ENVS))
def test_learn_predict_save_load(name, tiny_kwargs, tmp_path):
    policy, make_env = ENVS[name]
    model = DreamerV2(policy, make_env(), seed=0, **tiny_kwargs)
    model.learn(120)
    assert model._n_updates > 0
    assert isinstance(model.replay_buffer, SequenceReplayBuffer)

    env = make_env()
    expected = rollout_actions(model, env)
    for action in expected:
        assert env.action_space.contains(np.asarray(action, dtype=env.action_space.dtype))

    model.save(tmp_path / "model.zip")
    loaded = DreamerV2.load(tmp_path / "model.zip", env=make_env(), device="cpu")
    for key, value in model.policy.state_dict().items():
        th.testing.assert_close(loaded.policy.state_dict()[key], value, msg=key)
    for name_ in ("model_optimizer", "actor_optimizer", "critic_optimizer"):
        saved, restored = getattr(model.policy, name_).state_dict(), getattr(loaded.policy, name_).state_dict()
        assert saved["param_groups"] == restored["param_groups"]
        for index, state in saved["state"].items():
            for key, value in state.items():
                th.testing.assert_close(restored["state"][index][key], value)
    assert rollout_actions(loaded, make_env()) == expected
    assert loaded._n_updates == model._n_updates

    loaded.learn(60, reset_num_timesteps=False)  # learning goes on after loading
    assert loaded._n_updates > model._n_updates


def test_predict_handles_any_batch_and_never_touches_training_state(tiny_kwargs):
    model = DreamerV2("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2), seed=0, **tiny_kwargs)
    model.learn(100)
    training_state = tuple(x.clone() for x in model._last_state[0]), model._last_state[1].clone()
    params = {k: v.clone() for k, v in model.policy.state_dict().items()}
    for batch in (1, 3, 5):
        obs = np.random.default_rng(0).normal(size=(batch, 4)).astype(np.float32)
        actions, state = model.predict(obs, episode_start=np.ones(batch, bool))
        assert actions.shape == (batch,)
        assert [s.shape[0] for s in state] == [batch] * 3
        actions, state = model.predict(obs, state=state, episode_start=np.zeros(batch, bool))
    single, state = model.predict(np.zeros(4, np.float32))  # a single, non-vectorized observation
    assert np.asarray(single).shape == () and state[0].shape[0] == 1
    for before, after in zip(training_state[0], model._last_state[0]):
        th.testing.assert_close(before, after)
    th.testing.assert_close(training_state[1], model._last_state[1])
    for key, value in model.policy.state_dict().items():
        th.testing.assert_close(params[key], value)


def test_predict_runs_every_module_in_eval_mode(tiny_kwargs):
    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    for _ in range(2):  # the second call finds the flag already off
        model.policy.set_training_mode(True)
        model.predict(np.zeros(4, np.float32))
        assert not any(module.training for module in model.policy.modules())
        model.predict(np.zeros(4, np.float32))
        assert not any(module.training for module in model.policy.modules())


def test_predict_rejects_wrong_shapes(tiny_kwargs):
    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    with pytest.raises(ValueError):
        model.predict(np.zeros((2, 5), np.float32))
    _, state = model.predict(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="state"):
        model.predict(np.zeros((3, 4), np.float32), state=state)
    with pytest.raises(ValueError, match="episode_start"):
        model.predict(np.zeros((2, 4), np.float32), state=state, episode_start=np.ones(3, bool))


def test_deterministic_predict_resets_rows_at_episode_start(tiny_kwargs):
    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    obs = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    _, state = model.predict(obs, deterministic=True)
    _, state = model.predict(obs, state=state, episode_start=np.array([True, False]), deterministic=True)
    _, fresh = model.predict(obs[:1], deterministic=True, episode_start=np.ones(1, bool))
    np.testing.assert_allclose(state[0][0], fresh[0][0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(state[0][1], fresh[0][0])


def test_same_seed_gives_identical_results(tiny_kwargs):
    results = []
    for _ in range(2):
        model = DreamerV2("MlpPolicy", "CartPole-v1", seed=7, **tiny_kwargs)
        model.learn(150)
        results.append(th.cat([p.flatten() for p in model.policy.parameters()]))
    th.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_evaluate_policy_with_two_envs_and_eval_callback(tiny_kwargs, tmp_path):
    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    eval_env = make_vec_env("CartPole-v1", n_envs=2, seed=1)
    callback = EvalCallback(eval_env, eval_freq=80, n_eval_episodes=2, best_model_save_path=str(tmp_path),
                            log_path=str(tmp_path))
    model.learn(170, callback=callback)
    assert (tmp_path / "best_model.zip").exists() and (tmp_path / "evaluations.npz").exists()
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=4)
    assert mean > 0 and std >= 0
    best = DreamerV2.load(tmp_path / "best_model.zip")
    assert evaluate_policy(best, eval_env, n_eval_episodes=2)[0] > 0


def test_subproc_vec_env(tiny_kwargs):
    env = make_vec_env("CartPole-v1", n_envs=2, vec_env_cls=SubprocVecEnv)
    model = DreamerV2("MlpPolicy", env, seed=0, **tiny_kwargs)
    model.learn(160)
    assert model.replay_buffer.env_pos.tolist()[0] > 0 and model.replay_buffer.env_pos.tolist()[1] > 0
    env.close()


def test_set_env_and_mismatched_env_on_load(tiny_kwargs, tmp_path):
    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    model.learn(70)
    model.set_env(DummyVecEnv([lambda: gym.make("CartPole-v1")]))
    assert model._last_state is None and model._last_obs is None
    model.learn(40, reset_num_timesteps=False)
    model.save(tmp_path / "model.zip")
    with pytest.raises(ValueError):
        DreamerV2.load(tmp_path / "model.zip", env=gym.make("MountainCar-v0"))
    with pytest.raises(ValueError):
        model.set_env(gym.make("Acrobot-v1"))


def test_load_for_inference_allocates_no_replay(tiny_kwargs, tmp_path):
    model = DreamerV2("CnnPolicy", CountingEnv(obs_space="image"), seed=0, **{**tiny_kwargs, "buffer_size": 2_000_000})
    model.save(tmp_path / "model.zip")
    loaded = DreamerV2.load(tmp_path / "model.zip")
    assert loaded.replay_buffer.nbytes() == 0
    actions, _ = loaded.predict(np.zeros((1, 1, 64, 64), np.uint8))
    assert actions.shape == (1,)


def test_callbacks_stop_training_and_progress_bar(tiny_kwargs):
    class StopAt(BaseCallback):
        def _on_step(self) -> bool:
            return self.num_timesteps < 90

    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    model.learn(1000, callback=StopAt(), progress_bar=True)
    assert model.num_timesteps == 90


def test_logging_keys_and_tensorboard(tiny_kwargs, tmp_path, capsys):
    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, verbose=1, tensorboard_log=str(tmp_path), **tiny_kwargs)
    model.learn(200, log_interval=1)
    out = capsys.readouterr().out
    for key in ("model_loss", "reward_loss", "discount_loss", "kl", "prior_entropy", "posterior_entropy", "actor_loss",
                "actor_entropy", "critic_loss", "imagined_return", "value_mean", "model_grad_norm", "actor_grad_norm",
                "critic_grad_norm", "return_scale", "learning_rate", "actor_lr", "critic_lr", "obs_loss", "n_updates", "fps"):
        assert f"| {key} " in out or f"|    {key} " in out, key
    runs = os.listdir(tmp_path)
    assert runs and runs[0].startswith("DreamerV2")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / runs[0]))


def predicted_discounts(truncate: bool, tiny_kwargs: dict) -> tuple[th.Tensor, th.Tensor]:
    """Train only the model on random-action episodes of 12 steps; return (discounts, is_terminal) on a batch."""
    model = DreamerV2("MlpPolicy", CountingEnv(length=12, truncate=truncate), seed=0, gamma=0.99, discount_scale=5.0,
                      learning_rate=2e-3, **{**tiny_kwargs, "learning_starts": 600})
    model.learn(600)  # random prefill only
    assert model.replay_buffer.is_last.any()
    assert model.replay_buffer.is_terminal.any() != truncate
    model.train(gradient_steps=250, batch_size=16)
    batch = model.replay_buffer.sample(64)
    with th.no_grad():
        _, post, _ = model.policy.world_model.loss(batch, model.gamma)
        discount = model.policy.world_model.discount(model.policy.world_model.features(post))
    return discount, batch.is_terminal


def test_truncation_only_env_learns_a_discount_of_gamma(tiny_kwargs):
    """Episodes that only truncate never terminate: the discount head must predict ≈ γ everywhere."""
    discount, _ = predicted_discounts(truncate=True, tiny_kwargs=tiny_kwargs)
    assert discount.min().item() > 0.9


def test_terminal_env_learns_discount_zero_at_the_end(tiny_kwargs):
    discount, is_terminal = predicted_discounts(truncate=False, tiny_kwargs=tiny_kwargs)
    assert discount[is_terminal].mean().item() < 0.5  # target 0 (measured ≈ 0.27 after 250 steps)
    assert discount[~is_terminal].mean().item() > 0.9  # target γ = 0.99 (measured ≈ 0.96)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reward_transform="log"), "reward_transform"),
        (dict(actor_grad="magic"), "actor_grad"),
        (dict(kl_balance=1.5), "kl_balance"),
        (dict(policy_kwargs=dict(preset="huge")), "preset"),
        (dict(policy_kwargs=dict(latent_type="beta")), "latent_type"),
        (dict(policy_kwargs=dict(latent_features="deter")), "latent_features"),
        (dict(actor_entropy_coef="cosine(1, 2)"), "schedule"),
        (dict(exploration_noise="linear(0.4)"), "schedule"),
        (dict(exploration_noise="linear(0.4, 0.1, 1.5)"), "fraction"),
        (dict(precision="fp16"), "precision"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DreamerV2("MlpPolicy", "CartPole-v1", **kwargs)


def test_cuda_graph_off_cuda_warns_and_runs_eagerly(tiny_kwargs):
    with pytest.warns(UserWarning, match="cuda_graph=True needs a CUDA device"):
        model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, cuda_graph=True, **tiny_kwargs)
    model.learn(100)
    assert model._n_updates > 0 and model._graphs is None


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True), (False, True, True)])
def test_native_cpu_bf16_reads_the_cpu_flags(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(th.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(th.cpu, "_is_amx_tile_supported", lambda: amx)
    assert dreamerv2_module.native_cpu_bf16() is native


def test_bf16_on_a_cpu_that_emulates_it_warns(monkeypatch, tiny_kwargs):
    monkeypatch.setattr(dreamerv2_module, "native_cpu_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without AVX512-BF16 or AMX"):
        DreamerV2("MlpPolicy", "CartPole-v1", precision="bf16", **tiny_kwargs)
    monkeypatch.setattr(dreamerv2_module, "native_cpu_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DreamerV2("MlpPolicy", "CartPole-v1", precision="bf16", **tiny_kwargs)
        monkeypatch.setattr(dreamerv2_module, "native_cpu_bf16", lambda: False)
        DreamerV2("MlpPolicy", "CartPole-v1", precision="fp32", **tiny_kwargs)  # fp32: no warning whatever the CPU


def test_unsupported_spaces_raise_at_construction():
    with pytest.raises(ValueError, match="action space"):
        DreamerV2("MlpPolicy", CountingEnv(action_space=spaces.MultiBinary(2)))
    with pytest.raises((ValueError, AssertionError), match="bound"):  # SB3 itself asserts finite Box bounds
        DreamerV2("MlpPolicy", CountingEnv(action_space=spaces.Box(-np.inf, np.inf, (2,))))


def test_nan_loss_raises_value_error_and_leaves_parameters_unchanged(tiny_kwargs):
    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    model.learn(100)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    original = model.policy.world_model.reward

    def nan_reward(features):
        return original(features) * float("nan")

    model.policy.world_model.reward = nan_reward
    with pytest.raises(ValueError, match="model"):
        model.train(1, 4)
    for key, value in model.policy.state_dict().items():
        th.testing.assert_close(value, before[key], equal_nan=True)


def test_schedules_and_actor_gradient_modes(tiny_kwargs):
    model = DreamerV2("MlpPolicy", "Pendulum-v1", actor_grad="both", actor_grad_mix="linear(0.1, 0.0)",
                      actor_entropy_coef="linear(1e-3, 1e-4)", seed=0, **tiny_kwargs)
    assert model.reinforce_mix() == pytest.approx(0.9)
    model.learn(100)
    assert 0.9 < model.reinforce_mix() <= 1.0
    assert DreamerV2("MlpPolicy", "Pendulum-v1", **tiny_kwargs).reinforce_mix() == 0.0
    assert DreamerV2("MlpPolicy", "CartPole-v1", **tiny_kwargs).reinforce_mix() == 1.0


def test_exploration_noise_schedule_acts_on_collection_only(tiny_kwargs, tmp_path):
    model = DreamerV2("MlpPolicy", CountingEnv(action_space=spaces.Discrete(4)), seed=0,
                      exploration_noise="linear(0.8, 0.2, 0.5)", **tiny_kwargs)
    for remaining, rate in ((1.0, 0.8), (0.75, 0.5), (0.5, 0.2), (0.1, 0.2)):  # DQN's exploration_fraction
        model._current_progress_remaining = remaining
        assert model.exploration_rate() == pytest.approx(rate)

    # A policy that always picks action 0: with ε the collected actions spread over the others, as often as ε says.
    def always_zero(obs, state, prev_action, starts, deterministic=False):
        return th.nn.functional.one_hot(th.zeros(len(obs), dtype=th.long), 4).float(), state

    model.policy.step = always_zero
    model.learning_starts = 0
    model._current_progress_remaining = 0.1  # ε = 0.2
    model._last_obs = model.env.reset()
    taken = []
    for _ in range(4000):
        env_action, buffer_action = model._sample_action(0)
        taken.append(int(env_action[0]))
        model._last_episode_starts = np.zeros(1, dtype=bool)
        # the RSSM's previous action is the action taken, noise included
        assert model._last_state[1].argmax(-1).tolist() == buffer_action[:, 0].tolist()
    assert np.mean(np.array(taken) != 0) == pytest.approx(0.2 * 3 / 4, abs=0.02)

    model._current_progress_remaining = 1.0
    obs = model.env.reset()
    assert {int(model.predict(obs, deterministic=True)[0][0]) for _ in range(50)} == {0}  # predict: no noise
    model.save(tmp_path / "m.zip")
    assert DreamerV2.load(tmp_path / "m.zip").exploration_rate() == pytest.approx(0.8)


def test_exploration_rate_is_logged(tiny_kwargs):
    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, exploration_noise=0.1, **tiny_kwargs)
    model.learn(100)
    assert model.logger.name_to_value["rollout/exploration_rate"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "policy, obs_space, action_space",
    [("CnnPolicy", "image", spaces.Discrete(2)), ("MultiInputPolicy", "dict", spaces.Box(-1, 1, (2,)))],
)
def test_bf16_precision_runs_dense_layers_in_bf16_and_keeps_losses_fp32(policy, obs_space, action_space, tiny_kwargs,
                                                                          tmp_path):
    # Discrete actions (Reinforce) and continuous ones (dynamics backpropagation through the bf16 imagination)
    model = DreamerV2(policy, CountingEnv(obs_space=obs_space, action_space=action_space), seed=0, precision="bf16",
                      **tiny_kwargs)
    model.learn(100)  # fills the buffer
    world_model = model.policy.world_model
    dtypes = []
    hook = world_model.reward_head[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    batch = model.replay_buffer.sample(4)

    def model_loss():
        th.manual_seed(0)
        with model._autocast():
            return world_model.loss(batch, model.gamma)[0]

    mixed = model_loss()
    model.precision = "fp32"
    full = model_loss()
    hook.remove()
    assert dtypes == [th.bfloat16, th.float32]
    assert mixed.dtype == full.dtype == th.float32
    assert mixed.item() != full.item() and mixed.item() == pytest.approx(full.item(), rel=0.03)  # bf16 rounding only

    model.precision = "bf16"
    model.learn(200, reset_num_timesteps=False)  # world-model and behaviour updates under autocast
    assert all(np.isfinite(v) for k, v in model.logger.name_to_value.items() if k.startswith("train/"))
    assert all(p.dtype == th.float32 for p in model.policy.parameters())  # fp32 weights and optimizer state
    model.save(tmp_path / "bf16.zip")
    assert DreamerV2.load(tmp_path / "bf16.zip").precision == "bf16"


def test_return_normalization_is_opt_in_logged_and_saved(tiny_kwargs, tmp_path):
    plain = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    plain.learn(200)
    assert plain.policy.actor_critic.return_normalizer.percentiles.tolist() == [0.0, 0.0]  # off by default
    assert plain.logger.name_to_value["train/return_scale"] == 1.0

    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, return_normalization=True, **tiny_kwargs)
    model.learn(200)
    percentiles = model.policy.actor_critic.return_normalizer.percentiles.clone()
    assert percentiles[1] > percentiles[0]  # moved towards the imagined returns' P95 / P5
    assert model.logger.name_to_value["train/return_scale"] >= 1.0
    model.save(tmp_path / "model.zip")
    loaded = DreamerV2.load(tmp_path / "model.zip", device="cpu")
    assert loaded.return_normalization
    th.testing.assert_close(loaded.policy.actor_critic.return_normalizer.percentiles, percentiles)


def test_vec_normalize_env_trains_on_normalized_observations(tiny_kwargs, monkeypatch):
    from stable_baselines3.common.vec_env import VecNormalize

    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=0), norm_obs=True, norm_reward=False)
    model = DreamerV2("MlpPolicy", venv, seed=0, **tiny_kwargs)
    seen = []
    sample = model.replay_buffer_class.sample
    monkeypatch.setattr(model.replay_buffer_class, "sample",
                        lambda self, n, env=None: seen.append(env) or sample(self, n, env=env))
    model.learn(200)
    assert seen and all(env is venv for env in seen)  # the training batches are normalized by the env's statistics
    stored = model.replay_buffer.observations[: model.replay_buffer.pos]
    # stored raw: the pole angle stays within CartPole's bound of 0.418 rad, its normalized value does not (std ~0.1)
    assert np.abs(stored[..., 2]).max() < 0.42 < 1.0 < np.abs(venv.normalize_obs(stored)[..., 2]).max()
    assert model.get_vec_normalize_env() is venv


def test_replay_buffer_save_load_round_trip(tiny_kwargs, tmp_path):
    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    model.learn(100)
    model.save_replay_buffer(tmp_path / "buffer.pkl")
    other = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    other.load_replay_buffer(tmp_path / "buffer.pkl")
    assert other.replay_buffer.size() == model.replay_buffer.size()
    np.testing.assert_array_equal(other.replay_buffer.observations, model.replay_buffer.observations)


def test_policy_save_load(tiny_kwargs, tmp_path):
    model = DreamerV2("MlpPolicy", "CartPole-v1", seed=0, **tiny_kwargs)
    model.policy.save(tmp_path / "policy.pth")
    policy = type(model.policy).load(tmp_path / "policy.pth")
    obs = np.zeros((2, 4), np.float32)
    np.testing.assert_array_equal(policy.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def test_corrupted_zip_raises(tmp_path):
    path = tmp_path / "broken.zip"
    path.write_bytes(b"not a zip file" * 10)
    with pytest.raises(Exception, match="zip|Zip|file"):
        DreamerV2.load(path)
