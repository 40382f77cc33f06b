"""The paper's ablation switches and the fully discrete variant: each one changes the computation, and each trains.

Switches (policy_kwargs): ``latent_features="stoch"``, ``latent_type="gaussian"``, ``layer_norm=False``;
(algorithm): ``kl_balance=0.5``, ``actor_grad="reinforce" | "dynamics" | "both"`` (+ ``actor_grad_mix``),
``stop_image_grad=True``, ``stop_reward_grad=True``.
"""

import json

import numpy as np
import pytest
import torch as th
from torch import nn

import sb3_dreamer.common.actor_critic as actor_critic_module
import sb3_dreamer.common.world_model as world_model_module
from sb3_dreamer import DreamerV2
from sb3_dreamer.analysis.rollout import make_env
from sb3_dreamer.common.losses import kl_balance
from sb3_dreamer.common.rssm import flatten_states

TINY = dict(deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_layers=1, mlp_units=32, cnn_depth=4)
ALGO = dict(learning_starts=64, batch_size=4, sequence_length=8, imagination_horizon=3, train_freq=4, seed=0,
            device="cpu")


def make_model(policy_kwargs: dict | None = None, **kwargs) -> DreamerV2:
    return DreamerV2("CnnPolicy", make_env("MinAtar/Breakout-v1"), policy_kwargs={**TINY, **(policy_kwargs or {})},
                     **{**ALGO, **kwargs})


@pytest.fixture(scope="module")
def batch():
    """A replayed batch [4, 8] of MinAtar Breakout (random prefill only, no training)."""
    th.manual_seed(0)
    model = make_model()
    model.learn(64)
    return model.replay_buffer.sample(4)


def gradients(loss: th.Tensor, module: nn.Module) -> th.Tensor:
    """Total absolute gradient of ``loss`` reaching ``module``'s parameters (0 if none)."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = th.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum((g.abs().sum() for g in grads if g is not None), th.tensor(0.0))


def model_loss(model: DreamerV2, batch, **kwargs) -> th.Tensor:
    options = dict(kl_scale=0.0, reward_scale=0.0, reconstruction_scale=0.0, predict_discount=False)
    options.update(kwargs)
    loss, _, _ = model.policy.world_model.loss(batch, 0.99, **options)
    return loss


@pytest.mark.parametrize("stop", [False, True])
def test_stop_image_grad_cuts_reconstruction_gradient_from_representation(batch, stop):
    model = make_model()
    wm = model.policy.world_model
    loss = model_loss(model, batch, reconstruction_scale=1.0, stop_image_grad=stop)
    assert gradients(loss, wm.decoder) > 0
    for module in (wm.encoder, wm.rssm):
        assert (gradients(loss, module) == 0) == stop


@pytest.mark.parametrize("stop", [False, True])
def test_stop_reward_grad_cuts_reward_gradient_from_representation(batch, stop):
    model = make_model()
    wm = model.policy.world_model
    loss = model_loss(model, batch, reward_scale=1.0, stop_reward_grad=stop)
    assert gradients(loss, wm.reward_head) > 0
    for module in (wm.encoder, wm.rssm):
        assert (gradients(loss, module) == 0) == stop


def test_stop_grad_switches_reach_the_world_model_loss(batch, monkeypatch):
    seen = {}
    original = world_model_module.WorldModel.loss

    def spy(self, *args, **kwargs):
        seen["args"] = args
        return original(self, *args, **kwargs)

    monkeypatch.setattr(world_model_module.WorldModel, "loss", spy)
    model = make_model(stop_image_grad=True, stop_reward_grad=True, kl_balance=0.5)
    model.learn(68)
    args = seen["args"]  # (batch, gamma, kl_scale, kl_balance, free_nats, ..., stop_image_grad, stop_reward_grad)
    assert args[3] == 0.5 and args[-2] is True and args[-1] is True


def test_kl_balance_half_gives_prior_and_posterior_the_plain_kl_gradients():
    th.manual_seed(0)
    post = th.randn(5, 4, 4, requires_grad=True)
    prior = th.randn(5, 4, 4, requires_grad=True)
    rssm_kl = make_model().policy.world_model.rssm.kl

    def grads(alpha: float) -> tuple[th.Tensor, th.Tensor]:
        loss, _ = kl_balance(post, prior, rssm_kl, alpha)
        return th.autograd.grad(loss, [post, prior])

    plain = th.autograd.grad(rssm_kl(post, prior).mean(), [post, prior])
    half_post, half_prior = grads(0.5)
    assert th.allclose(half_post, plain[0]) and th.allclose(half_prior, plain[1])  # equal (unit) weights
    post_08, prior_08 = grads(0.8)
    assert th.allclose(prior_08, 0.8 * plain[1], atol=1e-6)  # the prior learns 4x faster than the posterior
    assert th.allclose(post_08, 0.2 * plain[0], atol=1e-6)


def test_kl_balance_scales_the_prior_network_gradient(batch):
    model = make_model()
    prior_net = model.policy.world_model.rssm.img_out  # only produces the prior's statistics

    def prior_gradient(alpha: float) -> list[th.Tensor]:
        th.manual_seed(1)  # same straight-through samples for both calls
        loss = model_loss(model, batch, kl_scale=1.0, kl_balance_alpha=alpha)
        return th.autograd.grad(loss, list(prior_net.parameters()))

    for balanced, plain in zip(prior_gradient(0.8), prior_gradient(0.5)):
        assert th.allclose(balanced, 0.8 * plain, atol=1e-6)


def test_fully_discrete_heads_read_stoch_only():
    full, discrete = make_model(), make_model(dict(latent_features="stoch"))
    stoch_dim, deter = 4 * 4, 32
    for model, size in ((full, stoch_dim + deter), (discrete, stoch_dim)):
        wm, ac = model.policy.world_model, model.policy.actor_critic
        assert wm.feature_dim == size
        assert wm.reward_head[0].in_features == size and wm.discount_head[0].in_features == size
        assert wm.decoder.cnns["obs"].linear.in_features == size
        assert ac.actor[0].in_features == size and ac.critic[0].in_features == size
        state = wm.rssm.initial(3, th.device("cpu"))
        assert wm.features(state).shape == (3, size)


def test_gaussian_latents_have_mean_and_std_stats(batch):
    model = make_model(dict(latent_type="gaussian"))
    wm = model.policy.world_model
    assert not wm.rssm.discrete and wm.rssm.stoch_dim == 4
    _, post, _ = wm.loss(batch, 0.99)
    assert post.stoch.shape == (4, 8, 4)
    assert post.stats.shape == (4, 8, 8)  # (mean, std) per variable
    std = post.stats[..., 4:]
    assert (std >= wm.rssm.min_std).all()
    categorical = make_model().policy.world_model
    _, post, _ = categorical.loss(batch, 0.99)
    assert post.stoch.shape == (4, 8, 16) and post.stats.shape == (4, 8, 4, 4)
    assert th.allclose(post.stoch.detach().reshape(4, 8, 4, 4).sum(-1), th.ones(4, 8, 4))  # one-hot per variable


@pytest.mark.parametrize("layer_norm", [True, False])
def test_layer_norm_switch(layer_norm):
    model = make_model(dict(layer_norm=layer_norm))
    has_norm = any(isinstance(m, nn.LayerNorm) for m in model.policy.modules())
    assert has_norm == layer_norm
    assert (model.policy.world_model.rssm.cell.linear.bias is None) == layer_norm


@pytest.mark.parametrize("actor_grad,mix,rho", [("reinforce", 0.1, 1.0), ("dynamics", 0.1, 0.0), ("both", 0.3, 0.7),
                                                 ("auto", 0.1, 1.0)])
def test_actor_grad_selects_the_gradient_estimator(batch, monkeypatch, actor_grad, mix, rho):
    model = make_model(actor_grad=actor_grad, actor_grad_mix=mix)
    model._current_progress_remaining = 1.0
    assert model.reinforce_mix() == pytest.approx(rho)
    seen = {}
    original = actor_critic_module.actor_objective

    def spy(log_probs, entropy, returns, baseline, weights, reinforce_mix, entropy_coef, *rest):
        seen.update(returns_grad=returns.requires_grad, mix=reinforce_mix)
        return original(log_probs, entropy, returns, baseline, weights, reinforce_mix, entropy_coef, *rest)

    monkeypatch.setattr(actor_critic_module, "actor_objective", spy)
    wm, ac = model.policy.world_model, model.policy.actor_critic
    with th.no_grad():
        _, post, _ = wm.loss(batch, 0.99)
    wm.requires_grad_(False)
    losses = ac.loss(wm, flatten_states(post), batch.is_terminal.reshape(-1), 3, 0.99, 0.95, model.reinforce_mix(), 0.0)
    wm.requires_grad_(True)
    assert seen["mix"] == pytest.approx(rho)
    assert seen["returns_grad"] == (rho < 1)  # dynamics backpropagation differentiates the λ-returns
    assert gradients(losses.actor_loss, ac.actor) > 0


@pytest.mark.parametrize("policy_kwargs,rho,gathers", [({}, 1.0, True), (dict(latent_features="stoch"), 1.0, True),
                                                      (dict(latent_type="gaussian"), 1.0, False), ({}, 0.0, False)])
def test_reinforce_imagination_gathers_one_hot_latents_with_unchanged_losses(batch, monkeypatch, policy_kwargs, rho,
                                                                             gathers):
    """Without dynamics backpropagation the heads gather the latents' weight columns: same losses and gradients."""
    model = make_model(policy_kwargs)
    wm, ac = model.policy.world_model, model.policy.actor_critic
    with th.no_grad():
        _, post, _ = wm.loss(batch, 0.99)
    start = flatten_states(post)
    wm.requires_grad_(False)

    def behaviour() -> tuple[th.Tensor, list[th.Tensor]]:
        th.manual_seed(7)
        losses = ac.loss(wm, start, batch.is_terminal.reshape(-1), 4, 0.99, 0.95, rho, 1e-3)
        grads = th.autograd.grad(losses.actor_loss + losses.critic_loss, [*ac.actor.parameters(), *ac.critic.parameters()])
        return th.stack([losses.actor_loss, losses.critic_loss]), list(grads)

    th.manual_seed(7)
    trajectory = ac.imagine(wm, start, 4, backprop=rho < 1)
    assert (trajectory.onehot is not None) == gathers
    if gathers:
        assert trajectory.onehot.index.shape == (5, 32, wm.rssm.stoch_size)
        stoch = trajectory.features[..., : wm.rssm.stoch_dim]
        th.testing.assert_close(th.zeros_like(stoch).scatter_(-1, trajectory.onehot.index, 1.0), stoch)
    assert trajectory.log_probs.shape == trajectory.entropy.shape == (4, 32)
    gathered_losses, gathered_grads = behaviour()
    monkeypatch.setattr(wm, "features_onehot", lambda state: None)  # dense heads everywhere
    dense_losses, dense_grads = behaviour()
    th.testing.assert_close(gathered_losses, dense_losses)
    for gathered, dense in zip(gathered_grads, dense_grads):
        th.testing.assert_close(gathered, dense)


VARIANTS = {
    "default": ({}, {}),
    "fully_discrete": (dict(latent_features="stoch"), {}),
    "gaussian": (dict(latent_type="gaussian"), {}),
    "no_layer_norm": (dict(layer_norm=False), {}),
    "no_kl_balance": ({}, dict(kl_balance=0.5)),
    "dynamics_grad": ({}, dict(actor_grad="dynamics")),
    "both_grad": ({}, dict(actor_grad="both", actor_grad_mix="linear(0.5, 0.1)")),
    "stop_image_grad": ({}, dict(stop_image_grad=True)),
    "stop_reward_grad": ({}, dict(stop_reward_grad=True)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains(name):
    policy_kwargs, kwargs = VARIANTS[name]
    model = make_model(policy_kwargs, **kwargs)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(84)  # 64 prefill steps, then 5 gradient steps
    assert model._n_updates >= 4
    after = list(model.policy.parameters())
    assert all(th.isfinite(p).all() for p in after)
    assert any(not th.equal(b, a) for b, a in zip(before, after))
    obs = model.env.reset()
    actions, _ = model.predict(obs, None, np.ones(1, dtype=bool))
    assert model.action_space.contains(int(actions[0]))


def test_ablation_benchmark_quick_smoke(tmp_path, monkeypatch):
    from benchmarks import ablations

    monkeypatch.setattr(ablations, "ABLATIONS_DIR", tmp_path)
    argv = ["--quick", "--variants", "gaussian", "--budget", "260", "--eval-freq", "130", "--eval-episodes", "1"]
    assert ablations.main(argv) == 0
    folder = tmp_path / "MinAtar-Breakout-v1"
    for variant in ("default", "gaussian"):
        record = json.loads((folder / variant / "seed0_260_quick.json").read_text())
        assert record["status"] == "ok" and record["timesteps"] == [130, 260] and len(record["returns_mean"]) == 2
    table = (folder / "report_260_quick.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| ") and "variant" not in line]) == 2
    assert (folder / "report_260_quick.png").stat().st_size > 0
