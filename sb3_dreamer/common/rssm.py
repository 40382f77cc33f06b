"""Recurrent state-space model (RSSM) of DreamerV2.

Paper symbols:

* recurrent model       h_t = f(h_{t-1}, z_{t-1}, a_{t-1})       :meth:`RSSM.recurrent` (GRU with layer norm)
* transition predictor  ẑ_t ~ p(ẑ_t | h_t)                       :meth:`RSSM.img_step` (the prior)
* representation model  z_t ~ q(z_t | h_t, e_t)                   :meth:`RSSM.obs_step` (the posterior; also
                                                                  :meth:`RSSM.filter_step`, without the prior)
* model state           s_t = (h_t, z_t): ``RSSMState(deter=h_t, stoch=z_t, stats=...)``

Stochastic states are ``stoch_size`` categorical variables with ``classes`` classes each, sampled one-hot with
straight-through gradients; ``classes=0`` selects diagonal Gaussian latents (the paper's ablation), with
std = 2 * sigmoid(x / 2) + min_std. ``is_first`` zeroes the previous state and action inside :meth:`RSSM.obs_step`
and :meth:`RSSM.observe`.
"""


import torch as th
from torch import nn
from torch.distributions import Independent, Normal, OneHotCategoricalStraightThrough
from torch.nn import functional as F

from sb3_dreamer.common.distributions import argmax_onehot, straight_through_onehot
from sb3_dreamer.common.networks import MLP, OneHotPrefix, dense_layer
from sb3_dreamer.common.type_aliases import RSSMState


class LayerNormGRUCell(nn.Module):
    """GRU cell with one dense layer on [input, state], layer norm, and update-gate bias -1 (the official cell).

    :param input_size: size of the input x
    :param hidden_size: size of the state h
    :param layer_norm: apply layer norm to the gate pre-activations (the "no layer norm" ablation turns it off)
    """

    def __init__(self, input_size: int, hidden_size: int, layer_norm: bool = True) -> None:
        super().__init__()
        self.linear = dense_layer(input_size + hidden_size, 3 * hidden_size, bias=not layer_norm)
        self.norm = nn.LayerNorm(3 * hidden_size) if layer_norm else nn.Identity()

    def forward(self, x: th.Tensor, h: th.Tensor) -> th.Tensor:
        parts = self.norm(self.linear(th.cat([x, h], dim=-1))).float()  # gates in fp32 (a no-op without autocast)
        reset, candidate, update = parts.chunk(3, dim=-1)
        reset = th.sigmoid(reset)
        candidate = th.tanh(reset * candidate)
        update = th.sigmoid(update - 1.0)
        return th.lerp(h, candidate, update)  # update * candidate + (1 - update) * h, in one op


class RSSM(nn.Module):
    """The RSSM: priors from :meth:`img_step`, posteriors from :meth:`obs_step`, sequences from :meth:`observe`.

    :param action_dim: size of the model actions (one-hot width for discrete actions)
    :param embed_dim: size of the encoder embedding e_t
    :param deter_size: size of h_t
    :param hidden_size: units of the dense layers around the GRU
    :param stoch_size: number of latent variables in z_t
    :param classes: classes per categorical variable; 0 for Gaussian latents
    :param layer_norm: layer norm inside the GRU
    :param min_std: minimum std of Gaussian latents
    """

    def __init__(
        self,
        action_dim: int,
        embed_dim: int,
        deter_size: int = 600,
        hidden_size: int = 600,
        stoch_size: int = 32,
        classes: int = 32,
        layer_norm: bool = True,
        min_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.deter_size, self.stoch_size, self.classes, self.min_std = deter_size, stoch_size, classes, min_std
        self.discrete = classes > 0
        self.stoch_dim = stoch_size * classes if self.discrete else stoch_size
        stats_dim = stoch_size * classes if self.discrete else 2 * stoch_size
        self.img_in = MLP(dense_layer(self.stoch_dim + action_dim, hidden_size), nn.ELU())  # input [z_{t-1}, a_{t-1}]
        self.cell = LayerNormGRUCell(hidden_size, deter_size, layer_norm)
        self.img_out = nn.Sequential(dense_layer(deter_size, hidden_size), nn.ELU(), dense_layer(hidden_size, stats_dim))
        self.obs_out = nn.Sequential(
            dense_layer(deter_size + embed_dim, hidden_size), nn.ELU(), dense_layer(hidden_size, stats_dim)
        )

    def initial(self, batch_size: int, device: th.device) -> RSSMState:
        """The zero state s_0 for ``batch_size`` sequences."""
        stats_shape = (batch_size, self.stoch_size, self.classes) if self.discrete else (batch_size, 2 * self.stoch_size)
        return RSSMState(
            deter=th.zeros(batch_size, self.deter_size, device=device),
            stoch=th.zeros(batch_size, self.stoch_dim, device=device),
            stats=th.zeros(stats_shape, device=device),
        )

    def _stats(self, raw: th.Tensor) -> th.Tensor:
        raw = raw.float()  # distributions in fp32, also under bf16 autocast
        if self.discrete:
            return raw.reshape(*raw.shape[:-1], self.stoch_size, self.classes)  # [*, stoch, classes] logits
        mean, std = raw.chunk(2, dim=-1)
        return th.cat([mean, 2 * th.sigmoid(std / 2) + self.min_std], dim=-1)

    def distribution(self, stats: th.Tensor) -> th.distributions.Distribution:
        """The distribution of z_t given its statistics (event dims: the latent variables)."""
        if self.discrete:
            return Independent(OneHotCategoricalStraightThrough(logits=stats), 1)
        mean, std = stats.chunk(2, dim=-1)
        return Independent(Normal(mean, std), 1)

    def _sample(self, stats: th.Tensor, sample: bool) -> th.Tensor:
        if self.discrete:
            if sample:
                onehot = straight_through_onehot(stats)
            else:
                onehot = argmax_onehot(stats)
            return onehot.flatten(-2)  # [*, stoch * classes]
        mean, std = stats.chunk(2, dim=-1)
        return mean + std * th.randn_like(std) if sample else mean

    def onehot(self, stoch: th.Tensor) -> OneHotPrefix | None:
        """Where the ones of sampled one-hot latents z_t ``[*, stoch_dim]`` are (None for Gaussian latents).

        Valid for samples and modes only, not for the zero state: callers pass it where every z_t is a sample.
        """
        if not self.discrete:
            return None
        classes = th.arange(self.classes, dtype=stoch.dtype, device=stoch.device)
        offsets = th.arange(0, self.stoch_dim, self.classes, device=stoch.device)  # first flat position of each variable
        # The class of each one-hot as a dot product with 0..C-1 (8x faster than argmax over 32 classes on the CPU);
        # rounding absorbs the last-bit error of straight-through samples (1 + p - p).
        index = (stoch.unflatten(-1, (self.stoch_size, self.classes)) @ classes).round_().long() + offsets  # [*, K]
        return OneHotPrefix(index, self.stoch_dim)

    def recurrent(self, prev: RSSMState, prev_action: th.Tensor, prev_onehot: OneHotPrefix | None = None) -> th.Tensor:
        """The recurrent model: h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]): ``[N, deter_size]``.

        ``prev_onehot`` (:meth:`onehot` of ``prev.stoch``) computes the input layer as a gather where no gradient must
        reach z_{t-1}.
        """
        x = self.img_in(th.cat([prev.stoch, prev_action], dim=-1), prev_onehot)
        return self.cell(x, prev.deter)

    def img_step(
        self, prev: RSSMState, prev_action: th.Tensor, sample: bool = True, prev_onehot: OneHotPrefix | None = None
    ) -> RSSMState:
        """Prior step: h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]), ẑ_t ~ p(ẑ_t | h_t) (``prev_onehot``: see :meth:`recurrent`)."""
        deter = self.recurrent(prev, prev_action, prev_onehot)
        stats = self._stats(self.img_out(deter))
        return RSSMState(deter, self._sample(stats, sample), stats)

    def _posterior(self, deter: th.Tensor, embed: th.Tensor, sample: bool) -> RSSMState:
        """z_t ~ q(z_t | h_t, e_t)."""
        stats = self._stats(self.obs_out(th.cat([deter, embed], dim=-1)))
        return RSSMState(deter, self._sample(stats, sample), stats)

    @staticmethod
    def _reset(prev: RSSMState, prev_action: th.Tensor, is_first: th.Tensor) -> tuple[RSSMState, th.Tensor]:
        """Zero the previous state and action of the rows that start an episode."""
        keep = (~is_first).float().unsqueeze(-1)  # [N, 1]
        return RSSMState(prev.deter * keep, prev.stoch * keep, prev.stats), prev_action * keep

    def obs_step(
        self, prev: RSSMState, prev_action: th.Tensor, embed: th.Tensor, is_first: th.Tensor, sample: bool = True
    ) -> tuple[RSSMState, RSSMState]:
        """Posterior step: the prior from :meth:`img_step`, then z_t ~ q(z_t | h_t, e_t). Resets where ``is_first``."""
        prior = self.img_step(*self._reset(prev, prev_action, is_first), sample)
        return self._posterior(prior.deter, embed, sample), prior

    def filter_step(
        self, prev: RSSMState, prev_action: th.Tensor, embed: th.Tensor, is_first: th.Tensor, sample: bool = True
    ) -> RSSMState:
        """The posterior of :meth:`obs_step` without the prior (acting needs only s_t; this skips the prior's head)."""
        deter = self.recurrent(*self._reset(prev, prev_action, is_first))
        return self._posterior(deter, embed, sample)

    def observe(
        self, embed: th.Tensor, actions: th.Tensor, is_first: th.Tensor, state: RSSMState | None = None
    ) -> tuple[RSSMState, RSSMState]:
        """Posteriors and priors over sequences.

        :param embed: e_{1:T}: ``[B, T, E]``
        :param actions: a_{0:T-1} (row t holds the action that led to x_t): ``[B, T, A]``
        :param is_first: ``[B, T]``
        :param state: the state before the first step (zeros when None)
        :return: (posterior, prior), each field stacked to ``[B, T, ...]``
        """
        batch, length = embed.shape[:2]
        state = self.initial(batch, embed.device) if state is None else state
        # Only h_t and z_t are recurrent: what does not depend on the previous step runs once over all B * T rows (the
        # reset masks, the a_{t-1} half of the recurrent input layer, the e_t half of the posterior's input layer), and
        # the prior's head, which reads h_t alone, runs on h_{1:T} after the loop. The values and gradients are those of
        # stepping obs_step, with 2T tiny GEMMs (and their gradients) and a dozen small ops per step fewer.
        keep = (~is_first).float().transpose(0, 1).unsqueeze(-1)  # [T, B, 1]: 0 where the previous state is reset
        recurrent_in, posterior_in = self.img_in[0], self.obs_out[0]
        w_stoch, w_action = recurrent_in.weight.split([self.stoch_dim, actions.shape[-1]], dim=1)
        action_in = F.linear(actions.transpose(0, 1) * keep, w_action, recurrent_in.bias)  # [T, B, hidden]
        w_deter, w_embed = posterior_in.weight.split([self.deter_size, embed.shape[-1]], dim=1)
        embed_in = F.linear(embed.transpose(0, 1), w_embed, posterior_in.bias)  # [T, B, hidden]
        posts = []
        for t in range(length):
            x = self.img_in[1](th.addmm(action_in[t], state.stoch * keep[t], w_stoch.t()))  # [B, hidden]
            deter = self.cell(x, state.deter * keep[t])  # h_t: [B, D]
            hidden = self.obs_out[1](th.addmm(embed_in[t], deter, w_deter.t()))
            stats = self._stats(self.obs_out[2](hidden))
            state = RSSMState(deter, self._sample(stats, True), stats)
            posts.append(state)
        post = stack_states(posts, dim=1)
        prior_stats = self._stats(self.img_out(post.deter))  # [B, T, ...]
        return post, RSSMState(post.deter, self._sample(prior_stats, True), prior_stats)

    def features(self, state: RSSMState, latent_features: str = "full", out: th.Tensor | None = None) -> th.Tensor:
        """Model features fed to the heads: [z_t, h_t] (``"full"``) or z_t alone (``"stoch"``, fully discrete).

        ``out``: write them there (e.g. one step's rows of a preallocated trajectory) instead of a new tensor.
        """
        if latent_features == "stoch":
            return state.stoch if out is None else out.copy_(state.stoch)
        return th.cat([state.stoch, state.deter], dim=-1, out=out)

    def kl(self, lhs_stats: th.Tensor, rhs_stats: th.Tensor) -> th.Tensor:
        """KL(lhs || rhs) summed over the latent variables: ``[*]``."""
        if self.discrete:
            log_p, log_q = F.log_softmax(lhs_stats, -1), F.log_softmax(rhs_stats, -1)
            return (log_p.exp() * (log_p - log_q)).sum((-2, -1))
        return th.distributions.kl_divergence(self.distribution(lhs_stats), self.distribution(rhs_stats))

    def entropy(self, stats: th.Tensor) -> th.Tensor:
        """Entropy of z_t's distribution: ``[*]``."""
        if self.discrete:
            log_p = F.log_softmax(stats, -1)
            return -(log_p.exp() * log_p).sum((-2, -1))
        return self.distribution(stats).entropy()


def stack_states(states: list[RSSMState], dim: int) -> RSSMState:
    return RSSMState(*(th.stack(field, dim=dim) for field in zip(*states)))


def flatten_states(state: RSSMState) -> RSSMState:
    """``[B, T, ...]`` -> ``[B * T, ...]`` for every field."""
    return RSSMState(*(field.reshape(-1, *field.shape[2:]) for field in state))
