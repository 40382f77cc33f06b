"""The math of DreamerV2 against hand-computed values."""

import pytest
import torch as th
from torch.nn import functional as F

from sb3_dreamer.common.actor_critic import ReturnNormalizer
from sb3_dreamer.common.distributions import sample_onehot, straight_through_onehot
from sb3_dreamer.common.losses import actor_objective, critic_loss, discount_weights, kl_balance, lambda_return


def column(*values: float) -> th.Tensor:
    return th.tensor(values).unsqueeze(-1)  # [H, N=1]


class TestLambdaReturn:
    rewards = column(1.0, 2.0, 3.0)
    values = column(0.5, 1.0, 1.5)
    bootstrap = th.tensor([2.0])

    def test_terminal_step_cuts_the_bootstrap(self):
        # R2 = 3 (γ_2 = 0); R1 = 2 + 0.9 (0.5·1.5 + 0.5·3) = 4.025; R0 = 1 + 0.9 (0.5·1.0 + 0.5·4.025) = 3.26125
        returns = lambda_return(self.rewards, self.values, column(0.9, 0.9, 0.0), self.bootstrap, 0.5)
        assert returns.squeeze(-1).tolist() == pytest.approx([3.26125, 4.025, 3.0])

    def test_bootstrap_without_terminal(self):
        # R2 = 3 + 0.9 (0.5·2 + 0.5·2) = 4.8; R1 = 2 + 0.9 (0.75 + 2.4) = 4.835; R0 = 1 + 0.9 (0.5 + 2.4175) = 3.62575
        returns = lambda_return(self.rewards, self.values, column(0.9, 0.9, 0.9), self.bootstrap, 0.5)
        assert returns.squeeze(-1).tolist() == pytest.approx([3.62575, 4.835, 4.8])

    def test_lambda_one_is_monte_carlo_and_zero_is_td0(self):
        discounts = column(0.9, 0.9, 0.9)
        monte_carlo = lambda_return(self.rewards, self.values, discounts, self.bootstrap, 1.0)
        assert monte_carlo.squeeze(-1).tolist() == pytest.approx([6.688, 6.32, 4.8])
        td0 = lambda_return(self.rewards, self.values, discounts, self.bootstrap, 0.0)
        assert td0.squeeze(-1).tolist() == pytest.approx([1.9, 3.35, 4.8])

    def test_columns_are_independent(self):
        rewards = th.cat([self.rewards, 2 * self.rewards], dim=1)
        values = th.cat([self.values, self.values], dim=1)
        returns = lambda_return(rewards, values, th.full((3, 2), 0.9), th.tensor([2.0, 2.0]), 1.0)
        assert returns[:, 0].tolist() == pytest.approx([6.688, 6.32, 4.8])
        assert returns[:, 1].tolist() == pytest.approx([1 * 2 + 0.9 * (2 * 2 + 0.9 * (3 * 2 + 0.9 * 2)),
                                                         2 * 2 + 0.9 * (3 * 2 + 0.9 * 2), 3 * 2 + 0.9 * 2])


def test_discount_weights_are_the_shifted_cumulative_product():
    weights = discount_weights(column(0.9, 0.8, 0.5, 0.7).requires_grad_())
    assert weights.squeeze(-1).tolist() == pytest.approx([1.0, 0.9, 0.72, 0.36])
    assert not weights.requires_grad


def categorical_kl(lhs: th.Tensor, rhs: th.Tensor) -> th.Tensor:
    log_p, log_q = F.log_softmax(lhs, -1), F.log_softmax(rhs, -1)
    return (log_p.exp() * (log_p - log_q)).sum((-2, -1))


class TestKLBalance:
    def logits(self) -> tuple[th.Tensor, th.Tensor]:
        gen = th.Generator().manual_seed(0)
        post = th.randn(5, 3, 4, generator=gen, requires_grad=True)  # [N, variables, classes]
        prior = th.randn(5, 3, 4, generator=gen, requires_grad=True)
        return post, prior

    def test_gradient_split_is_alpha_to_prior_and_rest_to_posterior(self):
        post, prior = self.logits()
        loss, value = kl_balance(post, prior, categorical_kl, balance=0.8)
        grad_post, grad_prior = th.autograd.grad(loss, (post, prior))
        plain_post, plain_prior = th.autograd.grad(categorical_kl(post, prior).mean(), (post, prior))
        th.testing.assert_close(grad_prior, 0.8 * plain_prior)
        th.testing.assert_close(grad_post, 0.2 * plain_post)
        th.testing.assert_close(loss, categorical_kl(post, prior).mean())  # same value, only the gradients are split
        th.testing.assert_close(value, categorical_kl(post, prior).detach())

    def test_balance_half_is_plain_kl(self):
        post, prior = self.logits()
        loss, _ = kl_balance(post, prior, categorical_kl, balance=0.5)
        grads = th.autograd.grad(loss, (post, prior))
        plain = th.autograd.grad(categorical_kl(post, prior).mean(), (post, prior))
        for got, expected in zip(grads, plain):
            th.testing.assert_close(got, expected)

    def test_free_nats_clamp_the_loss_and_stop_the_gradient(self):
        post, prior = self.logits()
        kl_mean = categorical_kl(post, prior).mean().item()
        loss, _ = kl_balance(post, prior, categorical_kl, balance=0.8, free_nats=kl_mean + 1.0)
        assert loss.item() == pytest.approx(kl_mean + 1.0)
        grad_post, grad_prior = th.autograd.grad(loss, (post, prior), allow_unused=True)
        assert float(grad_post.abs().sum()) == 0.0 and float(grad_prior.abs().sum()) == 0.0


class TestStraightThrough:
    def test_forward_is_one_hot_and_backward_is_the_softmax_gradient(self):
        th.manual_seed(0)
        logits = th.randn(6, 32, 32, requires_grad=True)
        weights = th.randn(6, 32, 32)
        sample = straight_through_onehot(logits)
        # sample + probs - sg(probs) equals the one-hot sample up to float rounding
        onehot = th.nn.functional.one_hot(sample.detach().argmax(-1), 32).float()
        th.testing.assert_close(sample.detach(), onehot, atol=1e-6, rtol=0)
        with th.no_grad():  # nothing to differentiate: the one-hot sample itself, exactly
            plain = straight_through_onehot(logits)
        assert ((plain == 0) | (plain == 1)).all() and (plain.sum(-1) == 1).all() and not plain.requires_grad
        (grad,) = th.autograd.grad((sample * weights).sum(), logits)
        (expected,) = th.autograd.grad((th.softmax(logits, -1) * weights).sum(), logits)
        th.testing.assert_close(grad, expected)

    def test_samples_follow_the_probabilities(self):
        th.manual_seed(0)
        logits = th.log(th.tensor([0.1, 0.2, 0.7])).expand(20000, 3)
        frequencies = straight_through_onehot(logits).detach().mean(0)
        th.testing.assert_close(frequencies, th.tensor([0.1, 0.2, 0.7]), atol=0.015, rtol=0)

    def test_inverse_cdf_never_picks_impossible_classes(self):
        th.manual_seed(0)
        probs = th.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]).repeat(5000, 1, 1)
        probs[:, :, :] *= 0.9999  # totals below one (float rounding) must not push samples past the last class
        sample = sample_onehot(probs)  # [5000, 3, 4]
        assert (sample.sum(-1) == 1).all()
        assert ((sample > 0) <= (probs > 0)).all()
        assert sample[:, 0, 1].mean().item() == pytest.approx(0.5, abs=0.02)


class TestActorCriticLosses:
    log_probs = column(-1.0, -2.0)
    entropy = column(0.5, 0.25)
    returns = column(3.0, 5.0)
    baseline = column(1.0, 4.0)
    weights = column(1.0, 0.5)

    def test_reinforce(self):
        # -mean(w · (ln π · (R - v) + η H)) = -mean([1·(-1·2 + 0.1·0.5), 0.5·(-2·1 + 0.1·0.25)]) = -mean([-1.95, -0.9875])
        loss = actor_objective(self.log_probs, self.entropy, self.returns, self.baseline, self.weights, 1.0, 0.1)
        assert loss.item() == pytest.approx((1.95 + 0.9875) / 2)

    def test_dynamics_backprop_differentiates_the_return(self):
        returns = self.returns.clone().requires_grad_()
        loss = actor_objective(self.log_probs, self.entropy, returns, self.baseline, self.weights, 0.0, 0.0)
        assert loss.item() == pytest.approx(-(3.0 + 0.5 * 5.0) / 2)
        (grad,) = th.autograd.grad(loss, returns)
        assert grad.squeeze(-1).tolist() == pytest.approx([-0.5, -0.25])

    def test_reinforce_advantage_carries_no_gradient_into_the_return(self):
        returns = self.returns.clone().requires_grad_()
        log_probs = self.log_probs.clone().requires_grad_()
        loss = actor_objective(log_probs, self.entropy, returns, self.baseline, self.weights, 1.0, 0.0)
        grad_returns, grad_log_probs = th.autograd.grad(loss, (returns, log_probs), allow_unused=True)
        assert grad_returns is None
        assert grad_log_probs.squeeze(-1).tolist() == pytest.approx([-1.0, -0.25])  # -w · (R - v) / N

    def test_mixed_gradients(self):
        loss = actor_objective(self.log_probs, self.entropy, self.returns, self.baseline, self.weights, 0.9, 0.0)
        reinforce = actor_objective(self.log_probs, self.entropy, self.returns, self.baseline, self.weights, 1.0, 0.0)
        dynamics = actor_objective(self.log_probs, self.entropy, self.returns, self.baseline, self.weights, 0.0, 0.0)
        assert loss.item() == pytest.approx(0.9 * reinforce.item() + 0.1 * dynamics.item())

    @pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
    def test_tensor_mix_and_entropy_coef_give_the_same_loss_and_gradients(self, mix):
        # (a CUDA graph's inputs: both terms computed whatever ρ, with the same values and gradients)
        def grads(reinforce_mix, entropy_coef):
            returns, log_probs = self.returns.clone().requires_grad_(), self.log_probs.clone().requires_grad_()
            loss = actor_objective(log_probs, self.entropy, returns, self.baseline, self.weights, reinforce_mix,
                                   entropy_coef)
            return [loss, *th.autograd.grad(loss, (returns, log_probs), allow_unused=True, materialize_grads=True)]

        for plain, tensor in zip(grads(mix, 0.1), grads(th.tensor(mix), th.tensor(0.1))):
            th.testing.assert_close(tensor, plain)

    def test_critic_loss_is_weighted_half_squared_error(self):
        values = column(1.0, 2.0).requires_grad_()
        loss = critic_loss(values, column(3.0, 5.0), column(1.0, 0.5))
        assert loss.item() == pytest.approx((0.5 * 4 + 0.5 * 0.5 * 9) / 2)
        (grad,) = th.autograd.grad(loss, values)
        assert grad.squeeze(-1).tolist() == pytest.approx([-1.0, -0.75])


class TestReturnNormalization:
    def test_return_scale_divides_the_advantage_and_the_return_but_not_the_entropy(self):
        log_probs = column(-0.5, -1.0).requires_grad_()
        returns = column(3.0, 5.0).requires_grad_()
        baseline, entropy, weights = column(1.0, 4.0), column(0.6, 0.2), column(1.0, 0.5)
        # -(1·(-0.5·(3-1)/4 + 0.1·0.6) + 0.5·(-1·(5-4)/4 + 0.1·0.2)) / 2 = -(-0.19 - 0.115) / 2
        loss = actor_objective(log_probs, entropy, returns, baseline, weights, 1.0, 0.1, return_scale=4.0)
        assert loss.item() == pytest.approx(0.1525)
        (grad,) = th.autograd.grad(loss, log_probs)
        assert grad.squeeze(-1).tolist() == pytest.approx([-0.25, -0.0625])  # -w · (R - v) / (S · N)
        dynamics = actor_objective(log_probs, entropy, returns, baseline, weights, 0.0, 0.0, return_scale=4.0)
        (grad,) = th.autograd.grad(dynamics, returns)
        assert grad.squeeze(-1).tolist() == pytest.approx([-0.125, -0.0625])

    def test_normalizer_tracks_the_percentile_spread_with_a_floor_of_one(self):
        normalizer = ReturnNormalizer(decay=0.5)
        returns = th.arange(101, dtype=th.float32)  # P5 = 5, P95 = 95
        assert normalizer.update(returns).item() == pytest.approx(45.0)  # EMA from 0: (2.5, 47.5)
        assert normalizer.percentiles.tolist() == pytest.approx([2.5, 47.5])
        assert normalizer.update(returns).item() == pytest.approx(67.5)  # (3.75, 71.25)
        small = ReturnNormalizer(decay=0.0)
        assert small.update(th.linspace(0.0, 0.5, 11)).item() == 1.0  # a spread below 1 is not amplified

    def test_normalizer_state_is_saved_with_the_module(self):
        normalizer = ReturnNormalizer(decay=0.5)
        normalizer.update(th.arange(101, dtype=th.float32))
        restored = ReturnNormalizer(decay=0.5)
        restored.load_state_dict(normalizer.state_dict())
        assert restored.scale().item() == pytest.approx(45.0)
