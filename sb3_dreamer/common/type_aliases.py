"""Structured containers shared across sb3_dreamer.

Shapes use B (batch of sequences), T (sequence length), H (imagination horizon), N (number of imagination starts).
"""

from typing import NamedTuple, Union

import torch as th

TensorDict = dict[str, th.Tensor]
ObsTensor = Union[th.Tensor, TensorDict]


class SequenceSamples(NamedTuple):
    """A batch of fixed-length windows from a :class:`~sb3_dreamer.common.buffers.SequenceReplayBuffer`.

    Row ``t`` of a window is the Dreamer step convention: ``observations[:, t]`` is x_t, ``actions[:, t]`` is the action
    a_{t-1} that led to x_t (zeros where ``is_first``), ``rewards[:, t]`` is r_t received on arriving at x_t (zero where
    ``is_first``).
    """

    observations: ObsTensor  # [B, T, *obs_shape] in the stored dtype (uint8 images stay uint8), or a dict of those
    actions: th.Tensor  # [B, T, action_dim] float32, buffer actions (index for Discrete, scaled [-1, 1] for Box)
    rewards: th.Tensor  # [B, T] float32
    is_first: th.Tensor  # [B, T] bool, True at the first step of an episode and at the first step of every window
    is_terminal: th.Tensor  # [B, T] bool, the episode ended by termination at this step (not truncation)
    is_last: th.Tensor  # [B, T] bool, the episode ended here (termination or truncation)


class RSSMState(NamedTuple):
    """Model state s_t = (h_t, z_t) of the RSSM, plus the statistics z_t was drawn from."""

    deter: th.Tensor  # h_t: [..., deter_size]
    stoch: th.Tensor  # z_t: [..., stoch_size * classes] (flattened one-hot) or [..., stoch_size] (Gaussian)
    stats: th.Tensor  # logits [..., stoch_size, classes] or concatenated (mean, std) [..., 2 * stoch_size]
