"""Peer throughput (sheeprl DreamerV2, SB3 DQN) next to ours.

The peers are timed by ``/work/shared/anchors/peer_throughput.sh`` (a copy lives wherever the shared anchors are
checked out): it creates two venvs under /tmp (sheeprl 0.8.4 and stable-baselines3 2.9.2, pinned by the freeze files
next to it), runs headless timing harnesses that import the installed packages, and writes one JSON per bench to
``$PEERBENCH_DIR`` (default ``/tmp/peerbench``): ``dv2_cartpole_small``, ``dv2_atari_small``, ``dv2_atari`` (sheeprl
DreamerV2: seconds per gradient step, CPU seconds, player forward, peak RSS) and ``sb3_cartpole``,
``sb3_cartpole_default``, ``sb3_pong`` (SB3 DQN). Their model sizes match our throughput cases:

======================  ===================  ==============================================================
ours (throughput.py)    peer bench           model
======================  ===================  ==============================================================
small-cartpole          dv2_cartpole_small   GRU 200, 32x32 latents, dense 2x200, MLP encoder/decoder
small-pong              dv2_atari_small      64x64 gray Pong, GRU 200, 32x32, dense 2x200, CNN x16
atari                   dv2_atari            64x64 gray Pong, GRU 600, 32x32, dense 4x400, CNN x48
======================  ===================  ==============================================================

Side by side, on the same quiet machine (2 threads, as the peers used; load average < 1 from other processes;
interleave, since VM neighbours alone move numbers by ~20 %)::

    PEERBENCH_DIR=/tmp/peerbench bash /work/shared/anchors/peer_throughput.sh dv2_cartpole_small dv2_atari_small sb3_cartpole
    python -m benchmarks.throughput --presets small --devices cpu --threads 2 --peers /tmp/peerbench
    python -m benchmarks.peers --dir /tmp/peerbench --copy-to benchmarks/results/throughput/peers   # keep them

(``dv2_atari`` alone takes 10-15 min on 2 cores; the whole script about 8 min plus the venv installs.) The throughput
markdown then shows both; without a peer folder it shows the numbers published in
``/work/shared/reference/peer_throughput.md`` (a different run: indicative only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR

PEER_BENCHES = ("dv2_cartpole_small", "dv2_atari_small", "dv2_atari", "sb3_cartpole", "sb3_cartpole_default", "sb3_pong")
COLLECTED_DIR = RESULTS_DIR / "throughput" / "peers"

# /work/shared/reference/peer_throughput.md, "Results" (3 quiet repetitions on the 2-core AMD EPYC machine, torch
# 2.13 CPU, 2 threads): median seconds per gradient step, CPU seconds per step, player forward at batch 1 (ms),
# env steps/s with the policy acting (training excluded), peak RSS (MB).
PUBLISHED: dict[str, dict[str, float]] = {
    "dv2_atari": {"grad_step_s": 5.28, "grad_step_cpu_s": 10.1, "policy_forward_ms": 11.0,
                  "policy_env_steps_per_s": 75.0, "peak_rss_mb": 2530.0},
    "dv2_atari_small": {"grad_step_s": 1.29, "grad_step_cpu_s": 2.47, "policy_forward_ms": 2.6,
                        "policy_env_steps_per_s": 259.0, "peak_rss_mb": 1210.0},
    "dv2_cartpole_small": {"grad_step_s": 0.88, "grad_step_cpu_s": 1.66, "policy_forward_ms": 1.0,
                           "policy_env_steps_per_s": 662.0, "peak_rss_mb": 1150.0},
}
PUBLISHED_SOURCE = "peer_throughput.md (2-core AMD EPYC, 2 threads; another run)"


def find_peer_dir(explicit: Path | str | None = None) -> Path | None:
    """The peer results folder: ``explicit``, else the collected copy in results/throughput/peers, else
    ``$PEERBENCH_DIR`` or /tmp/peerbench (the first that holds a known bench's JSON)."""
    candidates = [Path(explicit)] if explicit else [
        COLLECTED_DIR, Path(os.environ.get("PEERBENCH_DIR", "/tmp/peerbench")), Path("/tmp/peerbench")]
    for path in candidates:
        if any((path / f"{b}.json").is_file() for b in PEER_BENCHES):
            return path
    return None


def _rss_from_time_file(path: Path) -> float | None:
    try:
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", path.read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def load_peer_results(peer_dir: Path | str | None) -> dict[str, dict[str, Any]]:
    """``{bench: its JSON}`` for every known bench in ``peer_dir`` (``peak_rss_mb`` from ``/usr/bin/time -v``)."""
    out: dict[str, dict[str, Any]] = {}
    if peer_dir is None:
        return out
    for bench in PEER_BENCHES:
        path = Path(peer_dir) / f"{bench}.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        rss = _rss_from_time_file(Path(peer_dir) / f"{bench}.time")
        data["peak_rss_mb"] = rss if rss is not None else data.get("maxrss_self_mb")
        out[bench] = data
    return out


def peer_summary(bench: str, data: Mapping[str, Any]) -> dict[str, float | None]:
    """The comparable figures of one peer JSON (DreamerV2 benches)."""
    forward = data.get("policy_forward_s_mean")
    return {
        "grad_step_s": data.get("grad_step_s_median", data.get("grad_step_s_mean")),
        "grad_step_cpu_s": data.get("grad_step_cpu_s_mean"),
        "policy_forward_ms": forward * 1e3 if forward is not None else None,
        "policy_env_steps_per_s": data.get("policy_phase_env_steps_per_s_excl_train"),
        "peak_rss_mb": data.get("peak_rss_mb"),
    }


def peer_accelerator(data: Mapping[str, Any]) -> str:
    """The device a sheeprl peer ran on: its ``fabric.accelerator=`` Hydra override, else the anchors' ``cpu``."""
    for override in data.get("overrides") or ():
        if override.startswith("fabric.accelerator="):
            return override.split("=", 1)[1]
    return "cpu"


def _f(x: float | None, nd: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.{nd}g}"


def render_side_by_side(our_cases: Sequence[Mapping[str, Any]], peer_results: Mapping[str, Mapping[str, Any]],
                        device: str) -> str:
    """Markdown: our gradient step / policy step / RSS next to the matching sheeprl bench (and SB3 DQN rows)."""
    lines = ["## Peers: sheeprl DreamerV2 (same model sizes)", ""]
    peer_device = "cuda" if any(peer_accelerator(d) in ("cuda", "gpu") for d in peer_results.values()) else "cpu"
    if device.split(":")[0] != peer_device:
        lines += [f"The peer numbers are {peer_device.upper()} measurements; compare them with the {peer_device} file.", ""]
    source = "this machine, peer JSON" if peer_results else PUBLISHED_SOURCE
    lines += [f"Peer source: {source}. Ours: median seconds per gradient step and policy.step at 1 env.", "",
              "| case | peer bench | s / grad step ours | peer | ratio ours/peer | CPU s / step ours | peer | "
              "policy step ms ours | peer player fwd ms | peak RSS MB ours | peer |", "|" + "---|" * 11]
    rows = 0
    for case in our_cases:
        bench = case.get("peer")
        if not bench or "error" in case:
            continue
        peer = peer_summary(bench, peer_results[bench]) if bench in peer_results else PUBLISHED.get(bench)
        if peer is None:
            continue
        ours = (case["grad_step"].get("back_to_back_s") or case["grad_step"]["total_s"]).get("median")
        ratio = ours / peer["grad_step_s"] if ours and peer.get("grad_step_s") else None
        lines.append("| " + " | ".join([
            case["case"], bench + ("" if bench in peer_results else " (published)"), _f(ours), _f(peer["grad_step_s"]),
            f"{ratio:.2f}" if ratio else "—", _f(case["grad_step"]["cpu_s"].get("median")), _f(peer["grad_step_cpu_s"]),
            _f(case["collection"]["1"]["policy_step_ms"].get("median")), _f(peer["policy_forward_ms"]),
            _f(case.get("peak_rss_mb")), _f(peer["peak_rss_mb"]),
        ]) + " |")
        rows += 1
    if rows == 0:
        return ""
    dqn = {b: d for b, d in peer_results.items() if b.startswith("sb3_")}
    if dqn:
        lines += ["", "SB3 DQN on the same machine (peer JSON):", "",
                  "| bench | grad steps/s | env steps/s, training phase | peak RSS MB |", "|---|---|---|---|"]
        for bench, data in dqn.items():
            lines.append(f"| {bench} | {_f(data.get('grad_steps_per_s'))} | {_f(data.get('train_phase_env_steps_per_s'))} "
                         f"| {_f(data.get('peak_rss_mb'))} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="peer results folder (default: $PEERBENCH_DIR or /tmp/peerbench)")
    parser.add_argument("--copy-to", type=Path, help="copy the peer JSON/.time files there (to commit them)")
    args = parser.parse_args(argv)
    peer_dir = find_peer_dir(args.dir)
    results = load_peer_results(peer_dir)
    if not results:
        print(f"no peer results found ({args.dir or 'default locations'}); run "
              "bash /work/shared/anchors/peer_throughput.sh first", file=sys.stderr)
        return 1
    print(f"peer results in {peer_dir}:")
    for bench, data in results.items():
        summary = peer_summary(bench, data) if bench.startswith("dv2") else {
            "grad_steps_per_s": data.get("grad_steps_per_s"), "train_env_steps_per_s": data.get("train_phase_env_steps_per_s"),
            "peak_rss_mb": data.get("peak_rss_mb")}
        print(f"  {bench}: " + ", ".join(f"{k}={_f(v)}" for k, v in summary.items()) +
              f"  (load {' '.join(data.get('loadavg_start') or [])})")
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for bench in results:
            for suffix in (".json", ".time"):
                src = peer_dir / f"{bench}{suffix}"  # type: ignore[operator]
                if src.is_file():
                    shutil.copy2(src, args.copy_to / src.name)
        print(f"copied to {args.copy_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
