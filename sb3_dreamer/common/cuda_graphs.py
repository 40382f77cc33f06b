"""CUDA graphs of the training passes: thousands of small kernel launches per gradient step, paid once at capture.

A DreamerV2 gradient step at the paper's batch (16 x 50, horizon 15) runs the RSSM for T steps and imagines H steps,
forward and backward: some ten thousand small kernels. On a GPU the step is then bound by the host launching them
(measured on an H100: the Atari preset's eager step took as long as its CPU time, at 9 % of the fp32 matmul peak). A
:class:`GraphedPass` records one forward + backward pass once and replays it as a single graph launch.

What stays outside the graphs: the replay sampling (host memory), the optimizer steps (clipping, the divergence check
before any parameter changes, Adam, weight decay: a few multi-tensor kernels each, and learning-rate schedules keep
working) and the slow-critic copy.
"""

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import torch as th

Outputs = TypeVar("Outputs")


@contextmanager
def side_stream() -> Iterator[None]:
    """Run the block on a fresh CUDA stream, ordered after and before the current one (the warm-up before a capture)."""
    current = th.cuda.current_stream()
    stream = th.cuda.Stream()
    stream.wait_stream(current)
    try:
        with th.cuda.stream(stream):
            yield
    finally:
        current.wait_stream(stream)


def copy_into(static: Any, value: Any) -> None:
    """Copy ``value`` into the tensors of ``static`` (tensors, or named tuples / dicts of them, same structure)."""
    if isinstance(static, th.Tensor):
        static.copy_(value, non_blocking=True)
    elif isinstance(static, dict):
        for key, tensor in static.items():
            copy_into(tensor, value[key])
    else:
        for tensor, part in zip(static, value, strict=True):
            copy_into(tensor, part)


def clone_tensors(value: Any) -> Any:
    """A copy of ``value`` (tensors, or named tuples / dicts of them) in new memory: the static inputs of a graph."""
    if isinstance(value, th.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: clone_tensors(part) for key, part in value.items()}
    return type(value)(*(clone_tensors(part) for part in value))


class GraphedPass(Generic[Outputs]):
    """A forward and backward pass recorded once as a CUDA graph and replayed on fixed input tensors.

    ``forward()`` reads its inputs from tensors the caller refills in place before every :meth:`replay`, and returns
    ``(losses, outputs)``. The capture records ``backward`` of the losses too, so a replay recomputes ``outputs`` (the
    same tensor objects every time) and the ``.grad`` of every parameter the losses reach, in the same memory each time.

    Those gradients must be ``None`` when the pass is captured (the backward pass then allocates them from the graph's
    memory pool) and must not be set to ``None`` afterwards (``zero_grad(set_to_none=True)`` would cut them loose from
    the graph); each replay overwrites them, so no zeroing is needed between steps. Random numbers drawn inside the
    pass come from the default CUDA generator, advanced at every replay. Nothing in ``forward`` may synchronize with
    the host (``.item()``, a Python ``if`` on a tensor, boolean-mask indexing): the capture fails with an error if it
    does. Capture executes nothing: the first results come from the first :meth:`replay`.

    :param forward: the pass, from the static inputs to ``(losses, outputs)``
    :param pool: the memory pool of another graph to share (graphs replayed in a fixed order may share one)
    """

    def __init__(self, forward: Callable[[], tuple[list[th.Tensor], Outputs]], pool: Any = None) -> None:
        self.graph = th.cuda.CUDAGraph()
        validate = th.distributions.Distribution._validate_args
        th.distributions.Distribution.set_default_validate_args(False)  # argument checks synchronize
        try:
            with warnings.catch_warnings(), th.cuda.graph(self.graph, pool=pool):
                # the parameters' gradient accumulators were made by eager steps on another stream: intended here
                warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
                losses, self.outputs = forward()
                th.autograd.backward(losses)
        finally:
            th.distributions.Distribution.set_default_validate_args(validate)

    def pool(self) -> Any:
        """The graph's memory pool (to share with the next graph)."""
        return self.graph.pool()

    def replay(self) -> Outputs:
        """Run the pass on the current contents of the static inputs; the gradients are in the parameters' ``.grad``."""
        self.graph.replay()
        return self.outputs
