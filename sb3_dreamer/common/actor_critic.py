"""Behaviour learning in imagination: the actor π(a_t | s_t), the critic v(s_t) and its slow copy.

From every posterior state of the replayed batch (N = B · T starts) the actor imagines H steps with the frozen world
model. Rewards r̂ and discounts γ̂ come from the world model's heads (the first discount is the real
γ · (1 - is_terminal)); λ-returns use the slow critic; the actor mixes Reinforce (ρ) and dynamics backpropagation
(1 - ρ) and is regularized by the entropy scale η; the critic regresses the λ-returns. Row t of an imagined trajectory
holds s_t and the action a_{t-1} that led to it (zeros at t = 0), as in the official code.
"""

import copy
from typing import NamedTuple

import torch as th
from torch import nn

from sb3_dreamer.common.distributions import ActionCodec, ActionDistribution
from sb3_dreamer.common.losses import actor_objective, critic_loss, discount_weights, lambda_return
from sb3_dreamer.common.networks import mlp
from sb3_dreamer.common.type_aliases import RSSMState
from sb3_dreamer.common.world_model import WorldModel


class ImaginedTrajectory(NamedTuple):
    features: th.Tensor  # [H + 1, N, F]
    actions: th.Tensor  # [H + 1, N, A], row t is the action that led to s_t


class BehaviourLosses(NamedTuple):
    actor_loss: th.Tensor
    critic_loss: th.Tensor
    metrics: dict[str, th.Tensor]


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

    def policy(self, features: th.Tensor) -> ActionDistribution:
        """π(· | s_t) from features ``[N, F]``."""
        return self.action_codec.distribution(self.actor(features))

    def value(self, features: th.Tensor, slow: bool = False) -> th.Tensor:
        """v(s_t) (or the slow critic's): ``[*]``."""
        return (self.slow_critic if slow else self.critic)(features).squeeze(-1)

    def update_slow_critic(self) -> None:
        """Hard copy of the critic into the slow critic."""
        self.slow_critic.load_state_dict(self.critic.state_dict())

    def imagine(self, world_model: WorldModel, start: RSSMState, horizon: int) -> ImaginedTrajectory:
        """Roll the actor through the world model's prior for ``horizon`` steps from ``start`` (``[N, ...]``)."""
        state = start
        features = [world_model.features(state)]
        actions = [th.zeros(start.deter.shape[0], self.action_codec.input_dim, device=start.deter.device)]
        for _ in range(horizon):
            action = self.policy(features[-1].detach()).rsample()  # [N, A]
            state = world_model.rssm.img_step(state, action)
            features.append(world_model.features(state))
            actions.append(action)
        return ImaginedTrajectory(th.stack(features), th.stack(actions))

    def loss(
        self,
        world_model: WorldModel,
        start: RSSMState,
        is_terminal: th.Tensor,
        horizon: int,
        gamma: float,
        lambda_: float,
        reinforce_mix: float,
        entropy_coef: float,
        predict_discount: bool = True,
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
        """
        with th.set_grad_enabled(reinforce_mix < 1):  # Reinforce alone needs no gradient through the dynamics
            trajectory = self.imagine(world_model, start, horizon)
            features = trajectory.features  # [H + 1, N, F]
            rewards = world_model.reward(features)  # [H + 1, N]
            if predict_discount:
                discounts = world_model.discount(features)
            else:
                discounts = th.full_like(rewards, gamma)
            first = gamma * (~is_terminal).float()  # the real discount of the start state
            discounts = th.cat([first.unsqueeze(0), discounts[1:]], dim=0)  # [H + 1, N]
            values = self.value(features, slow=True)  # [H + 1, N]
            returns = lambda_return(rewards[:-1], values[:-1], discounts[:-1], values[-1], lambda_)  # [H, N]
        weights = discount_weights(discounts)  # [H + 1, N]

        policy = self.policy(features[:-2].detach().flatten(0, 1))  # over [(H - 1) * N, F]
        actions = trajectory.actions[1:-1].detach().flatten(0, 1)  # a_t chosen at s_t
        shape = features.shape[0] - 2, features.shape[1]
        log_probs = policy.log_prob(actions).reshape(shape)
        entropy = policy.entropy().reshape(shape)
        actor_loss = actor_objective(
            log_probs, entropy, returns[1:], values[:-2].detach(), weights[:-2], reinforce_mix, entropy_coef
        )
        critic_values = self.value(features[:-1].detach())  # [H, N]
        critic_loss_value = critic_loss(critic_values, returns, weights[:-1])
        metrics = {
            "actor_loss": actor_loss.detach(),
            "actor_entropy": entropy.mean().detach(),
            "critic_loss": critic_loss_value.detach(),
            "imagined_return": returns.mean().detach(),
            "imagined_reward": rewards.mean().detach(),
            "value_mean": critic_values.mean().detach(),
        }
        return BehaviourLosses(actor_loss, critic_loss_value, metrics)
