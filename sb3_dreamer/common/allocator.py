"""Reuse of freed CPU memory across gradient steps (glibc malloc settings).

A gradient step on a CPU allocates and frees the same large tensors every time: the image activations of B x T = 800
frames are 13-150 MB each. glibc's malloc serves every block above its mmap threshold (32 MiB at most) with a fresh
``mmap`` and unmaps it on ``free``, so each step faults in and zeroes all their pages again: about 117 000 page faults
(460 MB) per small-pong step. On the project's 2-core VM a fresh page costs as much as an element-wise op's arithmetic:
``relu`` over a [800, 16, 30, 30] tensor (one thread) takes 29 ms with fresh pages, 5 ms on reused ones.

Inside :func:`reuse_freed_memory` malloc grows its heap instead of mapping blocks, and the heap is never trimmed, so
the memory one step frees is what the next step allocates. Outside the block the heap does not grow for large blocks:
what does not fit in it (a replay buffer created later, large user arrays) is mapped, lazily zero-filled and returned
on ``free`` as usual. The cost is that the process keeps its heap at the training peak, as PyTorch's CUDA caching
allocator keeps GPU memory. ``SB3_DREAMER_MALLOC=system`` in the environment leaves malloc's settings alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from collections.abc import Callable, Iterator
from typing import Any

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
DEFAULT_MMAP_MAX = 65536  # glibc's default number of simultaneous mmap'd blocks
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest threshold glibc accepts on 64-bit
ENV_SWITCH = "SB3_DREAMER_MALLOC"

_mallopt: Any = None  # the C function once looked up; False where malloc is not glibc's
_heap_kept = False
_depth = 0  # nesting of reuse_freed_memory blocks


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    global _mallopt
    if _mallopt is None:
        _mallopt = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _mallopt = libc.mallopt
            _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return _mallopt or None


def available() -> bool:
    """Whether malloc can be tuned here: glibc on Linux, and not switched off by ``SB3_DREAMER_MALLOC=system``."""
    return os.environ.get(ENV_SWITCH, "").lower() != "system" and _glibc_mallopt() is not None


def keep_heap() -> bool:
    """Stop glibc from returning the top of the heap to the system, and fix the mmap threshold at its 32 MiB maximum
    (what glibc's dynamic threshold grows to anyway). Applied once per process.

    :return: whether the settings are in force
    """
    global _heap_kept
    if not _heap_kept and available():
        _heap_kept = bool(_mallopt(M_TRIM_THRESHOLD, -1)) and bool(_mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD))
    return _heap_kept


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Serve every allocation inside the block from malloc's heap (no ``mmap``), which is kept between blocks.

    :param enabled: ``False`` makes this a no-op (e.g. for CUDA training, whose tensors are not malloc'd)
    :return: (as the context value) whether the heap is in use
    """
    global _depth
    active = enabled and keep_heap()
    if active:
        if _depth == 0:
            _mallopt(M_MMAP_MAX, 0)
        _depth += 1
    try:
        yield active
    finally:
        if active:
            _depth -= 1
            if _depth == 0:
                _mallopt(M_MMAP_MAX, int(os.environ.get("MALLOC_MMAP_MAX_", DEFAULT_MMAP_MAX)))
