"""Pure loss functions of DreamerV2 (no modules, no state), each checked against hand-computed values in the tests.

Symbols: r_t rewards, γ_t predicted discounts, v_t (slow) critic values, λ the return mix, V^λ_t the λ-return,
α the KL balance, ρ the Reinforce/dynamics mix, η the entropy scale.
"""

from collections.abc import Callable

import torch as th


def lambda_return(
    rewards: th.Tensor, values: th.Tensor, discounts: th.Tensor, bootstrap: th.Tensor, lambda_: float
) -> th.Tensor:
    """λ-returns along the first (time) axis.

    V^λ_t = r_t + γ_t · ((1 - λ) · v_{t+1} + λ · V^λ_{t+1}),  with V^λ_H = bootstrap,

    and v_{t+1} = ``values[t + 1]`` (``bootstrap`` for the last step).

    :param rewards: r_{0:H}: ``[H, N]``
    :param values: v_{0:H}: ``[H, N]``
    :param discounts: γ_{0:H}: ``[H, N]``
    :param bootstrap: v_H: ``[N]``
    :param lambda_: λ
    :return: V^λ_{0:H}: ``[H, N]``
    """
    next_values = th.cat([values[1:], bootstrap.unsqueeze(0)], dim=0)  # [H, N]
    inputs = rewards + discounts * next_values * (1 - lambda_)
    returns = []
    last = bootstrap
    for t in reversed(range(rewards.shape[0])):
        last = inputs[t] + discounts[t] * lambda_ * last
        returns.append(last)
    return th.stack(returns[::-1], dim=0)


def discount_weights(discounts: th.Tensor) -> th.Tensor:
    """Weights of imagined steps: the probability of still being in the episode, ∏_{k<t} γ_k (1 at t = 0).

    :param discounts: γ_{0:H+1}: ``[H + 1, N]``
    :return: ``[H + 1, N]`` (no gradient)
    """
    shifted = th.cat([th.ones_like(discounts[:1]), discounts[:-1]], dim=0)
    return th.cumprod(shifted, dim=0).detach()


def kl_balance(
    post_stats: th.Tensor,
    prior_stats: th.Tensor,
    kl: Callable[[th.Tensor, th.Tensor], th.Tensor],
    balance: float = 0.8,
    free_nats: float = 0.0,
) -> tuple[th.Tensor, th.Tensor]:
    """KL balancing: α · KL(sg(q) || p) + (1 - α) · KL(q || sg(p)), with free nats on each batch-mean term.

    With α = 0.8 the prior p receives 0.8 of the gradient and the posterior q 0.2. α = 0.5 is plain KL(q || p) with
    equal gradients (the "no KL balancing" ablation).

    :param post_stats: statistics of q(z_t | h_t, e_t)
    :param prior_stats: statistics of p(ẑ_t | h_t)
    :param kl: ``kl(lhs_stats, rhs_stats)`` -> KL(lhs || rhs) per element
    :param balance: α
    :param free_nats: terms below this many nats (batch mean) are clamped (no gradient)
    :return: (loss, KL(q || p) per element, detached)
    """
    value = kl(post_stats, prior_stats)
    if balance == 0.5:
        return th.clamp(value.mean(), min=free_nats), value.detach()
    prior_term = kl(post_stats.detach(), prior_stats).mean()
    post_term = kl(post_stats, prior_stats.detach()).mean()
    loss = balance * th.clamp(prior_term, min=free_nats) + (1 - balance) * th.clamp(post_term, min=free_nats)
    return loss, value.detach()


def actor_objective(
    log_probs: th.Tensor,
    entropy: th.Tensor,
    returns: th.Tensor,
    baseline: th.Tensor,
    weights: th.Tensor,
    reinforce_mix: float | th.Tensor,
    entropy_coef: float | th.Tensor,
    return_scale: float | th.Tensor = 1.0,
) -> th.Tensor:
    """Actor loss: -E[w · (ρ · ln π(a|s) · sg(V^λ - v) / S + (1 - ρ) · V^λ / S + η · H[π])].

    S is 1 in DreamerV2; return normalization (DreamerV3, opt-in) sets it to the spread of the returns, max(1, P95 - P5).

    :param log_probs: ln π(a_t | s_t) of the imagined actions: ``[H - 1, N]``
    :param entropy: H[π(· | s_t)]: ``[H - 1, N]``
    :param returns: V^λ_{t+1}: ``[H - 1, N]`` (carries dynamics gradients when ρ < 1)
    :param baseline: v(s_t) from the slow critic: ``[H - 1, N]``
    :param weights: discount weights: ``[H - 1, N]``
    :param reinforce_mix: ρ (1: Reinforce only, 0: dynamics backpropagation only); as a tensor (a CUDA graph's input)
        both terms are computed, whatever its value
    :param entropy_coef: η
    :param return_scale: S, divides the advantages and returns (no gradient)
    """
    objective = entropy_coef * entropy
    any_mix = isinstance(reinforce_mix, th.Tensor)  # no host-side comparison of a device value
    if any_mix or reinforce_mix > 0:
        objective = objective + reinforce_mix * log_probs * ((returns - baseline) / return_scale).detach()
    if any_mix or reinforce_mix < 1:
        objective = objective + (1 - reinforce_mix) * returns / return_scale
    return -(weights.detach() * objective).mean()


def critic_loss(values: th.Tensor, returns: th.Tensor, weights: th.Tensor) -> th.Tensor:
    """Critic regression to the λ-returns: E[w · ½ (v(s_t) - sg(V^λ_t))²] (Gaussian, unit variance)."""
    return (weights.detach() * 0.5 * (values - returns.detach()) ** 2).mean()
