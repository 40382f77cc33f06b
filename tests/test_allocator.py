"""Reuse of freed CPU memory across gradient steps (sb3_dreamer.common.allocator)."""

import contextlib
import json
import os
import subprocess
import sys

import gymnasium as gym
import pytest

from sb3_dreamer import DreamerV2
from sb3_dreamer.common import allocator

needs_glibc = pytest.mark.skipif(not allocator.available(), reason="malloc is not glibc's (or switched off)")

# Page faults of allocating and filling a tensor after an equal one was freed, in a fresh process (the allocator's
# settings are process-wide). glibc maps blocks above 32 MiB (its largest mmap threshold) with mmap, fresh each time.
FAULTS_SCRIPT = """
import json, resource, torch
from sb3_dreamer.common.allocator import reuse_freed_memory

def faults_of_a_fresh_block(mib=64):
    torch.empty(mib * 2**18).fill_(1.0)  # allocated, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(mib * 2**18).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

result = {"before": faults_of_a_fresh_block()}
with reuse_freed_memory() as result["active"]:
    result["inside"] = [faults_of_a_fresh_block() for _ in range(4)]  # the first ones grow the heap
    with reuse_freed_memory():
        pass
    result["after_inner_block"] = faults_of_a_fresh_block(mib=256)  # grows the heap (uncounted), then reuses it
result["after_small"] = faults_of_a_fresh_block()
result["after_large"] = faults_of_a_fresh_block(mib=512)  # larger than the heap
print(json.dumps(result))
"""


def run_faults_script(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_blocks_are_reused_without_page_faults_inside_the_block_only():
    faults = run_faults_script()
    assert faults["active"] is True
    # 64 MiB is 16384 pages of 4 KiB (32 with 2 MiB transparent huge pages): a fresh mapping faults them all in.
    reused = max(faults["inside"][-2:])
    assert faults["before"] > 4 * reused + 16
    assert faults["after_inner_block"] <= reused + 16  # leaving a nested block keeps the outer one on
    assert faults["after_small"] <= reused + 16  # what the kept heap holds is reused after the block too
    assert faults["after_large"] > 4 * faults["before"]  # but it does not grow outside: 512 MiB is mapped afresh


@needs_glibc
def test_switched_off_by_the_environment():
    faults = run_faults_script(SB3_DREAMER_MALLOC="system")
    assert faults["active"] is False
    assert min(faults["inside"]) > 4 * 16


def test_disabled_block_is_a_no_op():
    with allocator.reuse_freed_memory(enabled=False) as active:
        assert active is False


def test_cpu_gradient_steps_run_inside_the_block(monkeypatch, tiny_kwargs):
    calls = []

    @contextlib.contextmanager
    def recording(enabled: bool = True):
        calls.append(enabled)
        yield False

    monkeypatch.setattr("sb3_dreamer.dreamerv2.dreamerv2.reuse_freed_memory", recording)
    model = DreamerV2("MlpPolicy", gym.make("CartPole-v1"), **tiny_kwargs)
    model.learn(tiny_kwargs["learning_starts"] + 2 * tiny_kwargs["train_freq"])
    assert model._n_updates > 0
    assert calls == [True] * model._n_updates
