"""Command line of the world-model analysis tools.

    python -m sb3_dreamer.analysis <tool> --model model.zip --env MinAtar/Breakout-v1 --out DIR [options]

Tools: ``open-loop``, ``heatmap``, ``traverse``, ``interpolate``, ``score-diff``, ``probe`` (see docs/analysis.md).
MinAtar ids are registered automatically. ``--targets-fn package.module:function`` supplies probe targets for other
environments (``function(observations) -> {name: array [N]}``).
"""

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th

from sb3_dreamer.analysis import tools
from sb3_dreamer.analysis.rollout import make_env

TOOLS = ("open-loop", "heatmap", "traverse", "interpolate", "score-diff", "probe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sb3_dreamer.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("tool", choices=TOOLS)
    parser.add_argument("--model", required=True, help="path of a saved DreamerV2 (.zip)")
    parser.add_argument("--env", required=True, help="gymnasium env id (MinAtar ids are registered)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", choices=("model", "random"), default="model", help="act with the actor or randomly")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    group = parser.add_argument_group("open-loop")
    group.add_argument("--context", type=int, default=5, help="observed frames K")
    group.add_argument("--horizon", type=int, default=45, help="imagined frames N")
    group.add_argument("--sequences", type=int, default=4, help="sequences to predict and show")
    group.add_argument("--stride", type=int, default=1, help="show every stride-th step in the grid")
    group.add_argument("--fps", type=float, default=5.0)
    group = parser.add_argument_group("latent tools (heatmap, traverse, interpolate, score-diff, probe)")
    group.add_argument("--episodes", type=int, default=20, help="episodes to collect latents from")
    group.add_argument("--max-steps", type=int, default=1000, help="cap on steps per episode")
    group.add_argument("--variable", type=int, default=None, help="traverse: the variable (default: most used)")
    group.add_argument("--step", type=int, default=None, help="traverse: the step whose state is swept")
    group.add_argument("--start", type=int, default=None, help="interpolate: step of latent A")
    group.add_argument("--end", type=int, default=None, help="interpolate: step of latent B")
    group.add_argument("--layers", type=int, nargs="+", default=list(range(6)), help="probe: hidden-layer counts")
    group.add_argument("--latent", choices=("features", "stoch", "deter", "full"), default="features")
    group.add_argument("--probe-steps", type=int, default=1000, help="probe: Adam steps of each MLP probe")
    group.add_argument("--targets-fn", default=None, help="probe: module:function giving targets from observations")
    return parser


def load_targets_fn(spec: str | None) -> Any:
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--targets-fn must look like package.module:function, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one tool; returns a JSON-serializable summary (also written to ``<out>/<tool>_summary.json``)."""
    from sb3_dreamer import DreamerV2

    if args.threads:
        th.set_num_threads(args.threads)
    env = make_env(args.env)
    model = DreamerV2.load(args.model, device=args.device)
    collect = dict(n_episodes=args.episodes, max_steps=args.max_steps, policy=args.policy, seed=args.seed)
    summary: dict[str, Any] = {"tool": args.tool, "model": args.model, "env": args.env}
    if args.tool == "open-loop":
        result = tools.run_open_loop(model, env, args.out, args.context, args.horizon, args.sequences, args.policy,
                                     args.seed, args.stride, args.fps)
        summary.update(horizon_mse=[None if not np.isfinite(x) else float(x) for x in result.horizon_mse],
                       mean_open_loop_mse=float(np.nanmean(result.horizon_mse)))
    elif args.tool == "heatmap":
        _, usage = tools.run_heatmap(model, env, args.out, **collect)
        summary.update(usage)
    elif args.tool == "traverse":
        images = tools.run_traverse(model, env, args.out, args.variable, args.step, **collect)
        summary.update(frames=len(images))
    elif args.tool == "interpolate":
        images = tools.run_interpolate(model, env, args.out, args.start, args.end, **collect)
        summary.update(frames=len(images))
    elif args.tool == "score-diff":
        result = tools.run_score_diff(model, env, args.out, **collect)
        summary.update({k: result[k] for k in ("n_rewarded", "n_unrewarded", "top_variables")})
    else:
        table = tools.run_probe(model, env, args.out, load_targets_fn(args.targets_fn), args.layers, args.latent,
                                steps=args.probe_steps, **collect)
        summary.update(mae={name: {str(k): v for k, v in row.items()} for name, row in table.items()})
    tools.write_summary(args.out, args.tool.replace("-", "_"), summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run(args)
    print(json.dumps(summary, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
