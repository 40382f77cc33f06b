"""Ablation benchmark: the paper's switches (and the fully discrete model) against the default DreamerV2 on one game.

Every job is one (variant, seed) pair trained for ``--budget`` env steps with the env's hyperparameters from
``sb3_dreamer/hyperparams/dreamerv2.yml`` plus the variant's switches, evaluated every ``--eval-freq`` steps
(``--eval-episodes`` deterministic episodes, 10k-step time limit). Each job writes

    benchmarks/results/ablations/<env>/<variant>/seed<k>_<budget>[_quick].json

(status, curve of evaluation returns, final return, wall seconds, machine, the exact kwargs), written when the job ends;
rerunning skips finished jobs (``--force`` reruns them). The report

    benchmarks/results/ablations/<env>/report_<budget>[_quick].md / .png / .json

is a markdown table of final evaluation returns (mean ± std over seeds, difference to the default) next to the
paper's Table 2 expectation, and a PNG of the learning curves.

Usage::

    python -m benchmarks.ablations --quick                                # smoke test: 400 steps, tiny model, 1 seed
    python -m benchmarks.ablations --env MinAtar/Breakout-v1 --budget 200k --seeds 0 1 2
    python -m benchmarks.ablations --variants default gaussian no_kl_balance --budget 100k --jobs 2
    python -m benchmarks.ablations --report-only --budget 200k            # rebuild the table and plot
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, atomic_write_json, atomic_write_text, env_slug, fmt_steps, machine_info, parse_steps

ABLATIONS_DIR = RESULTS_DIR / "ablations"

# name: (policy_kwargs, algorithm kwargs, paper name, expectation). Expectations are the paper's (Table 2 and Section 4,
# 55 Atari games at 200M frames) or, for the fully discrete model, the Pong study; they are not MinAtar results.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], str, str]] = {
    "default": ({}, {}, "DreamerV2", "reference"),
    "fully_discrete": ({"latent_features": "stoch"}, {}, "(heads read z_t only; not in Table 2)",
                       "learns slower (Pong study)"),
    "gaussian": ({"latent_type": "gaussian"}, {}, "No Discrete Latents (Gaussian)", "worse (worse on 42/55 games)"),
    "no_kl_balance": ({}, {"kl_balance": 0.5}, "No KL Balancing", "worse (worse on 44/55 games)"),
    "no_layer_norm": ({"layer_norm": False}, {}, "No Layer Norm", "small effect"),
    "reinforce_only": ({}, {"actor_grad": "reinforce"}, "DreamerV2 (Reinforce, the discrete default)",
                       "same as default for discrete actions"),
    "dynamics_only": ({}, {"actor_grad": "dynamics"}, "No Policy Reinforce (straight-through only)", "worse on Atari"),
    "mixed_grad": ({}, {"actor_grad": "both", "actor_grad_mix": 0.5}, "Reinforce + straight-through mix",
                   "between the two"),
    "stop_image_grad": ({}, {"stop_image_grad": True}, "No Image Gradients", "collapses (largest drop)"),
    "stop_reward_grad": ({}, {"stop_reward_grad": True}, "No Reward Gradients", "small effect"),
}
# reinforce_only repeats the default for discrete actions: run it only when asked for
DEFAULT_VARIANTS = [name for name in VARIANTS if name != "reinforce_only"]

# --quick: a tiny model and a few hundred steps, enough to exercise every variant end to end
QUICK = dict(budget=400, eval_freq=200, eval_episodes=2, seeds=(0,),
             policy_kwargs=dict(deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_layers=1, mlp_units=32,
                                cnn_depth=4),
             kwargs=dict(learning_starts=200, batch_size=4, sequence_length=8, imagination_horizon=3, train_freq=10))
ZOO_ONLY_KEYS = {"n_timesteps", "policy", "env_wrapper", "env_kwargs", "frame_stack", "n_envs", "normalize",
                 "callback", "vec_env_wrapper"}


def base_hyperparams(env_id: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(policy, policy_kwargs, algorithm kwargs) of ``env_id`` in the packaged zoo YAML (CnnPolicy defaults if absent)."""
    import yaml

    import sb3_dreamer

    path = Path(sb3_dreamer.__file__).resolve().parent / "hyperparams" / "dreamerv2.yml"
    entry = dict(yaml.safe_load(path.read_text()).get(env_id, {}))
    policy = entry.get("policy", "CnnPolicy")
    policy_kwargs = entry.get("policy_kwargs", {})
    if isinstance(policy_kwargs, str):
        policy_kwargs = eval(policy_kwargs, {"__builtins__": {}}, {"dict": dict})  # the zoo's convention
    kwargs = {k: v for k, v in entry.items() if k not in ZOO_ONLY_KEYS and k != "policy_kwargs"}
    return policy, dict(policy_kwargs), kwargs


def job_path(env_id: str, variant: str, seed: int, budget: int, quick: bool) -> Path:
    return ABLATIONS_DIR / env_slug(env_id) / variant / f"seed{seed}_{fmt_steps(budget)}{'_quick' if quick else ''}.json"


def make_env(env_id: str, max_episode_steps: int) -> Any:
    import gymnasium as gym
    from stable_baselines3.common.monitor import Monitor

    from sb3_dreamer.analysis.rollout import make_env as make

    return Monitor(gym.wrappers.TimeLimit(make(env_id), max_episode_steps=max_episode_steps))


def evaluate_every(eval_env: Any, eval_freq: int, n_episodes: int) -> Any:
    """A callback evaluating the deterministic policy every ``eval_freq`` env steps and at the end of training."""
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy

    class Evaluations(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.timesteps: list[int] = []
            self.returns: list[list[float]] = []

        def evaluate(self) -> None:
            returns, _ = evaluate_policy(self.model, eval_env, n_episodes, deterministic=True, return_episode_rewards=True)
            self.timesteps.append(int(self.num_timesteps))
            self.returns.append([float(r) for r in returns])

        def _on_step(self) -> bool:
            if self.num_timesteps // eval_freq > len(self.timesteps):
                self.evaluate()
            return True

        def _on_training_end(self) -> None:
            if not self.timesteps or self.timesteps[-1] != self.num_timesteps:
                self.evaluate()

    return Evaluations()


def run_job(env_id: str, variant: str, seed: int, budget: int, eval_freq: int, eval_episodes: int, quick: bool,
            device: str) -> dict[str, Any]:
    """Train and evaluate one (variant, seed); returns (and writes) the job record."""
    import torch as th
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_dreamer import DreamerV2

    th.set_num_threads(1)
    policy, policy_kwargs, kwargs = base_hyperparams(env_id)
    if quick:
        policy_kwargs.update(QUICK["policy_kwargs"])  # type: ignore[arg-type]
        kwargs.update(QUICK["kwargs"])  # type: ignore[arg-type]
    variant_policy_kwargs, variant_kwargs, _, _ = VARIANTS[variant]
    policy_kwargs.update(variant_policy_kwargs)
    kwargs.update(variant_kwargs)
    kwargs["buffer_size"] = min(int(kwargs.get("buffer_size", budget)), budget)
    record: dict[str, Any] = {"env": env_id, "variant": variant, "seed": seed, "budget": budget, "quick": quick,
                              "policy": policy, "policy_kwargs": policy_kwargs, "kwargs": kwargs, "machine": machine_info()}
    start = time.time()
    try:
        model = DreamerV2(policy, make_env(env_id, 10_000), policy_kwargs=policy_kwargs, seed=seed, device=device,
                          **kwargs)
        eval_env = DummyVecEnv([lambda: make_env(env_id, 10_000)])
        eval_env.seed(10_000 + seed)  # the same evaluation episodes for every variant of a seed
        evaluation = evaluate_every(eval_env, eval_freq, eval_episodes)
        model.learn(budget, callback=evaluation)
        returns = np.array(evaluation.returns, dtype=float)  # [n_evals, episodes]
        record.update(status="ok", timesteps=evaluation.timesteps, returns=evaluation.returns,
                      returns_mean=returns.mean(1).tolist(), returns_std=returns.std(1).tolist(),
                      final_return=float(returns[-1].mean()))
    except Exception as error:  # a diverged variant is a result too
        record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    record["wall_s"] = round(time.time() - start, 1)
    atomic_write_json(job_path(env_id, variant, seed, budget, quick), record)
    return record


def load_records(env_id: str, budget: int, quick: bool, variants: list[str]) -> dict[str, list[dict[str, Any]]]:
    records: dict[str, list[dict[str, Any]]] = {}
    suffix = f"_{fmt_steps(budget)}{'_quick' if quick else ''}.json"
    for variant in variants:
        folder = ABLATIONS_DIR / env_slug(env_id) / variant
        files = sorted(folder.glob(f"seed*{suffix}")) if folder.exists() else []
        records[variant] = [json.loads(f.read_text()) for f in files]
    return records


def report(env_id: str, budget: int, quick: bool, variants: list[str]) -> tuple[str, Path]:
    """Write the markdown table, the JSON summary and the PNG of curves; return (markdown, markdown path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_records(env_id, budget, quick, variants)
    finals = {v: [r["final_return"] for r in rs if r.get("status") == "ok" and r.get("final_return") is not None]
              for v, rs in records.items()}
    reference = float(np.mean(finals["default"])) if finals.get("default") else None
    lines = [f"Ablations on {env_id}, {fmt_steps(budget)} env steps{' (quick smoke run, tiny model)' if quick else ''}: "
             "final evaluation return (mean ± std over seeds).", "",
             "| variant | paper name | final return | vs default | seeds | paper expectation (Table 2) |",
             "|---|---|---:|---:|---:|---|"]
    summary = {}
    for variant in variants:
        values = finals.get(variant, [])
        failed = sum(r.get("status") == "failed" for r in records.get(variant, []))
        mean = float(np.mean(values)) if values else None
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        cell = f"{mean:.2f} ± {std:.2f}" if mean is not None else "—"
        delta = f"{mean - reference:+.2f}" if mean is not None and reference is not None and variant != "default" else ""
        seeds = f"{len(values)}" + (f" (+{failed} failed)" if failed else "")
        _, _, paper_name, expectation = VARIANTS[variant]
        lines.append(f"| {variant} | {paper_name} | {cell} | {delta} | {seeds} | {expectation} |")
        summary[variant] = {"final_returns": values, "mean": mean, "std": std, "failed": failed}
    markdown = "\n".join(lines) + "\n"
    stem = ABLATIONS_DIR / env_slug(env_id) / f"report_{fmt_steps(budget)}{'_quick' if quick else ''}"
    atomic_write_text(stem.with_suffix(".md"), markdown)
    atomic_write_json(stem.with_suffix(".json"), summary)
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=90)
    for variant, rs in records.items():
        curves = [r for r in rs if r.get("status") == "ok" and r.get("timesteps")]
        if not curves:
            continue
        length = min(len(r["timesteps"]) for r in curves)
        steps = np.array(curves[0]["timesteps"][:length])
        values = np.array([r["returns_mean"][:length] for r in curves])  # [seeds, n_evals]
        line = ax.plot(steps, values.mean(0), label=variant, linewidth=2 if variant == "default" else 1)[0]
        if len(values) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("env steps")
    ax.set_ylabel("evaluation return")
    ax.set_title(f"DreamerV2 ablations, {env_id}", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"))
    plt.close(fig)
    return markdown, stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="MinAtar/Breakout-v1")
    parser.add_argument("--budget", type=parse_steps, default=None, help="env steps per job (default 200k; quick 400)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--eval-freq", type=parse_steps, default=None, help="default budget / 20 (quick: 200)")
    parser.add_argument("--eval-episodes", type=int, default=None, help="default 10 (quick: 2)")
    parser.add_argument("--jobs", type=int, default=1, help="jobs run in parallel (one CPU thread each)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny model, 400 steps, 1 seed: a smoke test")
    parser.add_argument("--force", action="store_true", help="rerun finished jobs")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    budget = args.budget or (QUICK["budget"] if args.quick else 200_000)
    seeds = args.seeds or (list(QUICK["seeds"]) if args.quick else [0, 1, 2])  # type: ignore[call-overload]
    eval_freq = args.eval_freq or (QUICK["eval_freq"] if args.quick else max(1, budget // 20))
    eval_episodes = args.eval_episodes or (QUICK["eval_episodes"] if args.quick else 10)
    variants = list(dict.fromkeys(["default", *args.variants]))
    failed = 0
    if not args.report_only:
        jobs = [(args.env, v, s, budget, eval_freq, eval_episodes, args.quick, args.device) for v in variants for s in seeds]
        done = [j for j in jobs if not args.force and job_path(*j[:4], args.quick).exists()
                and json.loads(job_path(*j[:4], args.quick).read_text()).get("status") == "ok"]
        todo = [j for j in jobs if j not in done]
        print(f"{len(todo)} jobs to run ({len(done)} already done)", flush=True)
        if args.jobs > 1:
            pool = ProcessPoolExecutor(max_workers=args.jobs)
            records = pool.map(run_job, *zip(*todo)) if todo else iter(())
        else:  # in this process
            pool, records = None, (run_job(*job) for job in todo)
        for record in records:
            failed += record["status"] != "ok"
            print(f"{record['variant']:>16} seed {record['seed']}: {record['status']} "
                  f"final={record.get('final_return')} ({record['wall_s']} s) {record.get('error', '')}", flush=True)
        if pool is not None:
            pool.shutdown()
    markdown, path = report(args.env, budget, args.quick, variants)
    print(markdown)
    print(f"report: {path}")
    return 1 if args.quick and not args.report_only and failed else 0


if __name__ == "__main__":
    sys.exit(main())
