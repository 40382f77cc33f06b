"""Throughput and memory of DreamerV2: gradient steps, collection, replay bytes, FLOPs and utilization.

For every case of the chosen presets and every device, a fresh process builds ``DreamerV2(..., _init_setup_model=True)``
on an env with the case's spaces, fills its replay buffer with synthetic steps through ``replay_buffer.add`` and
measures:

* seconds per **gradient step** (``model._gradient_step``: replay sample + world-model update + actor and critic updates
  in imagination), median [min-max] of ``--repeats`` after ``--warmup`` discarded steps, plus process CPU seconds per
  step; the split: world-model update (``world_model.loss`` + its optimizer step), behaviour update
  (``actor_critic.loss`` + actor and critic optimizer steps), replay sampling; and one ``model.train(1, B)`` call;
* **collection**: ``policy.step`` (RSSM filter + actor, no grad) and the ``_sample_action`` path (observation to
  tensor, step, action conversion) with 1 and 8 envs, as env steps per second (no env, no training);
* **memory**: peak RSS of the process (``resource.getrusage``) and, on CUDA, peak allocated memory; replay bytes per
  stored step (``bytes_per_step``, ``nbytes() / capacity``) against the raw observation bytes, and the projection to an
  Atari-scale 2M-step buffer;
* **FLOPs** of one gradient step (``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions, forward and
  backward) and the achieved GFLOP/s against the device's fp32 matmul peak measured in the same run (a ``torch.mm``
  loop) -> utilization.

Presets (batch 16 x 50, horizon 15 unless noted): ``small`` = CartPole-like vectors (4 floats, 2 actions) and "small
Pong" (64x64x1 uint8, 6 actions) with the ``small`` model (GRU 200, dense 2 x 200, CNN depth 16) and 32 x 32 latents,
the sizes of the sheeprl "small" peer runs; ``atari`` = 64x64x1, 6 actions, the paper's model (GRU 600, 32 x 32
latents, dense 4 x 400, CNN depth 48); ``minatar`` = the MinAtar zoo entry (``small`` model, 10x10x4 bool grids,
16 x 32) that the learning benchmark trains; ``tiny`` = a toy model for smoke tests (``--quick``).

Output: ``benchmarks/results/throughput/<machine>-<device>.json`` and ``.md`` (the markdown includes the sheeprl /
SB3 DQN peer numbers when a peer results folder exists, see ``benchmarks/peers.py``).

Usage::

    python -m benchmarks.throughput                                   # presets small minatar atari, cpu (+ cuda)
    python -m benchmarks.throughput --presets small --devices cpu --repeats 20 --threads 2
    python -m benchmarks.throughput --quick --out-dir /tmp/tp           # tiny model, 1 repeat (smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, RESULTS_DIR, atomic_write_json, atomic_write_text, loadavg, machine_info, slug

THROUGHPUT_DIR = RESULTS_DIR / "throughput"
# sheeprl's "small" peer runs: GRU 200, dense 2 x 200, CNN depth 16 and DreamerV2's 32 x 32 latents (pinned here, since
# our own ``small`` preset is smaller: GRU 128, dense 2 x 128, 16 x 16 latents).
PEER_SMALL = dict(deter_size=200, hidden_size=200, mlp_layers=2, mlp_units=200, cnn_depth=16, stoch_size=32, classes=32)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    obs: str  # "vector4" | "image64" | "grid10"
    n_actions: int
    policy: str
    policy_kwargs: dict[str, Any]
    batch_size: int = 16
    sequence_length: int = 50
    horizon: int = 15
    peer: str | None = None  # bench name in anchors/peer_throughput.sh
    description: str = ""


CASES: dict[str, Case] = {
    "tiny-vector": Case(
        "tiny-vector", "vector4", 2, "MlpPolicy",
        dict(deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_layers=1, mlp_units=32),
        batch_size=4, sequence_length=8, horizon=5, description="toy model for smoke tests",
    ),
    "small-cartpole": Case(
        "small-cartpole", "vector4", 2, "MlpPolicy", dict(PEER_SMALL),
        peer="dv2_cartpole_small", description="CartPole spaces; GRU 200, dense 2x200, 32x32 latents",
    ),
    "small-pong": Case(
        "small-pong", "image64", 6, "CnnPolicy", dict(PEER_SMALL),
        peer="dv2_atari_small", description="64x64x1 uint8, 6 actions; GRU 200, dense 2x200, CNN x16, 32x32 latents",
    ),
    "ours-small-cartpole": Case(
        "ours-small-cartpole", "vector4", 2, "MlpPolicy", dict(preset="small"), sequence_length=32,
        description="our small preset as the CartPole zoo entry runs it: GRU 128, dense 2x128, 16x16 latents, 16 x 32",
    ),
    "minatar": Case(
        "minatar", "grid10", 3, "CnnPolicy", dict(preset="small", image_dist="binary"), sequence_length=32,
        description="the MinAtar entry as the learning benchmark runs it: 10x10x4 bool (Breakout), 3 actions, 16 x 32",
    ),
    "atari": Case(
        "atari", "image64", 6, "CnnPolicy", dict(preset="atari"),
        peer="dv2_atari", description="64x64x1 uint8, 6 actions; the paper's model: GRU 600, 32x32, dense 4x400, CNN x48",
    ),
}  # fmt: skip
PRESETS: dict[str, tuple[str, ...]] = {
    "tiny": ("tiny-vector",),
    "small": ("small-cartpole", "small-pong", "ours-small-cartpole"),
    "minatar": ("minatar",),
    "atari": ("atari",),
}


# ---------------------------------------------------------------------------------------------------------- helpers
def make_spaces(case: Case) -> tuple[Any, Any]:
    import numpy as np
    from gymnasium import spaces

    if case.obs == "vector4":
        high = np.array([4.8, np.finfo(np.float32).max, 0.42, np.finfo(np.float32).max], dtype=np.float32)
        obs_space = spaces.Box(-high, high, dtype=np.float32)
    elif case.obs == "image64":
        obs_space = spaces.Box(0, 255, (1, 64, 64), dtype=np.uint8)
    elif case.obs == "grid10":  # MinAtar: channel-last binary grids
        obs_space = spaces.Box(0, 1, (10, 10, 4), dtype=bool)
    else:
        raise ValueError(case.obs)
    return obs_space, spaces.Discrete(case.n_actions)


def random_obs(obs_space: Any, n: int, rng: Any) -> Any:
    import numpy as np

    if obs_space.dtype == np.uint8:
        return rng.integers(0, 256, size=(n, *obs_space.shape), dtype=np.uint8)
    if obs_space.dtype == bool:
        return rng.random(size=(n, *obs_space.shape)) < 0.1
    return rng.normal(size=(n, *obs_space.shape)).astype(obs_space.dtype)


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """median, mean, min, max, n of a list of seconds."""
    if not values:
        return {"n": 0}
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values),
            "max": max(values), "n": len(values)}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure_matmul_peak(device: str, size: int | None = None, seconds: float = 1.5,
                        precision: str = "fp32") -> dict[str, Any]:
    """GFLOP/s of a ``torch.mm`` loop on square fp32 (or bf16) matrices (the reference for utilization)."""
    import torch

    dev = torch.device(device)
    size = size or (8192 if dev.type == "cuda" else 2048)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    torch.mm(a, b)
    _sync(dev)
    n, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        if n % (20 if dev.type == "cuda" else 1) == 0:
            _sync(dev)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
    flops = 2.0 * size**3 * n
    return {"gflops": flops / elapsed / 1e9, "size": size, "iterations": n, "seconds": elapsed, "dtype": precision,
            "matmul_precision": torch.get_float32_matmul_precision()}


# ---------------------------------------------------------------------------------------------------------- one case
def measure_case(case: Case, device: str, repeats: int, warmup: int, policy_iters: int, fill_steps: int | None = None,
                 flops: bool = True, precision: str = "fp32", cuda_graph: bool = False) -> dict[str, Any]:
    """All measurements of one case on one device (run it in a fresh process for a meaningful peak RSS)."""
    import gymnasium as gym
    import numpy as np
    import torch
    from stable_baselines3.common.logger import Logger

    from sb3_dreamer import DreamerV2

    out: dict[str, Any] = {"case": case.name, "description": case.description, "device": device, "peer": case.peer,
                           "batch_size": case.batch_size, "sequence_length": case.sequence_length,
                           "imagination_horizon": case.horizon, "policy": case.policy,
                           "policy_kwargs": case.policy_kwargs, "precision": precision,
                           "loadavg_start": loadavg(),
                           "threads": torch.get_num_threads(), "rss_mb_after_imports": rss_mb()}
    obs_space, act_space = make_spaces(case)
    rng = np.random.default_rng(0)

    class SpacesEnv(gym.Env):
        observation_space, action_space = obs_space, act_space

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
            super().reset(seed=seed)
            return random_obs(obs_space, 1, rng)[0], {}

        def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
            return random_obs(obs_space, 1, rng)[0], 0.0, False, False, {}

    fill = fill_steps or max(4 * case.sequence_length, 1000)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model = DreamerV2(
        case.policy, SpacesEnv(), learning_starts=0, buffer_size=fill, batch_size=case.batch_size,
        sequence_length=case.sequence_length, imagination_horizon=case.horizon, policy_kwargs=dict(case.policy_kwargs),
        device=device, seed=0, precision=precision, cuda_graph=cuda_graph, _init_setup_model=True,
    )
    model.set_logger(Logger(folder=None, output_formats=[]))
    policy = model.policy
    out["params"] = {
        "world_model": sum(p.numel() for p in policy.world_model.parameters()),
        "actor": sum(p.numel() for p in policy.actor_critic.actor.parameters()),
        "critic": sum(p.numel() for p in policy.actor_critic.critic.parameters()),
    }
    out["model_sizes"] = dict(policy.sizes)

    # -------------------------------------------------------------- replay: synthetic steps through add()
    buffer = model.replay_buffer
    codec = policy.action_codec
    obs = random_obs(obs_space, 1, rng)
    t0 = time.perf_counter()
    for i in range(fill):
        next_obs = random_obs(obs_space, 1, rng)
        action = codec.env_to_buffer(np.array([act_space.sample()]))
        done = np.array([(i + 1) % 200 == 0])
        buffer.add(obs, next_obs, action, rng.normal(size=1).astype(np.float32), done, [{}])
        obs = random_obs(obs_space, 1, rng) if done[0] else next_obs
    add_s = time.perf_counter() - t0
    raw = int(np.prod(obs_space.shape)) * obs_space.dtype.itemsize
    out["replay"] = {
        "steps_added": fill, "rows_stored": buffer.size(), "capacity": buffer.capacity,
        "raw_obs_bytes_per_step": raw, "bytes_per_step": int(buffer.bytes_per_step), "nbytes": int(buffer.nbytes()),
        "nbytes_per_capacity_row": buffer.nbytes() / buffer.capacity,
        "overhead_vs_raw_obs": buffer.bytes_per_step / raw,
        "projected_gb_2M_steps": buffer.bytes_per_step * 2_000_000 / 1e9,
        "add_us_per_step": add_s / fill * 1e6,
    }

    # -------------------------------------------------------------- gradient steps, instrumented
    step_times: list[dict[str, float]] = []
    current: dict[str, float] = defaultdict(float)
    flop_state: dict[str, Any] = {"counter": None, "by_phase": defaultdict(float)}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter = flop_state["counter"]
            f0 = counter.get_total_flops() if counter is not None else 0
            _sync(dev)
            s = time.perf_counter()
            result = fn(*args, **kwargs)
            _sync(dev)
            current[name] += time.perf_counter() - s
            if counter is not None:
                flop_state["by_phase"][name] += counter.get_total_flops() - f0
            return result

        return wrapper

    optimizer_names = {id(getattr(policy, f"{name}_optimizer")): name for name in ("model", "actor", "critic")}
    original_backward, original_step = model._backward, model._step

    def backward(loss: Any, optimizer: Any) -> None:
        timed(f"optimize_{optimizer_names[id(optimizer)]}", original_backward)(loss, optimizer)

    def step(name: str, loss: Any, optimizer: Any) -> Any:
        return timed(f"optimize_{name}", original_step)(name, loss, optimizer)

    instrumented = {(buffer, "sample"): timed("sample", buffer.sample),
                    (policy.world_model, "loss"): timed("world_model_loss", policy.world_model.loss),
                    (policy.actor_critic, "loss"): timed("behaviour_loss", policy.actor_critic.loss),
                    (model, "_backward"): backward, (model, "_step"): step}
    out["cuda_graph"] = model._graphs_enabled()
    if out["cuda_graph"]:  # phases cannot be timed inside a graph (the timers synchronize): whole steps only
        instrumented = {}
    for (obj, name), wrapper in instrumented.items():
        setattr(obj, name, wrapper)  # an instance attribute shadows the method
    entropy_coef, reinforce_mix = model._entropy_schedule(1.0), model.reinforce_mix()

    def gradient_step() -> dict[str, float]:
        current.clear()
        _sync(dev)
        c0, t0 = time.process_time(), time.perf_counter()
        model._gradient_step(case.batch_size, entropy_coef, reinforce_mix)
        _sync(dev)
        record = dict(current)
        record["total"] = time.perf_counter() - t0
        record["cpu"] = time.process_time() - c0
        return record

    for _ in range(warmup):
        gradient_step()
    for _ in range(repeats):
        step_times.append(gradient_step())

    def phase(record: dict[str, float], names: Sequence[str]) -> float:
        return sum(record.get(n, 0.0) for n in names)

    wm_names = ("world_model_loss", "optimize_model")
    beh_names = ("behaviour_loss", "optimize_actor", "optimize_critic")
    out["grad_step"] = {
        "total_s": summarize([r["total"] for r in step_times]),
        "cpu_s": summarize([r["cpu"] for r in step_times]),
        "world_model_update_s": summarize([phase(r, wm_names) for r in step_times]),
        "behaviour_update_s": summarize([phase(r, beh_names) for r in step_times]),
        "sample_s": summarize([r.get("sample", 0.0) for r in step_times]),
        "parts_s": {name: summarize([r.get(name, 0.0) for r in step_times])
                    for name in ("sample", *wm_names, *beh_names)},
        "warmup": warmup,
    }
    median = out["grad_step"]["total_s"].get("median")
    out["grad_steps_per_s"] = 1.0 / median if median else None

    # -------------------------------------------------------------- one train(1, B) call (logging included)
    n_train = max(1, min(3, repeats))
    train_times = []
    for _ in range(n_train):
        _sync(dev)
        t0 = time.perf_counter()
        model.train(1, case.batch_size)
        _sync(dev)
        train_times.append(time.perf_counter() - t0)
    out["train_call_s"] = summarize(train_times)

    # -------------------------------------------------------------- FLOPs of one gradient step
    if flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        flop_state["counter"] = counter
        model.cuda_graph = False  # a graph replay runs no operator the counter could see: count an eager step
        with counter:
            model._gradient_step(case.batch_size, entropy_coef, reinforce_mix)
        model.cuda_graph = cuda_graph
        flop_state["counter"] = None
        total = counter.get_total_flops()
        by_phase = flop_state["by_phase"]
        out["flops"] = {
            "total_gflop": total / 1e9,
            "world_model_update_gflop": sum(by_phase[n] for n in wm_names) / 1e9,
            "behaviour_update_gflop": sum(by_phase[n] for n in beh_names) / 1e9,
            "achieved_gflops": total / 1e9 / median if median else None,
            "counted_ops": "matmul/linear/conv (forward + backward) as counted by torch.utils.flop_counter",
        }

    # -------------------------------------------------------------- back to back (GPU): the rate learn() gets
    if dev.type == "cuda":  # the timed phases above synchronize, which stops the CPU from queueing work ahead
        for obj, name in instrumented:
            delattr(obj, name)
        model._gradient_step(case.batch_size, entropy_coef, reinforce_mix)  # (re)captures the graphs with cuda_graph
        back_to_back = []
        for _ in range(3):
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(repeats):
                model._gradient_step(case.batch_size, entropy_coef, reinforce_mix)
            _sync(dev)
            back_to_back.append((time.perf_counter() - t0) / repeats)
        out["grad_step"]["back_to_back_s"] = summarize(back_to_back)
        median = statistics.median(back_to_back)  # the step time of grad steps/s, GFLOP/s and the projection
        out["grad_steps_per_s"] = 1.0 / median
        if "flops" in out:
            out["flops"]["achieved_gflops"] = out["flops"]["total_gflop"] / median

    collection = {}
    for n_envs in (1, 8):
        obs_np = random_obs(obs_space, n_envs, rng)
        obs_t, _ = policy.obs_to_tensor(obs_np)
        state, prev_action = policy.initial_state(n_envs)
        starts = torch.zeros(n_envs, dtype=torch.bool, device=dev)
        policy.set_training_mode(False)
        times = []
        with torch.no_grad():
            for i in range(policy_iters + 3):
                _sync(dev)
                t0 = time.perf_counter()
                action, state = policy.step(obs_t, state, prev_action, starts, deterministic=False)
                _sync(dev)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
                prev_action = action
        # the collection path of learn(): DreamerV2._sample_action (numpy obs in, numpy actions out)
        model._last_obs = obs_np  # type: ignore[assignment]
        model._last_state = None
        model._last_episode_starts = np.zeros(n_envs, dtype=bool)
        model.num_timesteps = 1
        sample_times = []
        for i in range(policy_iters + 3):
            t0 = time.perf_counter()
            model._sample_action(0, None, n_envs)
            _sync(dev)
            if i >= 3:
                sample_times.append(time.perf_counter() - t0)
        step_median = statistics.median(times)
        sample_median = statistics.median(sample_times)
        collection[str(n_envs)] = {
            "policy_step_ms": summarize([t * 1e3 for t in times]),
            "sample_action_ms": summarize([t * 1e3 for t in sample_times]),
            "env_steps_per_s_policy_step": n_envs / step_median,
            "env_steps_per_s_sample_action": n_envs / sample_median,
        }
    out["collection"] = collection

    # -------------------------------------------------------------- projection (as in peer_throughput.md)
    if median:
        sps = collection["1"]["env_steps_per_s_sample_action"]
        out["projected_env_steps_per_s"] = {
            f"train_every_{n}": 1.0 / (1.0 / sps + median / n) for n in (1, 5, 16)
        }
    out["peak_rss_mb"] = rss_mb()
    if dev.type == "cuda":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(dev) / 2**20
    out["loadavg_end"] = loadavg()
    return out


# ---------------------------------------------------------------------------------------------------------- runner
def run_case_subprocess(case: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one case in a fresh interpreter (own peak RSS); returns its JSON or an error record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        cmd = [sys.executable, "-m", "benchmarks.throughput", "--case", case, "--devices", device,
               "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--policy-iters", str(args.policy_iters),
               "--case-json", str(out)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.no_flops:
            cmd.append("--no-flops")
        if args.fill_steps:
            cmd += ["--fill-steps", str(args.fill_steps)]
        cmd += ["--precision", args.precision] + (["--cuda-graph"] if args.cuda_graph else [])
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        print(f"[throughput] {case} on {device} (load {' '.join(loadavg() or [])})", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            return {"case": case, "device": device, "error": (proc.stderr or proc.stdout)[-3000:]}
        return json.loads(out.read_text())


def machine_label(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return slug(torch.cuda.get_device_name(0))
    from benchmarks.common import cpu_model

    return f"{slug(cpu_model())}-{os.cpu_count()}c"


def available_devices(requested: Sequence[str] | None) -> list[str]:
    import torch

    if requested:
        return [d for d in requested if not d.startswith("cuda") or torch.cuda.is_available()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _fmt(x: float | None, nd: int = 3) -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{nd}g}" if abs(x) < 0.01 else f"{x:.{nd}f}".rstrip("0").rstrip(".")


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}k"


def _span(stats: dict[str, Any], scale: float = 1.0) -> str:
    if not stats or not stats.get("n"):
        return "—"
    return f"{_fmt(stats['median'] * scale)} [{_fmt(stats['min'] * scale)}–{_fmt(stats['max'] * scale)}]"


def render_markdown(result: dict[str, Any], peers_md: str = "") -> str:
    """Markdown tables of one device's results."""
    m = result["machine"]
    lines = [
        f"# DreamerV2 throughput on {result['machine_label']} ({result['device']})", "",
        f"{result['generated']}: CPU {m.get('cpu_model')} ({m.get('cpu_cores')} cores), "
        f"GPU {m.get('cuda') or 'none'}, torch {m.get('torch')}, {result['threads']} torch threads, "
        f"commit {m.get('git_commit')}. Command: `{result['command']}`.", "",
        f"Training precision: {result.get('precision', 'fp32')}"
        + (", gradient steps replayed from CUDA graphs (`cuda_graph=True`; phase columns not timed)"
           if result.get("cuda_graph") else ", eager gradient steps" if result["device"].startswith("cuda") else "")
        + ". "
        f"{result['matmul_peak'].get('dtype', 'fp32')} matmul peak (measured, `torch.mm` "
        f"{result['matmul_peak']['size']}², precision "
        f"{result['matmul_peak']['matmul_precision']}): **{result['matmul_peak']['gflops']:.0f} GFLOP/s**."
        + (" Gradient steps reuse freed memory (`sb3_dreamer.common.allocator`; `SB3_DREAMER_MALLOC=system` switches "
           "it off)." if result.get("malloc_reuse") else ""), "",
        "## Gradient steps", "",
        "One gradient step = replay sample + world-model update + actor and critic updates (imagination from all "
        "B·T posterior states). Seconds: median [min–max] over the repeats after the warm-up. On a GPU, `s / grad "
        "step` is the mean of `repeats` steps run back to back (median [min–max] of 3 such runs; the rate `learn()` "
        "gets), while the phase columns synchronize the device around each phase.", "",
        "| case | params WM / actor / critic | B×T, H | s / grad step | grad steps/s | CPU s / step | WM update s | "
        "behaviour update s | sample s | GFLOP / step | GFLOP/s | util. | peak RSS MB | CUDA peak MB | load at start |",
        "|" + "---|" * 15,
    ]
    for c in result["cases"]:
        if "error" in c:
            lines.append(f"| {c['case']} | failed: {c['error'].strip().splitlines()[-1][:120] if c['error'] else '?'} |"
                         + " |" * 13)
            continue
        g, p, fl = c["grad_step"], c["params"], c.get("flops", {})
        util = (fl.get("achieved_gflops") or 0) / result["matmul_peak"]["gflops"] if fl else None
        lines.append("| " + " | ".join([
            c["case"],
            " / ".join(_fmt_count(p[k]) for k in ("world_model", "actor", "critic")),
            f"{c['batch_size']}×{c['sequence_length']}, {c['imagination_horizon']}",
            _span(g.get("back_to_back_s") or g["total_s"]), _fmt(c.get("grad_steps_per_s")), _fmt(g["cpu_s"].get("median")),
            _fmt(g["world_model_update_s"].get("median")), _fmt(g["behaviour_update_s"].get("median")),
            _fmt(g["sample_s"].get("median")), _fmt(fl.get("total_gflop")), _fmt(fl.get("achieved_gflops")),
            f"{util:.1%}" if util is not None else "—", f"{c['peak_rss_mb']:.0f}",
            f"{c['cuda_peak_allocated_mb']:.0f}" if "cuda_peak_allocated_mb" in c else "—",
            (c.get("loadavg_start") or ["?"])[0],
        ]) + " |")
    lines += ["", "## Collection (policy only: no env, no training)", "",
              "| case | policy.step ms, 1 env | env steps/s, 1 env (`_sample_action`) | policy.step ms, 8 envs | "
              "env steps/s, 8 envs (`_sample_action`) | projected env steps/s, 1 grad step every 1 / 5 / 16 steps |",
              "|" + "---|" * 6]
    for c in result["cases"]:
        if "error" in c:
            continue
        one, eight = c["collection"]["1"], c["collection"]["8"]
        proj = c.get("projected_env_steps_per_s", {})
        lines.append("| " + " | ".join([
            c["case"], _span(one["policy_step_ms"]), _fmt(one["env_steps_per_s_sample_action"]),
            _span(eight["policy_step_ms"]), _fmt(eight["env_steps_per_s_sample_action"]),
            " / ".join(_fmt(proj.get(f"train_every_{n}")) for n in (1, 5, 16)),
        ]) + " |")
    lines += ["", "## Replay memory", "",
              "| case | raw obs bytes / step | stored bytes / step | nbytes / capacity row | overhead vs raw obs | "
              "2M steps (GB) | add µs / step |", "|" + "---|" * 7]
    for c in result["cases"]:
        if "error" in c:
            continue
        r = c["replay"]
        lines.append("| " + " | ".join([
            c["case"], str(r["raw_obs_bytes_per_step"]), str(r["bytes_per_step"]), _fmt(r["nbytes_per_capacity_row"]),
            f"{r['overhead_vs_raw_obs']:.3f}×", _fmt(r["projected_gb_2M_steps"]), _fmt(r["add_us_per_step"]),
        ]) + " |")
    lines += ["", "CPU s / step is process CPU time (all threads): about threads × wall on a quiet machine; a ratio near 1 "
              "with several threads means contention (see `load at start`, the 1-minute load average).", "",
              "Projection as in `/work/shared/reference/peer_throughput.md`: "
              "`1 / (1 / policy_sps + s_per_grad_step / N)`; it leaves out the env's own step time, which the peers' "
              "\"env steps/s, policy\" includes. Load averages per case are in the JSON (compare with peers only "
              "within one quiet run)."]
    if peers_md:
        lines += ["", peers_md]
    return "\n".join(lines) + "\n"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["small", "minatar", "atari"])
    parser.add_argument("--devices", nargs="+", help="cpu and/or cuda (default: cpu, plus cuda when present)")
    parser.add_argument("--repeats", type=int, default=20, help="timed gradient steps per case (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="gradient steps discarded first")
    parser.add_argument("--policy-iters", type=int, default=50, help="timed policy steps per env count")
    parser.add_argument("--threads", type=int, help="torch threads (and OMP_NUM_THREADS); peers used 2")
    parser.add_argument("--fill-steps", type=int, help="synthetic replay steps (default max(4 T, 1000))")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="DreamerV2's training precision (bf16: autocast, a GPU opt-in); utilization is then "
                        "measured against the bf16 matmul peak, and the output files get a -bf16 suffix")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="DreamerV2(cuda_graph=True): replay the training passes from CUDA graphs (files get -graph)")
    parser.add_argument("--in-process", action="store_true", help="measure every case in this process (shared RSS)")
    parser.add_argument("--quick", action="store_true", help="smoke test: preset tiny, 1 repeat, 1 warm-up")
    parser.add_argument("--out-dir", type=Path, default=THROUGHPUT_DIR)
    parser.add_argument("--machine", help="machine label of the output files (default: CPU or GPU model)")
    parser.add_argument("--peers", type=Path, help="peer results folder (default: benchmarks/results/throughput/peers,"
                        " else $PEERBENCH_DIR or /tmp/peerbench)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case (subprocess mode)
    parser.add_argument("--case-json", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.presets, args.repeats, args.warmup = ["tiny"], 1, 1
        args.policy_iters = min(args.policy_iters, 5)
    if args.case:  # child process: one case, one device
        result = measure_case(CASES[args.case], args.devices[0], args.repeats, args.warmup, args.policy_iters,
                              args.fill_steps, flops=not args.no_flops, precision=args.precision,
                              cuda_graph=args.cuda_graph)
        atomic_write_json(args.case_json, result)
        return 0

    from benchmarks import peers
    from sb3_dreamer.common import allocator

    devices = available_devices(args.devices)
    if not devices:
        print("[throughput] none of the requested devices is available", file=sys.stderr)
        return 2
    cases = [name for preset in args.presets for name in PRESETS[preset]]
    peer_dir = peers.find_peer_dir(args.peers)
    failed = False
    for device in devices:
        peak = measure_matmul_peak(device, size=512 if args.quick else None, seconds=0.3 if args.quick else 1.5,
                                   precision=args.precision)
        results = []
        for name in cases:
            if args.in_process:
                results.append(measure_case(CASES[name], device, args.repeats, args.warmup, args.policy_iters,
                                            args.fill_steps, flops=not args.no_flops, precision=args.precision,
                                            cuda_graph=args.cuda_graph))
            else:
                results.append(run_case_subprocess(name, device, args))
        label = args.machine or machine_label(device)
        result = {
            "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine_label": label, "device": device, "threads": args.threads or torch.get_num_threads(),
            "machine": machine_info(), "matmul_peak": peak, "precision": args.precision,
            "cuda_graph": args.cuda_graph and device.startswith("cuda"),
            "presets": args.presets,
            "repeats": args.repeats, "warmup": args.warmup, "cases": results,
            "malloc_reuse": device.startswith("cpu") and allocator.available(),
        }
        peer_results = peers.load_peer_results(peer_dir) if peer_dir else {}
        if peer_results:
            result["peers"] = {"dir": str(peer_dir), "results": peer_results}
        peers_md = peers.render_side_by_side(results, peer_results, device)
        graphs = args.cuda_graph and device.startswith("cuda")
        suffix = ("" if args.precision == "fp32" else "-" + args.precision) + ("-graph" if graphs else "")
        base = args.out_dir / f"{label}-{device.split(':')[0]}{suffix}"
        atomic_write_json(base.with_suffix(".json"), result)
        atomic_write_text(base.with_suffix(".md"), render_markdown(result, peers_md))
        failed = failed or any("error" in c for c in results)
        print(f"[throughput] wrote {base}.json and .md", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
