"""The DreamerV2 world model: encoder, RSSM, image/vector decoder, reward head and discount head.

Loss (per sequence step, averaged over B x T):

    L = Σ_keys scale_key · ½‖x̂_t - x_t‖²  +  reward_scale · ½(r̂_t - f(r_t))²
        + discount_scale · BCE(γ̂_t, γ · (1 - is_terminal_t))  +  kl_scale · KL-balance(q, p)

where f is the reward transform (``identity``, ``tanh`` or ``sign``). ``stop_image_grad`` / ``stop_reward_grad`` feed
the decoder / reward head stop-gradient features, so those losses no longer shape the representation (the paper's
ablations).
"""

from typing import Any

import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_dreamer.common.distributions import ActionCodec
from sb3_dreamer.common.losses import kl_balance
from sb3_dreamer.common.networks import MultiDecoder, MultiEncoder, OneHotPrefix, mlp
from sb3_dreamer.common.rssm import RSSM
from sb3_dreamer.common.type_aliases import RSSMState, SequenceSamples

REWARD_TRANSFORMS = {"identity": lambda r: r, "tanh": th.tanh, "sign": th.sign}


class WorldModel(nn.Module):
    """Encoder + RSSM + heads, trained on replayed sequences.

    :param encoder: observation encoder
    :param rssm: the recurrent state-space model
    :param action_codec: converts buffer actions to model actions
    :param mlp_layers: hidden layers of the reward and discount heads (and the vector decoder)
    :param mlp_units: units per hidden layer of those MLPs
    :param latent_features: ``"full"`` ([z_t, h_t] to the heads) or ``"stoch"`` (z_t only: the fully discrete model)
    :param image_dist: ``"mse"`` (Gaussian, unit variance) or ``"binary"`` (Bernoulli, for binary grids such as MinAtar)
    """

    def __init__(
        self,
        encoder: MultiEncoder,
        rssm: RSSM,
        action_codec: ActionCodec,
        mlp_layers: int,
        mlp_units: int,
        latent_features: str = "full",
        image_dist: str = "mse",
    ) -> None:
        super().__init__()
        if latent_features not in ("full", "stoch"):
            raise ValueError(f"latent_features must be 'full' or 'stoch', got {latent_features!r}")
        if image_dist not in ("mse", "binary"):
            raise ValueError(f"image_dist must be 'mse' or 'binary', got {image_dist!r}")
        self.encoder, self.rssm, self.action_codec = encoder, rssm, action_codec
        self.latent_features, self.image_dist = latent_features, image_dist
        self.feature_dim = rssm.stoch_dim + (rssm.deter_size if latent_features == "full" else 0)
        self.decoder = MultiDecoder(self.feature_dim, encoder, mlp_layers, mlp_units)
        self.reward_head = mlp(self.feature_dim, 1, mlp_layers, mlp_units)
        self.discount_head = mlp(self.feature_dim, 1, mlp_layers, mlp_units)

    def features(self, state: RSSMState, out: th.Tensor | None = None) -> th.Tensor:
        """Model features of ``state`` (:meth:`RSSM.features`), written into ``out`` when given."""
        return self.rssm.features(state, self.latent_features, out)

    def embed(self, obs: Any) -> tuple[dict[str, th.Tensor], th.Tensor]:
        """Raw observations ``[*batch, ...]`` to (preprocessed inputs, embeddings e_t ``[*batch, E]``)."""
        inputs = self.encoder.preprocess(obs)
        return inputs, self.encoder(inputs)

    def decode(self, features: th.Tensor) -> dict[str, th.Tensor]:
        """Predicted observations (in the preprocessed space) per key."""
        out = self.decoder(features)
        if self.image_dist == "binary":
            out = {k: th.sigmoid(v) - 0.5 if k in self.decoder.cnn_keys else v for k, v in out.items()}
        return out

    def features_onehot(self, state: RSSMState) -> OneHotPrefix | None:
        """The one-hot prefix of :meth:`features` for sampled states (z_t comes first in both layouts)."""
        return self.rssm.onehot(state.stoch)

    def reward(self, features: th.Tensor, onehot: OneHotPrefix | None = None) -> th.Tensor:
        """Mean of the reward head (transformed rewards): ``[*]``. ``onehot``: see :class:`~.networks.MLP`."""
        return self.reward_head(features, onehot).squeeze(-1).float()

    def discount(self, features: th.Tensor, onehot: OneHotPrefix | None = None) -> th.Tensor:
        """Mean of the discount head, γ̂ in [0, 1]: ``[*]``. ``onehot``: see :class:`~.networks.MLP`."""
        return th.sigmoid(self.discount_head(features, onehot).squeeze(-1).float())

    def reconstruction_losses(self, features: th.Tensor, inputs: dict[str, th.Tensor]) -> dict[str, th.Tensor]:
        """Negative log-likelihood (up to constants) of each observation key, summed over its dims: ``{key: [B, T]}``."""
        predictions = self.decoder(features)
        losses = {}
        for key, prediction in predictions.items():
            prediction, target = prediction.float(), inputs[key]
            dims = tuple(range(2, target.dim()))
            if self.image_dist == "binary" and key in self.decoder.cnn_keys:
                nll = F.binary_cross_entropy_with_logits(prediction, (target > 0).float(), reduction="none")
                losses[key] = nll.sum(dims) if dims else nll
            else:  # unit-variance Gaussian; the squared errors in one fused op, halved after the sum
                squared = F.mse_loss(prediction, target, reduction="none")
                losses[key] = 0.5 * (squared.sum(dims) if dims else squared)
        return losses

    def loss(
        self,
        batch: SequenceSamples,
        gamma: float,
        kl_scale: float = 1.0,
        kl_balance_alpha: float = 0.8,
        free_nats: float = 0.0,
        reward_scale: float = 1.0,
        discount_scale: float = 1.0,
        reconstruction_scale: float = 1.0,
        reward_transform: str = "identity",
        predict_discount: bool = True,
        stop_image_grad: bool = False,
        stop_reward_grad: bool = False,
    ) -> tuple[th.Tensor, RSSMState, dict[str, th.Tensor]]:
        """World-model loss on a batch of sequences.

        :return: (loss, posterior states ``[B, T, ...]``, detached metrics)
        """
        inputs, embed = self.embed(batch.observations)  # embed: [B, T, E]
        actions = self.action_codec.buffer_to_model(batch.actions)  # [B, T, A]
        post, prior = self.rssm.observe(embed, actions, batch.is_first)
        features = self.features(post)  # [B, T, F]

        recon = self.reconstruction_losses(features.detach() if stop_image_grad else features, inputs)
        reward_target = REWARD_TRANSFORMS[reward_transform](batch.rewards)
        reward_pred = self.reward(features.detach() if stop_reward_grad else features)
        reward_loss = (0.5 * (reward_pred - reward_target) ** 2).mean()
        kl_loss, kl_value = kl_balance(post.stats, prior.stats, self.rssm.kl, kl_balance_alpha, free_nats)

        loss = reconstruction_scale * sum(v.mean() for v in recon.values()) + reward_scale * reward_loss + kl_scale * kl_loss
        metrics = {f"{'image' if key == 'obs' and key in self.decoder.cnn_keys else key}_loss": value.mean().detach()
                   for key, value in recon.items()}
        if predict_discount:
            discount_target = gamma * (~batch.is_terminal).float()  # [B, T]
            discount_logits = self.discount_head(features).squeeze(-1).float()
            discount_loss = F.binary_cross_entropy_with_logits(discount_logits, discount_target)
            loss = loss + discount_scale * discount_loss
            metrics["discount_loss"] = discount_loss.detach()
        metrics.update(
            model_loss=loss.detach(),
            reward_loss=reward_loss.detach(),
            kl_loss=kl_loss.detach(),
            kl=kl_value.mean(),
            prior_entropy=self.rssm.entropy(prior.stats).mean().detach(),
            posterior_entropy=self.rssm.entropy(post.stats).mean().detach(),
        )
        return loss, post, metrics
