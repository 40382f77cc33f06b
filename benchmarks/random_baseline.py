"""The uniform random policy's return on each env of a suite: the level every learning curve starts from.

A learned return means little without it (on MinAtar Asterix, returns near 0.5 are what random actions get). Each
env is built the way the zoo builds the evaluation env of the suite's jobs: ``rl_zoo3.utils.create_test_env`` with the
env wrapper of the env's entry in ``sb3_dreamer/hyperparams/dreamerv2.yml`` (the ``atari`` entry for ALE ids, as the
zoo picks it) and the suite's ``--env-kwargs`` (the only env kwargs the zoo gives its evaluation env), so the Monitor
sits above the suite's time limit. Uniformly random actions (the action space's own ``sample()``, seeded) play
``--episodes`` episodes through SB3's ``evaluate_policy``. One JSON per env:

    benchmarks/results/random/<env with / -> ->.json

with every episode's return and length, mean, sample std and standard error; ``python -m benchmarks.report`` prints
it beside DreamerV2 and DQN.

Usage::

    python -m benchmarks.random_baseline --suite minatar              # 100 episodes per game
    python -m benchmarks.random_baseline --suite cartpole --episodes 20
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, atomic_write_json, env_slug, machine_info
from benchmarks.learning import SUITES

RANDOM_DIR = RESULTS_DIR / "random"
HYPERPARAMS_FILE = Path(__file__).resolve().parents[1] / "sb3_dreamer" / "hyperparams" / "dreamerv2.yml"


class UniformRandomAgent:
    """``predict`` as SB3's ``evaluate_policy`` calls it, answering with uniformly random actions.

    :param action_space: the env's action space (seeded here)
    :param seed: seed of the action space's generator
    """

    def __init__(self, action_space: Any, seed: int) -> None:
        self.action_space = action_space
        self.action_space.seed(seed)

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, None]:
        n_envs = len(next(iter(observation.values())) if isinstance(observation, dict) else observation)
        return np.stack([np.asarray(self.action_space.sample()) for _ in range(n_envs)]), None


def env_wrapper(env_id: str, hyperparams_file: Path = HYPERPARAMS_FILE) -> Any:
    """The ``env_wrapper`` of ``env_id``'s entry in ``hyperparams_file`` (the ``atari`` entry for ALE ids), or None."""
    import yaml
    from rl_zoo3.exp_manager import ExperimentManager

    import sb3_dreamer.envs  # noqa: F401  (registers the MinAtar ids, which is_atari looks up)

    with open(hyperparams_file) as f:
        entries = yaml.safe_load(f)
    entry = entries.get(env_id) or (entries.get("atari") if ExperimentManager.is_atari(env_id) else None) or {}
    return entry.get("env_wrapper")


def parse_env_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["key:value", ...]`` as the zoo parses its ``--env-kwargs`` (rl_zoo3's ``StoreDict``)."""
    from rl_zoo3.utils import StoreDict

    parser = argparse.ArgumentParser()
    parser.add_argument("--env-kwargs", nargs="+", action=StoreDict, default={})
    return dict(parser.parse_args(["--env-kwargs", *items]).env_kwargs) if items else {}


def make_eval_env(env_id: str, env_kwargs: dict[str, Any], seed: int) -> Any:
    """One env as the zoo's EvalCallback gets it (a ``DummyVecEnv`` of ``Monitor`` over the env and its wrappers)."""
    from rl_zoo3.utils import create_test_env

    wrapper = env_wrapper(env_id)  # also registers the MinAtar ids, which create_test_env looks up
    return create_test_env(env_id, n_envs=1, seed=seed, should_render=False,
                           hyperparams={"env_wrapper": wrapper} if wrapper else {}, env_kwargs=env_kwargs)


def measure(env_id: str, env_kwargs: dict[str, Any], episodes: int, seed: int = 0) -> dict[str, Any]:
    """Returns and lengths of ``episodes`` uniformly random episodes, with their mean, sample std and standard error."""
    from stable_baselines3.common.evaluation import evaluate_policy

    env = make_eval_env(env_id, env_kwargs, seed)
    start = time.perf_counter()
    try:
        returns, lengths = evaluate_policy(UniformRandomAgent(env.action_space, seed), env, n_eval_episodes=episodes,
                                           deterministic=False, return_episode_rewards=True)
    finally:
        env.close()
    returns_arr = np.asarray(returns, dtype=np.float64)
    std = float(returns_arr.std(ddof=1)) if episodes > 1 else 0.0
    return {
        "env": env_id, "policy": "uniform random", "episodes": episodes, "seed": seed, "env_kwargs": env_kwargs,
        "env_wrapper": env_wrapper(env_id), "mean": float(returns_arr.mean()), "std": std,
        "sem": std / math.sqrt(episodes), "returns": [float(r) for r in returns], "lengths": [int(n) for n in lengths],
        "wall_seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True, help="suite whose envs and env kwargs to use")
    parser.add_argument("--envs", nargs="+", help="env ids (default: the suite's)")
    parser.add_argument("--episodes", type=int, default=100, help="episodes per env")
    parser.add_argument("--seed", type=int, default=0, help="seed of the env and of the random actions")
    parser.add_argument("--out-dir", type=Path, default=RANDOM_DIR, help="folder of the JSON files")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    suite = SUITES[args.suite]
    env_kwargs = parse_env_kwargs(suite.env_kwargs)
    command = "python -m benchmarks.random_baseline " + " ".join(sys.argv[1:] if argv is None else argv)
    for env_id in args.envs or suite.envs:
        result = measure(env_id, env_kwargs, args.episodes, args.seed)
        result.update(suite=suite.name, command=command, machine=machine_info(with_torch=False),
                      created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        path = Path(args.out_dir) / f"{env_slug(env_id)}.json"
        atomic_write_json(path, result)
        print(f"[random] {env_id}: {result['mean']:.2f} ± {result['std']:.2f} over {args.episodes} episodes "
              f"(mean length {np.mean(result['lengths']):.0f}) -> {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
