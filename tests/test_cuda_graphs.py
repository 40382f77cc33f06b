"""The device-independent helpers of sb3_dreamer.common.cuda_graphs (the graphs themselves: tests/test_cuda.py)."""

import torch as th

from sb3_dreamer.common.cuda_graphs import clone_tensors, copy_into
from sb3_dreamer.common.type_aliases import SequenceSamples


def samples(seed: int) -> SequenceSamples:
    generator = th.Generator().manual_seed(seed)
    rand = lambda *shape: th.rand(*shape, generator=generator)  # noqa: E731
    return SequenceSamples(
        observations={"image": (rand(2, 3, 4) * 255).to(th.uint8), "vector": rand(2, 3, 5)}, actions=rand(2, 3, 2),
        rewards=rand(2, 3), is_first=rand(2, 3) > 0.5, is_terminal=rand(2, 3) > 0.5, is_last=rand(2, 3) > 0.5,
    )


def test_static_inputs_are_new_memory_that_copy_into_refills_in_place():
    first, second = samples(0), samples(1)
    static = clone_tensors(first)
    assert isinstance(static, SequenceSamples) and set(static.observations) == {"image", "vector"}
    assert static.rewards.data_ptr() != first.rewards.data_ptr()
    th.testing.assert_close(static.observations["image"], first.observations["image"])

    pointers = [static.observations["image"].data_ptr(), static.actions.data_ptr(), static.is_last.data_ptr()]
    copy_into(static, second)
    assert pointers == [static.observations["image"].data_ptr(), static.actions.data_ptr(), static.is_last.data_ptr()]
    for field, value in zip(static, second):
        if isinstance(value, dict):
            for key in value:
                th.testing.assert_close(field[key], value[key])
        else:
            th.testing.assert_close(field, value)


def test_update_graphs_fit_only_while_the_optimizers_read_their_gradients():
    from sb3_dreamer.dreamerv2.dreamerv2 import UpdateGraphs

    params = [th.nn.Parameter(th.ones(3)), th.nn.Parameter(th.ones(2))]
    for param in params:
        param.grad = th.zeros_like(param)
    graphs = UpdateGraphs(None, None, samples(0), th.zeros(()), th.zeros(()), backprop=False,  # type: ignore[arg-type]
                          grads=[(p, p.grad) for p in params])
    assert graphs.fits(False)
    assert not graphs.fits(True)  # the other imagination regime (rho < 1) needs another capture
    params[1].grad = params[1].grad.clone()  # e.g. zero_grad(set_to_none=True) and an eager backward
    assert not graphs.fits(False)
