"""Behaviour learning in imagination: the actor π(a_t | s_t), the critic v(s_t) and its slow copy.

From every posterior state of the replayed batch (N = B · T starts) the actor imagines H steps with the frozen world
model. Rewards r̂ and discounts γ̂ come from the world model's heads (the first discount is the real
γ · (1 - is_terminal)); λ-returns use the slow critic; the actor mixes Reinforce (ρ) and dynamics backpropagation
(1 - ρ) and is regularized by the entropy scale η; the critic regresses the λ-returns. Row t of an imagined trajectory
holds s_t and the action a_{t-1} that led to it (zeros at t = 0), as in the official code.
"""

import copy
from typing import Any, NamedTuple

import torch as th
from torch import nn

from sb3_dreamer.common.distributions import ActionCodec, ActionDistribution
from sb3_dreamer.common.losses import actor_objective, critic_loss, discount_weights, lambda_return
from sb3_dreamer.common.networks import OneHotPrefix, mlp
from sb3_dreamer.common.type_aliases import RSSMState
from sb3_dreamer.common.world_model import WorldModel


class ImaginedTrajectory(NamedTuple):
    features: th.Tensor  # [H + 1, N, F] model features of s_0 .. s_H
    log_probs: th.Tensor  # [H, N] ln π(a_t | s_t) of the action taken at s_t (t = 0 .. H - 1)
    entropy: th.Tensor  # [H, N] H[π(· | s_t)]
    onehot: OneHotPrefix | None  # [H + 1, N, K] one-hot prefix of the features (None: dense heads)

    def rows(self, key: Any) -> OneHotPrefix | None:
        """The one-hot prefix of ``features[key]``."""
        return None if self.onehot is None else self.onehot[key]


class BehaviourLosses(NamedTuple):
    actor_loss: th.Tensor
    critic_loss: th.Tensor
    metrics: dict[str, th.Tensor]


class ReturnNormalizer(nn.Module):
    """Return scale S = max(1, EMA(P95(V^λ)) - EMA(P5(V^λ))), DreamerV3's return normalization (an opt-in here).

    Dividing the advantages by S keeps the entropy scale η meaningful whatever the size of the returns: with dense
    rewards (returns near 1 / (1 - γ)) the Reinforce term can otherwise dwarf η · H[π]. Returns spread over less than
    one unit are left unscaled, so sparse small rewards are not amplified. The moving percentiles are buffers: they are
    saved and restored with the policy.

    :param decay: EMA decay of the percentiles
    :param low: lower percentile (fraction)
    :param high: upper percentile (fraction)
    """

    def __init__(self, decay: float = 0.99, low: float = 0.05, high: float = 0.95) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("quantiles", th.tensor([low, high]), persistent=False)
        self.register_buffer("percentiles", th.zeros(2))  # EMA of the (low, high) percentiles, 0 before any update

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Models saved before return normalization existed have no percentiles: start them at zero.
        state_dict.setdefault(prefix + "percentiles", th.zeros_like(self.percentiles))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def update(self, returns: th.Tensor) -> th.Tensor:
        """Move the percentiles towards those of ``returns`` (any shape) and return the new scale S (a scalar)."""
        batch = th.quantile(returns.detach().flatten().float(), self.quantiles)
        self.percentiles.mul_(self.decay).add_((1 - self.decay) * batch)
        return self.scale()

    def scale(self) -> th.Tensor:
        """S = max(1, high - low)."""
        return th.clamp(self.percentiles[1] - self.percentiles[0], min=1.0)


class ActorCritic(nn.Module):
    """Actor, critic and slow (target) critic.

    :param feature_dim: size of the model features
    :param action_codec: the action space's codec (distribution and encodings)
    :param mlp_layers: hidden layers of the actor and critic
    :param mlp_units: units per hidden layer
    """

    def __init__(self, feature_dim: int, action_codec: ActionCodec, mlp_layers: int, mlp_units: int) -> None:
        super().__init__()
        self.action_codec = action_codec
        self.actor = mlp(feature_dim, action_codec.param_dim, mlp_layers, mlp_units)
        self.critic = mlp(feature_dim, 1, mlp_layers, mlp_units)
        self.slow_critic = copy.deepcopy(self.critic)
        self.slow_critic.requires_grad_(False)
        self.return_normalizer = ReturnNormalizer()

    def policy(self, features: th.Tensor, onehot: OneHotPrefix | None = None) -> ActionDistribution:
        """π(· | s_t) from features ``[*, F]`` (``onehot``: their one-hot prefix, see :class:`~.networks.MLP`)."""
        return self.action_codec.distribution(self.actor(features, onehot).float())

    def value(self, features: th.Tensor, slow: bool = False, onehot: OneHotPrefix | None = None) -> th.Tensor:
        """v(s_t) (or the slow critic's): ``[*]``."""
        return (self.slow_critic if slow else self.critic)(features, onehot).squeeze(-1).float()

    def update_slow_critic(self) -> None:
        """Hard copy of the critic into the slow critic."""
        self.slow_critic.load_state_dict(self.critic.state_dict())

    def imagine(self, world_model: WorldModel, start: RSSMState, horizon: int, backprop: bool) -> ImaginedTrajectory:
        """Roll the actor through the world model's prior for ``horizon`` steps from ``start`` (``[N, ...]``).

        The actor reads stop-gradient features. With ``backprop`` the sampled actions carry straight-through gradients
        into the (frozen) dynamics, for the dynamics-backpropagation objective. Without it (Reinforce) the rollout
        records no graph at all: the actor's log-probabilities and entropies are computed afterwards, in one batch over
        the H imagined states (as the official actor loss does), and the one-hot latents of the rollout are kept so
        the heads can gather their first layer (:class:`~.networks.OneHotPrefix`).
        """
        if backprop:
            return self._imagine_backprop(world_model, start, horizon)
        with th.no_grad():
            state = start
            stacked = start.deter.new_empty(horizon + 1, start.deter.shape[0], world_model.feature_dim)  # [H + 1, N, F]
            world_model.features(state, out=stacked[0])  # filled step by step: no stack at the end
            onehots, actions = [world_model.features_onehot(state)], []
            for t in range(horizon):
                actions.append(self.policy(stacked[t], onehots[-1]).rsample())  # [N, A]
                state = world_model.rssm.img_step(state, actions[-1], prev_onehot=onehots[-1])
                world_model.features(state, out=stacked[t + 1])
                onehots.append(world_model.features_onehot(state))
        onehot = None
        if onehots[0] is not None:
            onehot = OneHotPrefix(th.stack([prefix.index for prefix in onehots]), onehots[0].width)  # [H + 1, N, K]
        policy = self.policy(stacked[:-1], None if onehot is None else onehot[:-1])  # π(· | s_t), t < H: [H, N]
        return ImaginedTrajectory(stacked, policy.log_prob(th.stack(actions)), policy.entropy(), onehot)

    def _imagine_backprop(self, world_model: WorldModel, start: RSSMState, horizon: int) -> ImaginedTrajectory:
        """:meth:`imagine` with straight-through actions and a graph through the dynamics, step by step."""
        state = start
        features = [world_model.features(state)]
        log_probs, entropy = [], []
        for _ in range(horizon):
            policy = self.policy(features[-1].detach())
            action = policy.rsample()  # [N, A]
            log_probs.append(policy.log_prob(action.detach()))
            entropy.append(policy.entropy())
            state = world_model.rssm.img_step(state, action)
            features.append(world_model.features(state))
        return ImaginedTrajectory(th.stack(features), th.stack(log_probs), th.stack(entropy), None)

    def loss(
        self,
        world_model: WorldModel,
        start: RSSMState,
        is_terminal: th.Tensor,
        horizon: int,
        gamma: float,
        lambda_: float,
        reinforce_mix: float | th.Tensor,
        entropy_coef: float | th.Tensor,
        predict_discount: bool = True,
        normalize_returns: bool = False,
        backprop: bool | None = None,
    ) -> BehaviourLosses:
        """Imagine from ``start`` and compute the actor and critic losses.

        :param world_model: the (frozen) world model
        :param start: posterior states ``[N, ...]`` (detached)
        :param is_terminal: real terminal flags of the start states ``[N]``
        :param horizon: H
        :param gamma: γ
        :param lambda_: λ
        :param reinforce_mix: ρ
        :param entropy_coef: η
        :param predict_discount: use the discount head (else a constant γ)
        :param normalize_returns: divide advantages by the return scale S (:class:`ReturnNormalizer`), else S = 1
        :param backprop: imagine with gradients through the dynamics (default: ρ < 1, which dynamics backpropagation
            needs); given explicitly where ρ is a tensor
        """
        if backprop is None:
            backprop = reinforce_mix < 1
        trajectory = self.imagine(world_model, start, horizon, backprop)
        features = trajectory.features  # [H + 1, N, F]
        with th.set_grad_enabled(backprop):
            rewards = world_model.reward(features[:-1], trajectory.rows(slice(None, -1)))  # r̂_t, t = 0 .. H - 1: [H, N]
            if predict_discount:
                discounts = world_model.discount(features[1:-1], trajectory.rows(slice(1, -1)))  # γ̂_t, t = 1 .. H - 1
            else:
                discounts = th.full_like(rewards[1:], gamma)
            first = gamma * (~is_terminal).float()  # the real discount of the start state
            discounts = th.cat([first.unsqueeze(0), discounts], dim=0)  # [H, N]
            values = self.value(features, slow=True, onehot=trajectory.onehot)  # [H + 1, N]
            returns = lambda_return(rewards, values[:-1], discounts, values[-1], lambda_)  # [H, N]
        weights = discount_weights(discounts)  # [H, N]
        return_scale = self.return_normalizer.update(returns) if normalize_returns else th.ones((), device=returns.device)

        # The actor at s_t (t = 0 .. H - 2) is judged by V^λ_{t+1}, with the slow critic's v(s_t) as baseline.
        actor_loss = actor_objective(
            trajectory.log_probs[:-1], trajectory.entropy[:-1], returns[1:], values[:-2].detach(), weights[:-1],
            reinforce_mix, entropy_coef, return_scale,
        )
        critic_values = self.value(features[:-1].detach(), onehot=trajectory.rows(slice(None, -1)))  # [H, N]
        critic_loss_value = critic_loss(critic_values, returns, weights)
        metrics = {
            "actor_loss": actor_loss.detach(),
            "actor_entropy": trajectory.entropy.mean().detach(),
            "critic_loss": critic_loss_value.detach(),
            "imagined_return": returns.mean().detach(),
            "return_scale": return_scale,
            "imagined_reward": rewards.mean().detach(),
            "value_mean": critic_values.mean().detach(),
        }
        return BehaviourLosses(actor_loss, critic_loss_value, metrics)
