"""Action distributions of the actor and conversions between the three action encodings.

Encodings:

* **model actions**: what the RSSM and the actor see: one-hot vectors for ``Discrete`` (concatenated one-hots for
  ``MultiDiscrete``), values in [-1, 1] for ``Box``;
* **buffer actions**: what SB3's replay buffers store: the index for ``Discrete``/``MultiDiscrete``, the [-1, 1]
  value for ``Box``;
* **env actions**: what ``env.step`` takes: the index, or the value rescaled to the space's bounds.

Discrete actors sample one-hot actions with straight-through gradients (sample + probs - stop_grad(probs)); continuous
actors use the official truncated normal on [-1, 1] (mean = tanh(x), std = 2 * sigmoid((x + 2) / 2) + min_std).
"""

import functools
import math
from abc import ABC, abstractmethod

import numpy as np
import torch as th
from gymnasium import spaces
from torch.distributions import OneHotCategoricalStraightThrough
from torch.nn import functional as F

SUPPORTED_ACTION_SPACES = (spaces.Discrete, spaces.MultiDiscrete, spaces.Box)


def argmax_onehot(logits: th.Tensor) -> th.Tensor:
    """The one-hot of the largest logit along the last axis, in the logits' dtype.

    Same values as ``F.one_hot(logits.argmax(-1))``, without its range check of the indices (a min/max reduction and a
    host sync per call, wasted on an argmax), which matters in the per-step loops of acting and imagination.
    """
    index = logits.argmax(-1, keepdim=True)
    return th.zeros_like(logits).scatter_(-1, index, 1.0)


def sample_onehot(probs: th.Tensor) -> th.Tensor:
    """A one-hot sample from the categorical ``probs`` (last axis), by inverse-CDF sampling.

    One uniform number per variable (the Gumbel-max trick draws one per class, and CPU random numbers are generated
    serially: 32x fewer for 32 classes), then the first class whose cumulative probability exceeds it. Much faster than
    ``torch.multinomial`` too.
    """
    cdf = probs.cumsum(-1)
    uniform = th.rand_like(cdf[..., -1:]) * cdf[..., -1:]  # scaled by the total, in case rounding leaves it below 1
    index = th.searchsorted(cdf, uniform, right=True).clamp_(max=probs.shape[-1] - 1)  # [*, 1]
    return th.zeros_like(probs).scatter_(-1, index, 1.0)


def straight_through_onehot(logits: th.Tensor) -> th.Tensor:
    """A one-hot sample from ``logits`` (last axis) whose gradient is that of the probabilities: sample + probs - sg(probs).

    Without a graph to record (acting, Reinforce-only imagination) the sample is returned as it is.
    """
    probs = th.softmax(logits, dim=-1)
    sample = sample_onehot(probs.detach())
    if not (th.is_grad_enabled() and logits.requires_grad):
        return sample
    return sample + probs - probs.detach()


class ActionDistribution(ABC):
    """The actor's distribution over model actions ``[N, action_input_dim]``."""

    @abstractmethod
    def rsample(self) -> th.Tensor:
        """A sample, reparameterized (straight-through for discrete actions)."""

    @abstractmethod
    def mode(self) -> th.Tensor:
        """The most likely action (deterministic policy)."""

    @abstractmethod
    def log_prob(self, actions: th.Tensor) -> th.Tensor:
        """log π(a | s): ``[N]``."""

    @abstractmethod
    def entropy(self) -> th.Tensor:
        """H[π(· | s)]: ``[N]``."""


class OneHotActions(ActionDistribution):
    """Independent one-hot categoricals, one per action dimension (one for ``Discrete``)."""

    def __init__(self, logits: th.Tensor, sizes: list[int]) -> None:
        self.sizes = sizes
        self.logits = logits.split(sizes, dim=-1)

    @functools.cached_property
    def dists(self) -> list[OneHotCategoricalStraightThrough]:
        """The torch distributions, built on first use (acting needs only :meth:`rsample` or :meth:`mode`)."""
        return [OneHotCategoricalStraightThrough(logits=chunk, validate_args=False) for chunk in self.logits]

    def rsample(self) -> th.Tensor:
        return th.cat([straight_through_onehot(chunk) for chunk in self.logits], dim=-1)

    def mode(self) -> th.Tensor:
        return th.cat([argmax_onehot(chunk) for chunk in self.logits], dim=-1)

    def log_prob(self, actions: th.Tensor) -> th.Tensor:
        return sum(d.log_prob(a) for d, a in zip(self.dists, actions.split(self.sizes, dim=-1)))  # type: ignore[return-value]

    def entropy(self) -> th.Tensor:
        return sum(d.entropy() for d in self.dists)  # type: ignore[return-value]


class TruncatedNormalActions(ActionDistribution):
    """Diagonal normal truncated to [-1, 1] (the official ``trunc_normal`` action distribution)."""

    def __init__(self, mean: th.Tensor, std: th.Tensor, low: float = -1.0, high: float = 1.0) -> None:
        self.mean, self.std = mean, std
        self.alpha = (low - mean) / std
        self.beta = (high - mean) / std
        self.low, self.high = low, high
        self.cdf_alpha, self.cdf_beta = _normal_cdf(self.alpha), _normal_cdf(self.beta)
        self.z = (self.cdf_beta - self.cdf_alpha).clamp_min(1e-8)

    def rsample(self) -> th.Tensor:
        # Inverse-CDF sampling: differentiable in mean and std.
        u = th.rand_like(self.mean).clamp(1e-6, 1 - 1e-6)
        p = self.cdf_alpha + u * self.z
        x = self.mean + self.std * math.sqrt(2) * th.erfinv((2 * p - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        return x.clamp(self.low, self.high)

    def mode(self) -> th.Tensor:
        return self.mean.clamp(self.low, self.high)

    def log_prob(self, actions: th.Tensor) -> th.Tensor:
        xi = (actions - self.mean) / self.std
        log_pdf = -0.5 * xi**2 - 0.5 * math.log(2 * math.pi) - self.std.log() - self.z.log()
        return log_pdf.sum(-1)

    def entropy(self) -> th.Tensor:
        pdf_alpha, pdf_beta = _normal_pdf(self.alpha), _normal_pdf(self.beta)
        entropy = (
            0.5 * math.log(2 * math.pi * math.e)
            + self.std.log()
            + self.z.log()
            + (self.alpha * pdf_alpha - self.beta * pdf_beta) / (2 * self.z)
        )
        return entropy.sum(-1)


def _normal_cdf(x: th.Tensor) -> th.Tensor:
    return 0.5 * (1 + th.erf(x / math.sqrt(2)))


def _normal_pdf(x: th.Tensor) -> th.Tensor:
    return th.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


class ActionCodec:
    """Converts between model, buffer and env actions for one action space, and builds the actor's distribution.

    :param action_space: ``Discrete``, ``MultiDiscrete`` or bounded ``Box``
    :param min_std: lower bound of the continuous actor's standard deviation
    """

    def __init__(self, action_space: spaces.Space, min_std: float = 0.1) -> None:
        if not isinstance(action_space, SUPPORTED_ACTION_SPACES):
            raise ValueError(
                f"Unsupported action space {action_space}: DreamerV2 supports Discrete, MultiDiscrete and bounded Box."
            )
        self.space = action_space
        self.min_std = min_std
        if isinstance(action_space, spaces.Discrete):
            self.sizes = [int(action_space.n)]
        elif isinstance(action_space, spaces.MultiDiscrete):
            if action_space.nvec.ndim != 1:
                raise ValueError(f"MultiDiscrete action spaces must be 1-D, got nvec shape {action_space.nvec.shape}.")
            self.sizes = [int(n) for n in action_space.nvec]
        else:
            if len(action_space.shape) != 1:
                raise ValueError(f"Box action spaces must be 1-D, got shape {action_space.shape}.")
            if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
                raise ValueError("Box action spaces must be bounded (finite low and high) for DreamerV2.")
            if not np.all(action_space.high > action_space.low):
                raise ValueError(f"Box action spaces need high > low in every dimension, got {action_space}.")
            self.sizes = []
        self.discrete = bool(self.sizes)
        self.input_dim = sum(self.sizes) if self.discrete else int(action_space.shape[0])
        # The actor's output layer: logits, or (mean, std) pre-activations.
        self.param_dim = self.input_dim if self.discrete else 2 * self.input_dim

    def distribution(self, params: th.Tensor) -> ActionDistribution:
        """The actor's distribution from its output layer ``[N, param_dim]``."""
        if self.discrete:
            return OneHotActions(params, self.sizes)
        mean, std = params.chunk(2, dim=-1)
        return TruncatedNormalActions(th.tanh(mean), 2 * th.sigmoid((std + 2.0) / 2) + self.min_std)

    def add_noise(self, actions: th.Tensor, amount: float) -> th.Tensor:
        """Exploration noise on model actions ``[N, input_dim]`` (the official ``action_noise``).

        Discrete: each one-hot block is replaced, with probability ``amount``, by a uniformly random one-hot (the
        mixture amount / n + (1 - amount) * onehot). Continuous: Normal(actions, amount) clipped to [-1, 1].
        """
        if amount <= 0:
            return actions
        if not self.discrete:
            return (actions + amount * th.randn_like(actions)).clamp(-1.0, 1.0)
        blocks = []
        for block, n in zip(actions.split(self.sizes, dim=-1), self.sizes):
            replace = th.rand(block.shape[0], 1, device=block.device) < amount  # [N, 1]
            random = F.one_hot(th.randint(n, block.shape[:1], device=block.device), n).to(block.dtype)
            blocks.append(th.where(replace, random, block))
        return th.cat(blocks, dim=-1)

    def buffer_to_model(self, actions: th.Tensor) -> th.Tensor:
        """Buffer actions ``[*, action_dim]`` to model actions ``[*, input_dim]``."""
        if not self.discrete:
            return actions.float()
        index = actions.long()
        return th.cat([F.one_hot(index[..., i], n).float() for i, n in enumerate(self.sizes)], dim=-1)

    def model_to_buffer(self, actions: th.Tensor) -> np.ndarray:
        """Model actions ``[N, input_dim]`` to buffer actions ``[N, action_dim]`` (numpy)."""
        if not self.discrete:
            return actions.detach().cpu().numpy().astype(np.float32)
        index = th.stack([chunk.argmax(-1) for chunk in actions.split(self.sizes, dim=-1)], dim=-1)
        return index.cpu().numpy()

    def buffer_to_env(self, actions: np.ndarray) -> np.ndarray:
        """Buffer actions ``[N, action_dim]`` to what ``VecEnv.step`` takes."""
        space = self.space
        if isinstance(space, spaces.Discrete):  # indices count from 0, spaces from ``start``
            return actions.reshape(-1).astype(np.int64) + int(space.start)
        if isinstance(space, spaces.MultiDiscrete):
            return actions.astype(np.int64) + space.start.astype(np.int64)
        low, high = space.low, space.high  # type: ignore[attr-defined]
        return np.clip(low + 0.5 * (actions + 1.0) * (high - low), low, high).astype(space.dtype)  # type: ignore[attr-defined]

    def env_to_buffer(self, actions: np.ndarray) -> np.ndarray:
        """Env actions (e.g. uniform random prefill actions) to buffer actions ``[N, action_dim]``."""
        space = self.space
        if isinstance(space, spaces.Discrete):
            return np.asarray(actions).reshape(-1, 1) - int(space.start)
        if isinstance(space, spaces.MultiDiscrete):
            return np.asarray(actions) - space.start
        low, high = space.low, space.high  # type: ignore[attr-defined]
        return (2.0 * (np.asarray(actions) - low) / (high - low) - 1.0).astype(np.float32)
