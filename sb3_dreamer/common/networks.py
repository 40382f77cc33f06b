"""Encoders, decoders and MLP heads of the world model, sized from the observation space.

* Images (3-D ``Box`` spaces of any dtype, channel-first or channel-last) go through a CNN. Images with both sides
  >= 16 pixels use the paper's stack of kernel-4 / stride-2 convolutions with depth ``cnn_depth * 2**i`` (four layers at
  64x64, as in the official Atari encoder); smaller images such as MinAtar's 10x10 grids use two kernel-3 / stride-1
  convolutions that keep the resolution. The decoder mirrors the encoder with transposed convolutions whose output
  padding reproduces the exact input size.
* Everything else (vectors, ``Discrete``/``MultiDiscrete``/``MultiBinary`` observations) goes through an MLP.
* ``Dict`` spaces combine both: one encoder per key, embeddings concatenated; one decoder output per key.

Observations are preprocessed as in the official code: ``uint8`` images to ``x / 255 - 0.5``, boolean grids to
``x - 0.5``, vectors to float32. The decoders predict in that preprocessed space, so reconstruction targets are the
preprocessed observations.
"""

import dataclasses
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space_channels_first
from torch import nn
from torch.nn import functional as F

from sb3_dreamer.common.type_aliases import ObsTensor, TensorDict


@dataclasses.dataclass(frozen=True)
class OneHotPrefix:
    """The leading ``width`` inputs of a layer are a flattened one-hot (several categoricals) with its ones at ``index``.

    The model features [z_t, h_t] and the recurrent model's input [z_t, a_t] start with the one-hot latents z_t; a layer
    that knows it can gather the K weight columns of the ones instead of multiplying by ``width - K`` zeros
    (:func:`onehot_linear`). Index it like the features it describes: ``prefix[:-1]`` goes with ``features[:-1]``.
    """

    index: th.Tensor  # [*, K] flat positions of the ones in [0, width), K = number of categoricals
    width: int

    def __getitem__(self, key: Any) -> "OneHotPrefix":
        return OneHotPrefix(self.index[key], self.width)


# id(weight) -> (weak reference to it, (data_ptr, version, width), W[:, :width]^T contiguous): the gather table of a
# layer, rebuilt when an optimizer step (or any other in-place write) bumps the weight's version counter. Keyed by id
# because tensors compare elementwise; the entry goes when the weight does.
_GATHER_TABLES: dict[int, tuple[weakref.ref, tuple[int, int, int], th.Tensor]] = {}


def _capturing(weight: th.Tensor) -> bool:
    """Whether ``weight``'s device stream is recording a CUDA graph."""
    return weight.is_cuda and th.cuda.is_current_stream_capturing()


def _gather_table(weight: th.Tensor, width: int) -> th.Tensor:
    """``weight[:, :width].t()`` as a contiguous ``[width, out]`` table, cached per weight version.

    ``F.embedding_bag`` needs the rows contiguous; copying them on every call cost about 5 % of an imagination rollout,
    whose 15 steps read the same unchanged weights. Not while a CUDA graph is being captured: the graph must record the
    copy, or its replays would read the table of the weights at capture time after the optimizer has changed them.
    """
    if _capturing(weight):
        return weight.detach()[:, :width].t().contiguous()
    key = (weight.data_ptr(), weight._version, width)
    entry = _GATHER_TABLES.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != key:
        ident = id(weight)
        owner = weakref.ref(weight, lambda _, ident=ident: _GATHER_TABLES.pop(ident, None))
        entry = (owner, key, weight.detach()[:, :width].t().contiguous())
        _GATHER_TABLES[ident] = entry
    return entry[2]


class _OneHotMatmul(th.autograd.Function):
    """``onehot(index) @ weight`` for ``index`` ``[N, K]`` into the rows of ``weight`` ``[width, out]``: a sum of rows.

    The forward reads ``table``, a contiguous copy of ``weight`` (:func:`_gather_table`). The backward scatters the
    output gradient back to the K rows of each input (``index_add_`` once per categorical), about 2x faster on the CPU
    than ``F.embedding_bag``'s own backward, which sorts the indices first.
    """

    @staticmethod
    def forward(ctx: Any, index: th.Tensor, weight: th.Tensor, table: th.Tensor) -> th.Tensor:
        ctx.save_for_backward(index)
        ctx.weight_shape = weight.shape
        return F.embedding_bag(index, table, mode="sum")  # [N, out]

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> tuple[None, th.Tensor, None]:
        (index,) = ctx.saved_tensors
        grad_weight = grad.new_zeros(ctx.weight_shape)
        for column in index.unbind(-1):  # one categorical at a time: [N] rows of the weight, repeats summed
            grad_weight.index_add_(0, column, grad)
        return None, grad_weight, None


def onehot_linear(layer: nn.Linear, x: th.Tensor, prefix: OneHotPrefix) -> th.Tensor:
    """``layer(x)`` for ``x`` ``[*, in]`` whose first ``prefix.width`` entries are the one-hot described by ``prefix``.

    The one-hot part is a sum of K weight columns; only the dense rest is a matrix product. With 32 x 32 latents that
    skips 1024 - 32 of the input dims: the heads' first layers in imagination cost about a third (GRU 600) or a sixth
    (GRU 200) of the dense product. Gradients reach the weights and the dense inputs, not the one-hot part: use it only
    where z_t needs no gradient (:meth:`MLP.forward` checks).
    """
    width = prefix.width
    batch = x.shape[:-1]
    index = prefix.index.reshape(-1, prefix.index.shape[-1])  # [N, K]
    gathered = _OneHotMatmul.apply(index, layer.weight[:, :width].t(), _gather_table(layer.weight, width))  # [N, out]
    dense = F.linear(x[..., width:].reshape(index.shape[0], -1), layer.weight[:, width:], layer.bias)  # [N, out]
    return dense.add_(gathered).reshape(*batch, layer.out_features)  # in place: no second [N, out] allocation


# A product with one input row is a matrix-vector product, which the CPU BLAS runs on one thread at a fraction of the
# memory bandwidth. Acting multiplies one row by every weight of the policy step: with the Atari preset, 23 MB of dense
# weights that come from DRAM on each step, the largest cost there. The same product as a batched GEMM over ROW_BLOCKS
# blocks of output rows streams a weight beyond the cache 2x faster on one thread and 3x faster on two (2-core CPU,
# quiet: 1800 x 1000 at 13 -> 25 / 44 GB/s). Weights that stay in the cache (the small presets) and products with
# more input rows (8 envs) are faster as plain products, hence the bounds. benchmarks/throughput.py measures the policy step.
ROW_BLOCKS = 4
BLOCKED_MIN_WEIGHT = 1 << 19  # elements: 2 MB of fp32, a core's L2 cache here


class BlockedLinear(nn.Linear):
    """``nn.Linear`` whose single-row products on the CPU run as a batched GEMM over blocks of output rows.

    ``out[0, b * n + i] = bias[b * n + i] + sum_k weight[b * n + i, k] * x[0, k]`` for ``ROW_BLOCKS`` blocks of
    ``n = out_features / ROW_BLOCKS`` rows: one ``baddbmm``, equal to the plain product up to the order of the sums.
    Same parameters and state dict as ``nn.Linear``; other inputs and devices go through it unchanged. Build layers
    with :func:`dense_layer`, which picks it only for weights large enough to gain.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        if out_features % ROW_BLOCKS:
            raise ValueError(f"BlockedLinear needs out_features divisible by {ROW_BLOCKS}, got {out_features}.")
        super().__init__(in_features, out_features, bias)

    def forward(self, x: th.Tensor) -> th.Tensor:
        if x.device.type != "cpu" or x.numel() != self.in_features:
            return super().forward(x)
        blocks, size = ROW_BLOCKS, self.out_features // ROW_BLOCKS
        # [blocks, in, 1] without a copy, as the transpose of the [1, in] row: BLAS takes it as a transposed operand
        # (the same values as a [in, 1] view with unit strides go down a path ten times slower)
        column = x.reshape(1, self.in_features).t().unsqueeze(0).expand(blocks, self.in_features, 1)
        weight = self.weight.view(blocks, size, self.in_features)  # [blocks, n, in]
        if self.bias is None:
            out = th.bmm(weight, column)
        else:
            out = th.baddbmm(self.bias.view(blocks, size, 1), weight, column)  # [blocks, n, 1]
        return out.view(*x.shape[:-1], self.out_features)


def dense_layer(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """A dense layer: :class:`BlockedLinear` for a weight of at least ``BLOCKED_MIN_WEIGHT`` elements whose rows split
    into ``ROW_BLOCKS`` blocks, else ``nn.Linear`` (whose forward a subclass would only slow down)."""
    if in_features * out_features >= BLOCKED_MIN_WEIGHT and out_features % ROW_BLOCKS == 0:
        return BlockedLinear(in_features, out_features, bias)
    return nn.Linear(in_features, out_features, bias)


class MLP(nn.Sequential):
    """``nn.Sequential`` of dense layers whose forward can use a known one-hot prefix of its input (same state dict)."""

    def forward(self, x: th.Tensor, onehot: OneHotPrefix | None = None) -> th.Tensor:
        """``[*, in]`` -> ``[*, out]``; with ``onehot`` (and no gradient needed for ``x``) via :func:`onehot_linear`."""
        if onehot is None or (th.is_grad_enabled() and x.requires_grad):  # z_t needs its gradient: dense
            return super().forward(x)
        modules = iter(self)
        x = onehot_linear(next(modules), x, onehot)  # type: ignore[arg-type]
        for module in modules:
            x = module(x)
        return x


def mlp(input_dim: int, output_dim: int, layers: int, units: int, layer_norm: bool = False) -> MLP:
    """``layers`` hidden layers of ``units`` ELU units (optionally layer-normed), then a linear output layer."""
    modules: list[nn.Module] = []
    last = input_dim
    for _ in range(layers):
        modules.append(dense_layer(last, units))
        if layer_norm:
            modules.append(nn.LayerNorm(units))
        modules.append(nn.ELU())
        last = units
    modules.append(dense_layer(last, output_dim))
    return MLP(*modules)


class ObservationCodec:
    """How one observation key is turned into network input (and reconstruction target).

    :param space: the observation space of this key
    """

    def __init__(self, space: spaces.Space) -> None:
        self.space = space
        self.is_image = isinstance(space, spaces.Box) and len(space.shape) == 3
        if isinstance(space, spaces.Box) and len(space.shape) not in (1, 3):
            raise ValueError(
                f"Unsupported observation shape {space.shape}: sb3_dreamer handles vectors (1-D Box) and images (3-D Box, "
                "channel-first or channel-last). Flatten or reshape other observations with a gymnasium wrapper."
            )
        if not isinstance(space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
            raise ValueError(f"Unsupported observation space {space}.")
        if isinstance(space, spaces.MultiDiscrete) and space.nvec.ndim != 1:
            raise ValueError(f"MultiDiscrete observation spaces must be 1-D, got nvec shape {space.nvec.shape}.")
        if self.is_image:
            shape = space.shape
            self.channels_first = bool(is_image_space_channels_first(space))  # type: ignore[arg-type]
            c, h, w = shape if self.channels_first else (shape[2], shape[0], shape[1])
            if min(h, w) < 4:
                raise ValueError(f"Image observations must be at least 4x4 pixels, got {shape}.")
            self.shape: tuple[int, ...] = (c, h, w)
        elif isinstance(space, spaces.Discrete):
            self.shape = (int(space.n),)
        elif isinstance(space, spaces.MultiDiscrete):
            self.shape = (int(np.sum(space.nvec)),)
        else:
            self.shape = (int(np.prod(space.shape)),)

    def __call__(self, obs: th.Tensor) -> th.Tensor:
        """Preprocess ``obs`` of shape ``[*batch, *space.shape]`` to float ``[*batch, *self.shape]``."""
        space = self.space
        if isinstance(space, spaces.Discrete):
            index = obs.long() - int(space.start)  # spaces may start at any integer
            if index.dim() > 1 and index.shape[-1] == 1:  # buffer layout [*batch, 1]
                index = index.squeeze(-1)
            return F.one_hot(index, int(space.n)).float()
        if isinstance(space, spaces.MultiDiscrete):
            starts = space.start
            return th.cat([F.one_hot(obs[..., i].long() - int(starts[i]), int(n)).float() for i, n in enumerate(space.nvec)],
                          dim=-1)
        if not self.is_image:
            batch = obs.shape[: obs.dim() - len(space.shape)]
            return obs.float().reshape(*batch, -1)
        if not self.channels_first:
            obs = obs.movedim(-1, -3)  # [*, H, W, C] -> [*, C, H, W]
        if obs.dtype == th.uint8:
            return obs.float().div_(255.0).sub_(0.5)  # in place on the fresh float copy: one allocation per batch
        if obs.dtype == th.bool:
            return obs.float().sub_(0.5)
        return obs.float()


# Acting encodes one or two images at a time; there PyTorch's native CPU convolution beats oneDNN's (Atari encoder on
# the 2-core CPU, 2 threads, quiet: batch 1 1.11 vs 1.61 ms, batch 2 1.52 vs 2.07 ms, batch 4 2.94 vs 3.08 ms; oneDNN is
# much faster at training batch sizes). benchmarks/throughput.py measures the policy step that this speeds up.
NATIVE_CONV_MAX_BATCH = 2


@contextmanager
def native_cpu_conv() -> Iterator[None]:
    """Turn oneDNN (mkldnn) off for the CPU convolutions inside the block (a process-wide flag, restored on exit)."""
    enabled = th.backends.mkldnn.enabled
    th.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        th.backends.mkldnn.enabled = enabled


def _conv_plan(height: int, width: int) -> tuple[int, int, int]:
    """(kernel, stride, n_layers) of the CNN for an image of this size."""
    if min(height, width) < 16:
        return 3, 1, 2  # MinAtar-sized: keep the resolution
    n_layers, h, w = 0, height, width
    while n_layers < 4 and (h - 4) // 2 + 1 >= 2 and (w - 4) // 2 + 1 >= 2:
        h, w, n_layers = (h - 4) // 2 + 1, (w - 4) // 2 + 1, n_layers + 1
    return 4, 2, n_layers


class ConvEncoder(nn.Module):
    """CNN from a ``[*, C, H, W]`` float image to a flat embedding.

    :param shape: (C, H, W)
    :param depth: channels of the first layer; layer i has ``depth * 2**i``
    """

    def __init__(self, shape: tuple[int, ...], depth: int) -> None:
        super().__init__()
        channels, height, width = shape
        kernel, stride, n_layers = _conv_plan(height, width)
        padding = kernel // 2 if stride == 1 else 0
        layers: list[nn.Module] = []
        self.sizes = [(height, width)]  # spatial size before each layer, used by the mirrored decoder
        in_ch = channels
        for i in range(n_layers):
            out_ch = depth * 2**i
            layers += [nn.Conv2d(in_ch, out_ch, kernel, stride, padding), nn.ELU()]
            height = (height + 2 * padding - kernel) // stride + 1
            width = (width + 2 * padding - kernel) // stride + 1
            self.sizes.append((height, width))
            in_ch = out_ch
        self.net = nn.Sequential(*layers).to(memory_format=th.channels_last)  # oneDNN's fast layout (~30% on CPU)
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.out_shape = (in_ch, height, width)
        self.output_dim = int(np.prod(self.out_shape))

    def forward(self, image: th.Tensor) -> th.Tensor:
        batch = image.shape[:-3]
        image = image.reshape(-1, *image.shape[-3:]).contiguous(memory_format=th.channels_last)
        small = image.device.type == "cpu" and image.shape[0] <= NATIVE_CONV_MAX_BATCH
        with native_cpu_conv() if small else nullcontext():
            out = self.net(image)  # [prod(batch), C', H', W']
        return out.reshape(*batch, self.output_dim)


class PointConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution that computes a 1x1 input as the matrix product it is.

    On a 1x1 input, ``out[n, o, i, j] = bias[o] + sum_c x[n, c] * weight[c, o, i, j]``: one GEMM with the weight viewed
    as ``[C_in, C_out * kH * kW]``. The official 64x64 decoder starts with such a layer (1536 -> 192 channels, kernel 5),
    where the CPU transposed-convolution kernel is 8x slower (batch 800, 2 threads: forward 589 vs 69 ms, backward 1121
    vs 143 ms). Same parameters and state dict as ``nn.ConvTranspose2d``; other inputs go through it unchanged.
    """

    def forward(self, x: th.Tensor, output_size: list[int] | None = None) -> th.Tensor:
        plain = self.padding == (0, 0) and self.output_padding == (0, 0) and self.dilation == (1, 1) and self.groups == 1
        if x.shape[-2:] != (1, 1) or output_size is not None or not plain:
            return super().forward(x, output_size)
        out = x.flatten(1) @ self.weight.flatten(1)  # [N, C_in] @ [C_in, C_out * kH * kW]
        out = out.view(-1, self.out_channels, *self.kernel_size)  # [N, C_out, kH, kW]
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out.contiguous(memory_format=th.channels_last)


class PhaseConvTranspose2d(nn.ConvTranspose2d):
    """A stride-s transposed convolution computed as one ordinary convolution and a pixel shuffle (on the CPU).

    Output pixel ``s * q + r`` (per axis) only sees the kernel taps ``j = s * m + r``, so the s² output phases are s²
    ordinary correlations of the input with flipped sub-kernels of size ceil(k / s), stacked as channels and
    interleaved by ``F.pixel_shuffle`` (a kernel that is not a multiple of s is zero-padded and the extra row and column
    cropped). The official decoder's last layer (depth -> 1 channel, kernel 6, 30x30 -> 64x64) is the case it is for:
    the CPU transposed-convolution kernel runs it at a few GFLOP/s; this is about 3x faster forward and 1.5x (depth 48)
    to 2x (depth 16) forward + backward (batch 800, one thread). The wider layers before it are faster as they are.
    Same parameters and state dict as ``nn.ConvTranspose2d``; other devices and configurations go through it unchanged.
    """

    def forward(self, x: th.Tensor, output_size: list[int] | None = None) -> th.Tensor:
        stride = self.stride[0]
        plain = (self.padding == (0, 0) and self.output_padding == (0, 0) and self.dilation == (1, 1) and self.groups == 1
                 and self.stride == (stride, stride) and self.kernel_size[0] == self.kernel_size[1])
        if x.device.type != "cpu" or output_size is not None or not plain or stride == 1:
            return super().forward(x, output_size)
        kernel = self.kernel_size[0]
        taps = -(-kernel // stride)  # ceil(k / s): sub-kernel size
        extra = taps * stride - kernel
        weight = F.pad(self.weight, (0, extra, 0, extra)) if extra else self.weight  # [C_in, C_out, s*taps, s*taps]
        c_in, c_out = weight.shape[:2]
        weight = weight.reshape(c_in, c_out, taps, stride, taps, stride).flip(2, 4)  # tap j = s * m + r, m reversed
        weight = weight.permute(1, 3, 5, 0, 2, 4).reshape(c_out * stride * stride, c_in, taps, taps)  # (c, r_h, r_w)
        out = F.pixel_shuffle(F.conv2d(x, weight, padding=taps - 1), stride)  # [N, C_out, s * (H + taps - 1), ...]
        if extra:
            out = out[..., : out.shape[-2] - extra, : out.shape[-1] - extra]
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out.contiguous(memory_format=th.channels_last)


class ConvDecoder(nn.Module):
    """Transposed CNN from features ``[*, F]`` to an image ``[*, C, H, W]``.

    64x64 images use the official DreamerV2 decoder: a dense layer to ``32 * depth`` channels at 1x1, then transposed
    convolutions with kernels 5, 5, 6, 6 and stride 2 (1 -> 5 -> 13 -> 30 -> 64) and depths 4, 2, 1 x ``depth``. Other
    sizes mirror the encoder, with output padding that reproduces the exact input size.
    """

    def __init__(self, feature_dim: int, encoder: ConvEncoder, channels: int) -> None:
        super().__init__()
        depth = encoder.net[0].out_channels if len(encoder.net) else channels
        self.paper_layout = encoder.sizes[0] == (64, 64) and encoder.stride == 2
        if self.paper_layout:
            self.in_shape: tuple[int, ...] = (32 * depth, 1, 1)
            self.linear = nn.Linear(feature_dim, 32 * depth)
            layers: list[nn.Module] = []
            in_ch = 32 * depth
            for i, kernel in enumerate((5, 5, 6, 6)):
                out_ch = channels if i == 3 else 2 ** (2 - i) * depth
                layer_type = PointConvTranspose2d if i == 0 else PhaseConvTranspose2d if i == 3 else nn.ConvTranspose2d
                layers.append(layer_type(in_ch, out_ch, kernel, 2))
                if i < 3:
                    layers.append(nn.ELU())
                in_ch = out_ch
        else:
            self.in_shape = encoder.out_shape
            self.linear = nn.Linear(feature_dim, encoder.output_dim)
            layers = self._mirror(encoder, channels)
        self.net = nn.Sequential(*layers).to(memory_format=th.channels_last)

    @staticmethod
    def _mirror(encoder: ConvEncoder, channels: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        sizes = encoder.sizes
        n_layers = len(sizes) - 1
        in_ch = encoder.out_shape[0]
        for i in reversed(range(n_layers)):
            out_ch = channels if i == 0 else encoder.net[2 * (i - 1)].out_channels
            (h_out, w_out), (h_in, w_in) = sizes[i], sizes[i + 1]
            k, s, p = encoder.kernel, encoder.stride, encoder.padding
            pad_h = h_out - ((h_in - 1) * s - 2 * p + k)
            pad_w = w_out - ((w_in - 1) * s - 2 * p + k)
            layers.append(nn.ConvTranspose2d(in_ch, out_ch, k, s, p, output_padding=(pad_h, pad_w)))
            if i > 0:
                layers.append(nn.ELU())
            in_ch = out_ch
        if n_layers == 0:
            layers.append(nn.Conv2d(in_ch, channels, 1))
        return layers

    def forward(self, features: th.Tensor) -> th.Tensor:
        batch = features.shape[:-1]
        x = self.linear(features)
        if not self.paper_layout:  # the official decoder has no activation after its input layer
            x = F.elu(x)
        x = x.reshape(-1, *self.in_shape).contiguous(memory_format=th.channels_last)  # [prod(batch), C', H', W']
        out = self.net(x)
        return out.reshape(*batch, *out.shape[1:])


def observation_spaces(observation_space: spaces.Space) -> dict[str, spaces.Space]:
    """The observation keys and their spaces (a non-Dict space is the single key ``"obs"``)."""
    if isinstance(observation_space, spaces.Dict):
        for key, sub in observation_space.spaces.items():
            if isinstance(sub, (spaces.Dict, spaces.Tuple)):
                raise ValueError(f"Nested observation spaces are not supported (key {key!r}); flatten the Dict first.")
        return dict(observation_space.spaces)
    if isinstance(observation_space, (spaces.Tuple, spaces.Graph, spaces.Sequence, spaces.Text)):
        raise ValueError(f"Unsupported observation space {observation_space}.")
    return {"obs": observation_space}


def as_dict(obs: ObsTensor) -> TensorDict:
    return obs if isinstance(obs, dict) else {"obs": obs}


class MultiEncoder(nn.Module):
    """One encoder per observation key (CNN for images, MLP for the rest), embeddings concatenated.

    :param observation_space: the (possibly Dict) observation space
    :param cnn_depth: first-layer channels of the CNNs
    :param mlp_layers: hidden layers of the vector encoder
    :param mlp_units: units per hidden layer of the vector encoder
    :param use_cnn: encode images with a CNN (False flattens them into the MLP, as SB3's ``MlpPolicy`` does)
    """

    def __init__(
        self, observation_space: spaces.Space, cnn_depth: int, mlp_layers: int, mlp_units: int, use_cnn: bool = True
    ) -> None:
        super().__init__()
        self.codecs = {key: ObservationCodec(space) for key, space in observation_spaces(observation_space).items()}
        self.cnn_keys = [k for k, c in self.codecs.items() if c.is_image and use_cnn]
        self.mlp_keys = [k for k in self.codecs if k not in self.cnn_keys]
        self.cnns = nn.ModuleDict({k: ConvEncoder(self.codecs[k].shape, cnn_depth) for k in self.cnn_keys})
        self.vector_dim = sum(int(np.prod(self.codecs[k].shape)) for k in self.mlp_keys)
        self.mlp = mlp(self.vector_dim, mlp_units, mlp_layers - 1, mlp_units) if self.mlp_keys else None
        self.output_dim = sum(cnn.output_dim for cnn in self.cnns.values()) + (mlp_units if self.mlp_keys else 0)

    def preprocess(self, obs: ObsTensor) -> TensorDict:
        """Raw observations ``[*batch, *space]`` to float network inputs (also the reconstruction targets)."""
        obs_dict = as_dict(obs)  # by key: predict() passes the user's dict, whose key order may differ from the space's
        return {key: codec(obs_dict[key]) for key, codec in self.codecs.items()}

    def forward(self, inputs: TensorDict) -> th.Tensor:
        """Preprocessed observations to embeddings ``e_t``: ``[*batch, output_dim]``."""
        parts = [self.cnns[k](inputs[k]) for k in self.cnn_keys]
        if self.mlp is not None:
            vectors = th.cat([inputs[k].flatten(start_dim=inputs[k].dim() - len(self.codecs[k].shape))
                              for k in self.mlp_keys], dim=-1)  # [*batch, vector_dim]
            parts.append(F.elu(self.mlp(vectors)))
        return th.cat(parts, dim=-1)


class MultiDecoder(nn.Module):
    """Predicts every observation key from model features; the mirror of :class:`MultiEncoder`.

    :param feature_dim: size of the model features fed to the decoder
    :param encoder: the encoder to mirror
    :param mlp_layers: hidden layers of the vector decoder
    :param mlp_units: units per hidden layer of the vector decoder
    """

    def __init__(self, feature_dim: int, encoder: MultiEncoder, mlp_layers: int, mlp_units: int) -> None:
        super().__init__()
        self.codecs = encoder.codecs
        self.cnn_keys, self.mlp_keys = encoder.cnn_keys, encoder.mlp_keys
        self.cnns = nn.ModuleDict(
            {k: ConvDecoder(feature_dim, encoder.cnns[k], self.codecs[k].shape[0]) for k in self.cnn_keys}  # type: ignore[arg-type]
        )
        self.vector_sizes = [int(np.prod(self.codecs[k].shape)) for k in self.mlp_keys]
        self.mlp = mlp(feature_dim, sum(self.vector_sizes), mlp_layers, mlp_units) if self.mlp_keys else None

    def forward(self, features: th.Tensor) -> TensorDict:
        """Features ``[*batch, F]`` to predicted (preprocessed) observations per key."""
        out = {k: self.cnns[k](features) for k in self.cnn_keys}
        if self.mlp is not None:
            flat = self.mlp(features)  # [*batch, sum(vector_sizes)]
            for key, chunk in zip(self.mlp_keys, flat.split(self.vector_sizes, dim=-1)):
                out[key] = chunk.reshape(*features.shape[:-1], *self.codecs[key].shape)
        return out
