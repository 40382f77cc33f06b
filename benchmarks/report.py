"""Aggregate the learning benchmark into ``benchmarks/results/REPORT.md`` and PNG learning curves.

Pipeline (pure functions except the first and the last step):

1. :func:`find_runs` reads every job folder under ``benchmarks/results/learning/<algo>/<env>/seed<k>_<budget>[_tag]/``:
   its ``job.json`` (``running`` while a job runs, ``paused`` when it stopped with a checkpoint to continue from) and
   the zoo's ``<algo>/<EnvName>_<n>/evaluations.npz``.
2. :func:`aggregate` turns runs into table rows: per (env, algo[, tag]) and fixed budget, the mean ± std over seeds of
   the evaluation return (mean over the evaluation's episodes) of the **last evaluation at or before the budget**
   (nothing is interpolated; a seed counts at a budget only if its run got that far), steps-to-threshold where a
   threshold applies (first evaluation whose mean return reaches it), seeds, failed runs, mean wall-clock per run.
3. :func:`render_markdown` writes the tables next to the published anchors of ``benchmarks/anchors.yaml`` and the
   uniform random policy's return on the same env (``benchmarks/results/random/``, from ``benchmarks.random_baseline``).
4. :func:`plot_env` draws one PNG per env: mean ± std band over seeds for every algorithm, the random policy's mean.

``std`` is the sample standard deviation over seeds (ddof = 1; 0 for a single seed). Failed runs are listed, never
averaged. When one seed has several runs (different budgets), the one that got furthest is used (then a finished one,
then the larger budget): a longer run still short of a shorter finished one does not hide it.

Usage::

    python -m benchmarks.report                      # results/learning -> results/REPORT.md + results/plots/*.png
    python -m benchmarks.report --no-plots --out /tmp/REPORT.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, RESULTS_DIR, env_slug, fmt_steps, parse_steps
from benchmarks.learning import LEARNING_DIR, SUITES
from benchmarks.random_baseline import RANDOM_DIR

ANCHORS_FILE = Path(__file__).resolve().parent / "anchors.yaml"
RANDOM_LEVEL_SE = 2.0  # "above random play": above the random policy's mean by more than this many standard errors
JOB_DIR_RE = re.compile(r"^seed(?P<seed>\d+)_(?P<budget>[0-9.]+[kM]?)(?:_(?P<tag>.+))?$")
ALGO_LABELS = {"dreamerv2": "DreamerV2", "dqn": "DQN", "dreamerv3": "DreamerV3"}


# ---------------------------------------------------------------------------------------------------------- data
PARTIAL_OK = ("ok", "running", "stopped", "paused")  # statuses whose evaluations count (up to where the run got)


@dataclasses.dataclass
class Run:
    """One job: evaluation curve (env steps, mean evaluation return) and its status."""

    algo: str
    env: str
    seed: int
    budget: int | None  # configured env steps (None if unknown)
    timesteps: np.ndarray  # [n_evals] int
    returns: np.ndarray  # [n_evals] mean return over the evaluation's episodes
    # ok | failed | timeout | interrupted | running | stopped (by hand, partial results kept) | paused (stopped with a
    # checkpoint: the harness continues it; partial results kept)
    status: str = "ok"
    tag: str = ""
    wall_seconds: float | None = None
    path: str = ""
    episodes: int = 0  # episodes per evaluation (0: unknown)

    @property
    def label(self) -> str:
        return self.algo + (f" [{self.tag}]" if self.tag else "")


@dataclasses.dataclass
class Cell:
    mean: float
    std: float
    n: int


@dataclasses.dataclass
class Row:
    env: str
    label: str
    algo: str
    cells: dict[int, Cell | None]  # budget -> aggregate (None: no seed reached the budget)
    threshold: float | None
    threshold_steps: Cell | None  # over the seeds that reached the threshold
    threshold_reached: int
    n_seeds: int  # runs aggregated (ok, running, stopped early by hand or paused: those count up to where they got)
    n_failed: int
    n_running: int
    wall_seconds_mean: float | None
    max_steps: int  # largest evaluated env step over the seeds
    min_steps: int = 0  # the seed that got least far: its last evaluated env step
    n_stopped: int = 0
    n_paused: int = 0
    wall_seconds_range: tuple[float, float] | None = None  # fastest and slowest finished run
    last: Cell | None = None  # each seed's last evaluation, wherever it got to (diagnostic runs off the budgets)
    episodes: int = 0  # episodes per evaluation, the fewest over the seeds (0: unknown)


def load_evaluations(path: Path | str) -> tuple[np.ndarray, np.ndarray, int]:
    """(timesteps, mean return per evaluation, episodes per evaluation) from an EvalCallback ``evaluations.npz``."""
    with np.load(path) as data:
        timesteps = np.asarray(data["timesteps"], dtype=np.int64).reshape(-1)
        results = np.asarray(data["results"], dtype=np.float64)
    if not len(timesteps):
        return timesteps, np.zeros(0), 0
    results = results.reshape(len(timesteps), -1)
    return timesteps, results.mean(axis=1), results.shape[1]


def _run_number(path: Path) -> int:
    match = re.search(r"_(\d+)$", path.parent.name)
    return int(match.group(1)) if match else -1


def _env_from_slug(slug: str) -> str:
    known = {env_slug(env): env for suite in SUITES.values() for env in suite.envs}
    return known.get(slug, slug)


def find_runs(root: Path | str = LEARNING_DIR) -> list[Run]:
    """Every job folder under ``root`` (``<algo>/<env>/seed<k>_<budget>[_tag]``) as a :class:`Run`."""
    runs = []
    root = Path(root)
    for job_dir in sorted(root.glob("*/*/seed*")):
        match = JOB_DIR_RE.match(job_dir.name)
        if not job_dir.is_dir() or match is None:
            continue
        algo = job_dir.parent.parent.name
        record: dict[str, Any] = {}
        if (job_dir / "job.json").exists():
            try:
                record = json.loads((job_dir / "job.json").read_text())
            except ValueError:
                record = {}
        npzs = sorted(job_dir.glob(f"{algo}/*/evaluations.npz"), key=_run_number)
        if npzs:
            timesteps, returns, episodes = load_evaluations(npzs[-1])
        else:
            timesteps, returns, episodes = np.zeros(0, dtype=np.int64), np.zeros(0), 0
        runs.append(
            Run(
                algo=record.get("algo", algo),
                env=record.get("env") or _env_from_slug(job_dir.parent.name),
                seed=int(record.get("seed", match.group("seed"))),
                budget=int(record["budget"]) if "budget" in record else parse_steps(match.group("budget")),
                timesteps=timesteps,
                returns=returns,
                status=record.get("status", "running"),
                tag=record.get("tag", match.group("tag") or ""),
                wall_seconds=record.get("wall_seconds"),
                path=str(job_dir),
                episodes=episodes,
            )
        )
    return runs


# ---------------------------------------------------------------------------------------------------------- pure
def covers(run: Run, budget: int) -> bool:
    """Whether ``run`` reached ``budget`` env steps: evaluated at or past it, or finished with a budget >= it."""
    if len(run.timesteps) == 0:
        return False
    if run.timesteps.max() >= budget:
        return True
    return run.status == "ok" and run.budget is not None and run.budget >= budget


def value_at(run: Run, budget: int) -> float | None:
    """Mean return of the last evaluation at or before ``budget`` (None if the run did not reach the budget)."""
    if not covers(run, budget):
        return None
    mask = run.timesteps <= budget
    if not mask.any():
        return None
    return float(run.returns[np.flatnonzero(mask)[-1]])


def steps_to_threshold(run: Run, threshold: float) -> int | None:
    """Env steps of the first evaluation whose mean return is >= ``threshold`` (None if never)."""
    hits = np.flatnonzero(run.returns >= threshold)
    return int(run.timesteps[hits[0]]) if len(hits) else None


def mean_std(values: Sequence[float]) -> Cell | None:
    """Mean and sample std (ddof 1; 0 for one value) of ``values``; None if empty."""
    if len(values) == 0:
        return None
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return Cell(float(arr.mean()), std, len(arr))


def _progress(run: Run) -> tuple[int, bool, int]:
    return int(run.timesteps.max()) if len(run.timesteps) else -1, run.status == "ok", run.budget or 0


def select_runs(runs: Iterable[Run]) -> tuple[dict[tuple[str, str], list[Run]], dict[tuple[str, str], list[Run]]]:
    """Group by (env, label): usable runs (one per seed: the furthest evaluated, then finished, then the largest
    budget) and failed runs."""
    usable: dict[tuple[str, str], dict[int, Run]] = defaultdict(dict)
    failed: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        key = (run.env, run.label)
        if run.status not in PARTIAL_OK:
            failed[key].append(run)
            continue
        best = usable[key].get(run.seed)
        if best is None or _progress(run) > _progress(best):
            usable[key][run.seed] = run
    return {k: [v[s] for s in sorted(v)] for k, v in usable.items()}, dict(failed)


def default_budgets(env: str) -> tuple[int, ...]:
    """Report budgets of the suite that contains ``env`` (else none: the caller falls back on the data)."""
    for suite in SUITES.values():
        if env in suite.envs:
            return suite.report_budgets
    return ()


def default_threshold(env: str) -> float | None:
    for suite in SUITES.values():
        if env in suite.envs and suite.threshold is not None:
            return suite.threshold
    return None


def aggregate(
    runs: Iterable[Run],
    budgets: Mapping[str, Sequence[int]] | None = None,
    thresholds: Mapping[str, float | None] | None = None,
) -> list[Row]:
    """Table rows, one per (env, algo label), sorted by env then label; only budgets some row of the env reached.

    :param budgets: env -> report budgets (default: the suite's; else a quarter, half and all of the longest run)
    :param thresholds: env -> return threshold for steps-to-threshold (default: the suite's, e.g. CartPole 475)
    """
    runs = list(runs)
    usable, failed = select_runs(runs)
    budgets = dict(budgets or {})
    thresholds = dict(thresholds or {})
    rows = []
    envs = sorted({run.env for run in runs})
    for env in envs:
        keys = sorted({k for k in (*usable, *failed) if k[0] == env}, key=lambda k: k[1])
        env_budgets = tuple(budgets.get(env) or default_budgets(env))
        if not env_budgets:
            longest = max((int(r.timesteps.max()) for k in keys for r in usable.get(k, []) if len(r.timesteps)), default=0)
            env_budgets = tuple(sorted({longest // 4, longest // 2, longest} - {0}))
        threshold = thresholds[env] if env in thresholds else default_threshold(env)
        env_rows = []
        for key in keys:
            seeds = usable.get(key, [])
            cells = {b: mean_std([v for v in (value_at(r, b) for r in seeds) if v is not None]) for b in env_budgets}
            reached = [s for s in (steps_to_threshold(r, threshold) for r in seeds) if s is not None] if threshold else []
            walls = [r.wall_seconds for r in seeds if r.wall_seconds is not None and r.status == "ok"]
            any_run = (seeds or failed[key])[0]
            last_steps = [int(r.timesteps.max()) for r in seeds if len(r.timesteps)]  # how far each seed got
            env_rows.append(
                Row(
                    env=env, label=key[1], algo=any_run.algo, cells=cells, threshold=threshold,
                    threshold_steps=mean_std(reached), threshold_reached=len(reached), n_seeds=len(seeds),
                    n_failed=len(failed.get(key, [])), n_running=sum(r.status == "running" for r in seeds),
                    n_stopped=sum(r.status == "stopped" for r in seeds), n_paused=sum(r.status == "paused" for r in seeds),
                    wall_seconds_mean=float(np.mean(walls)) if walls else None,
                    wall_seconds_range=(min(walls), max(walls)) if walls else None,
                    max_steps=max(last_steps, default=0), min_steps=min(last_steps, default=0),
                    last=mean_std([float(r.returns[-1]) for r in seeds if len(r.returns)]),
                    episodes=min((r.episodes for r in seeds if r.episodes), default=0),
                )
            )
        shown = [b for b in env_budgets if any(row.cells.get(b) is not None for row in env_rows)]
        for row in env_rows:
            row.cells = {b: row.cells[b] for b in shown}
        rows.extend(env_rows)
    return rows


def curve(runs: Sequence[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std, n) over seeds on the union of evaluation steps; each seed counts where it got to."""
    grid = np.unique(np.concatenate([r.timesteps for r in runs])) if runs else np.zeros(0, dtype=np.int64)
    means, stds, counts = [], [], []
    for t in grid:
        cell = mean_std([v for v in (value_at(r, int(t)) for r in runs) if v is not None])
        means.append(cell.mean if cell else np.nan)
        stds.append(cell.std if cell else np.nan)
        counts.append(cell.n if cell else 0)
    return grid, np.asarray(means), np.asarray(stds), np.asarray(counts)


def load_random_baselines(root: Path | str = RANDOM_DIR) -> dict[str, dict[str, Any]]:
    """The uniform random policy's results (``python -m benchmarks.random_baseline``) by env id; empty if none."""
    baselines = {}
    for path in sorted(Path(root).glob("*.json")):
        data = json.loads(path.read_text())
        baselines[str(data["env"])] = data
    return baselines


def fmt_random(baseline: Mapping[str, Any] | None) -> str:
    """``mean ± std`` of the random policy's episode returns, ``—`` when not measured."""
    return fmt_cell(None if baseline is None else Cell(baseline["mean"], baseline["std"], baseline["episodes"]))


def load_anchors(path: Path | str = ANCHORS_FILE) -> list[dict[str, Any]]:
    import yaml

    with open(path) as f:
        return list(yaml.safe_load(f)["anchors"])


def _fmt_value(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"


def fmt_cell(cell: Cell | None, n_seeds: int | None = None) -> str:
    """``mean ± std`` (with ``(n=k)`` when fewer than ``n_seeds`` seeds count), ``—`` when empty."""
    if cell is None:
        return "—"
    text = f"{_fmt_value(cell.mean)} ± {_fmt_value(cell.std)}"
    if n_seeds is not None and cell.n < n_seeds:
        text += f" (n={cell.n})"
    return text


def fmt_threshold(row: Row) -> str:
    if row.threshold is None:
        return "n/a"
    reached = f"{row.threshold_reached}/{row.n_seeds} seeds"
    if row.threshold_steps is None:
        return f"not reached ({reached})"
    cell = row.threshold_steps
    return f"{fmt_approx_steps(cell.mean)} ± {fmt_approx_steps(cell.std)} ({reached})"


def fmt_approx_steps(steps: float) -> str:
    """Rounded step count for averages: 840 -> '840', 25000 -> '25k', 7071.1 -> '7.1k', 1.25e6 -> '1.25M'."""
    if steps < 1000:
        return f"{steps:.0f}"
    if steps < 1_000_000:
        return f"{steps / 1e3:.1f}".rstrip("0").rstrip(".") + "k"
    return f"{steps / 1e6:.2f}".rstrip("0").rstrip(".") + "M"


def fmt_wall(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def fmt_wall_range(row: Row) -> str:
    """Wall-clock per finished run: the mean, or the range when the slowest took over 1.2x the fastest (other budgets,
    threads or machines)."""
    if row.wall_seconds_range is None or row.wall_seconds_range[1] <= 1.2 * row.wall_seconds_range[0]:
        return fmt_wall(row.wall_seconds_mean)
    return "-".join(fmt_wall(s) for s in row.wall_seconds_range)


@dataclasses.dataclass
class Comparison:
    """DreamerV2 beside DQN (untagged runs) on one measure of one env."""

    env: str
    measure: str  # "return @ 100k" or "seeds ≥ 475 within 20k"
    dreamer: str
    dqn: str
    ahead: str  # "DreamerV2", "DQN" or "tie"
    within_spread: bool  # the difference is smaller than the larger of the two seed stds
    budget: int | None = None  # the return budget (None for steps-to-threshold)


def head_to_head(rows: Sequence[Row], usable: Mapping[tuple[str, str], Sequence[Run]]) -> list[Comparison]:
    """Who is ahead, env by env: the return at every report budget both reached, then steps-to-threshold.

    Steps-to-threshold is compared on equal footing: at the smallest env steps every seed of both algorithms reached
    (runs of different lengths would otherwise favour the longer one), the number of seeds that reached the threshold
    by then, ties broken by the mean steps of those seeds (fewer is better).
    """
    first, second = "dreamerv2", "dqn"
    out: list[Comparison] = []
    by_key = {(row.env, row.label): row for row in rows}
    for env in dict.fromkeys(row.env for row in rows):
        a, b = by_key.get((env, first)), by_key.get((env, second))
        if a is None or b is None:
            continue
        for budget, cell_a in a.cells.items():
            cell_b = b.cells.get(budget)
            if cell_a is None or cell_b is None:
                continue
            diff = cell_a.mean - cell_b.mean
            ahead = "tie" if diff == 0 else (_label(first) if diff > 0 else _label(second))
            out.append(Comparison(env, f"return @ {fmt_steps(budget)}", fmt_cell(cell_a, a.n_seeds),
                                  fmt_cell(cell_b, b.n_seeds), ahead, abs(diff) < max(cell_a.std, cell_b.std), budget))
        threshold = a.threshold
        runs_a, runs_b = usable.get((env, first), []), usable.get((env, second), [])
        if threshold is None or not runs_a or not runs_b:
            continue
        common = min(int(r.timesteps.max()) for r in (*runs_a, *runs_b) if len(r.timesteps))
        hits = []
        for runs in (runs_a, runs_b):
            steps = [s for s in (steps_to_threshold(r, threshold) for r in runs) if s is not None and s <= common]
            hits.append((len(steps), float(np.mean(steps)) if steps else math.inf, len(runs)))
        (n_a, mean_a, seeds_a), (n_b, mean_b, seeds_b) = hits
        key_a, key_b = (n_a, -mean_a), (n_b, -mean_b)
        ahead = "tie" if key_a == key_b else (_label(first) if key_a > key_b else _label(second))

        def text(n: int, mean: float, seeds: int) -> str:
            return f"{n}/{seeds} seeds" + (f", first at {fmt_approx_steps(mean)} on average" if n else "")

        out.append(Comparison(env, f"seeds ≥ {_fmt_value(threshold)} within {fmt_approx_steps(common)}",
                              text(n_a, mean_a, seeds_a), text(n_b, mean_b, seeds_b), ahead, False))
    return out


def render_head_to_head(comparisons: Sequence[Comparison], random: Mapping[str, Mapping[str, Any]] | None = None,
                        above: Mapping[tuple[str, int], tuple[bool | None, bool | None]] | None = None) -> str:
    """The comparison table (with the uniform random policy's return per env where ``random`` has it), then one line
    per suite budget: on how many of the suite's envs DreamerV2 is ahead and, given ``above`` ((env, budget) ->
    whether DreamerV2 and DQN are above random play, :func:`above_random`), on how many each one is above it."""
    if not comparisons:
        return ""
    random, above = random or {}, above or {}
    lines = ["| env | measure | DreamerV2 | DQN | uniform random | ahead |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        ahead = c.ahead + (" (within the seed spread)" if c.within_spread else "")
        if c.budget is not None and above.get((c.env, c.budget)) == (False, False):
            ahead += " (neither above random play)"
        level = fmt_random(random.get(c.env)) if c.budget is not None else ""
        lines.append(f"| {c.env} | {c.measure} | {c.dreamer} | {c.dqn} | {level} | {ahead} |")
    lines.append("")
    for suite in SUITES.values():
        if len(suite.envs) < 2:
            continue
        for budget in suite.report_budgets:
            measured = [c for c in comparisons if c.env in suite.envs and c.budget == budget]
            if measured:
                wins = sum(c.ahead == _label("dreamerv2") for c in measured)
                line = (f"* **{suite.name} @ {fmt_steps(budget)}**: DreamerV2 ahead on {wins} of {len(measured)} "
                        f"games measured by both ({len(suite.envs)} in the suite).")
                known = [above[(c.env, budget)] for c in measured if (c.env, budget) in above]
                if known:
                    counts = [sum(bool(flags[i]) for flags in known) for i in (0, 1)]
                    line += (f" Above random play on {counts[0]} (DreamerV2) and {counts[1]} (DQN) of the {len(known)} "
                             "with a random baseline.")
                lines.append(line)
    return "\n".join(lines).rstrip()


def _game(env: str) -> str:
    """``MinAtar/SpaceInvaders-v1`` -> ``SpaceInvaders``."""
    return re.sub(r"-v\d+$", "", env.rpartition("/")[2])


def fmt_grid_cell(cell: Cell, n_expected: int) -> str:
    """``mean ± std``, ``mean ± std (k seeds)`` when fewer than ``n_expected`` seeds count, ``mean (1 seed)``."""
    if cell.n == 1 and n_expected > 1:
        return f"{_fmt_value(cell.mean)} (1 seed)"
    text = f"{_fmt_value(cell.mean)} ± {_fmt_value(cell.std)}"
    return text + (f" ({cell.n} seeds)" if cell.n < n_expected else "")


def render_suite_grid(rows: Sequence[Row], suite_name: str, algos: tuple[str, str] = ("dreamerv2", "dqn")) -> str:
    """One line per game of the suite: both algorithms (untagged runs) side by side at each report budget that some
    game reached, the higher mean in bold, and a last line counting the games the first one is ahead on.

    This is the compact table the README shows; ``tests/test_benchmarks.py`` checks that the README holds the one
    generated from the committed results.
    """
    suite = SUITES[suite_name]
    by_key = {(row.env, row.label): row for row in rows}

    def cell(env: str, algo: str, budget: int) -> Cell | None:
        row = by_key.get((env, algo))
        return row.cells.get(budget) if row else None

    budgets = [b for b in suite.report_budgets if any(cell(env, algo, b) for env in suite.envs for algo in algos)]
    if not budgets:
        return ""
    names = [_label(algo) for algo in algos]
    header = ["game"] + [f"{name} @ {fmt_steps(b)}" for b in budgets for name in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    wins = {b: [0, 0] for b in budgets}  # budget -> [games the first algorithm is ahead on, games measured by both]
    for env in suite.envs:
        if not any(by_key.get((env, algo)) for algo in algos):
            continue
        cells: list[str] = []
        for b in budgets:
            pair = [cell(env, algo, b) for algo in algos]
            texts = ["—" if c is None else fmt_grid_cell(c, len(suite.seeds)) for c in pair]
            if pair[0] is not None and pair[1] is not None:
                wins[b][1] += 1
                wins[b][0] += pair[0].mean > pair[1].mean
                if pair[0].mean != pair[1].mean:
                    best = 0 if pair[0].mean > pair[1].mean else 1
                    texts[best] = f"**{texts[best]}**"
            cells += texts
        lines.append(f"| {_game(env)} | " + " | ".join(cells) + " |")
    counts = [f"{wins[b][0]} of {wins[b][1]}" if wins[b][1] else "—" for b in budgets]
    lines.append(f"| {names[0]} ahead on | " + " | ".join(part for c in counts for part in (c, "")) + " |")
    return "\n".join(lines)


def _label(label: str) -> str:
    algo, _, rest = label.partition(" ")
    return ALGO_LABELS.get(algo, algo) + (f" {rest}" if rest else "")


def fmt_reached(row: Row) -> str:
    """How far the seeds got: one step count, or the range when they stopped at different ones."""
    if row.min_steps and row.min_steps < row.max_steps:
        return f"{fmt_steps(row.min_steps)}-{fmt_steps(row.max_steps)}"
    return fmt_steps(row.max_steps)


def render_env_table(rows: Sequence[Row]) -> str:
    """The markdown table of one env's rows."""
    budgets = list(rows[0].cells) if rows else []
    threshold = rows[0].threshold if rows else None
    header = ["algorithm", *(f"return @ {fmt_steps(b)}" for b in budgets)]
    if threshold is not None:
        header.append(f"steps to ≥ {_fmt_value(threshold)}")
    header += ["seeds", "env steps reached", "last evaluation", "wall-clock / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seeds = str(row.n_seeds) + (f" ({row.n_running} running)" if row.n_running else "")
        seeds += f" ({row.n_stopped} stopped early)" if row.n_stopped else ""
        seeds += f" ({row.n_paused} paused, to be continued)" if row.n_paused else ""
        seeds += f" (+{row.n_failed} failed)" if row.n_failed else ""
        cells = [_label(row.label), *(fmt_cell(row.cells[b], row.n_seeds) for b in budgets)]
        if threshold is not None:
            cells.append(fmt_threshold(row))
        cells += [seeds, fmt_reached(row), fmt_cell(row.last, row.n_seeds), fmt_wall_range(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ours_at(runs_by_key: Mapping[tuple[str, str], Sequence[Run]], env: str, algo: str, budget: int) -> Cell | None:
    """Our untagged runs of ``algo`` on ``env`` aggregated at ``budget`` (for the anchors table)."""
    seeds = runs_by_key.get((env, algo), [])
    return mean_std([v for v in (value_at(r, budget) for r in seeds) if v is not None])


def render_anchor_table(anchors: Sequence[Mapping[str, Any]], runs_by_key: Mapping[tuple[str, str], Sequence[Run]],
                        env: str) -> str:
    """Published anchors of ``env`` next to our value of the same algorithm at the same budget."""
    rows = sorted((a for a in anchors if a["env"] == env), key=lambda a: (str(a["algo"]), int(a["budget_steps"])))
    if not rows:
        return ""
    header = ["source", "algorithm", "budget", "published", "ours at that budget", "metric", "comparable", "why"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for a in rows:
        budget = int(a["budget_steps"])
        budget_text = fmt_steps(budget) + (f" ({fmt_steps(4 * budget)} frames)" if _is_atari(env) else "")
        published = _fmt_value(float(a["value"])) + (f" ({a['range']})" if a.get("range") else "")
        published += f" [{a.get('tag', '?')}]"
        ours = fmt_cell(ours_at(runs_by_key, env, str(a["algo"]), budget))
        comparable = "yes" if a.get("comparable") is True else "no"
        lines.append("| " + " | ".join(
            [str(a["source"]), _label(str(a["algo"])), budget_text, published, ours, str(a.get("metric", "")),
             comparable, str(a.get("why", "")).replace("\n", " ")]
        ) + " |")
    return "\n".join(lines)


def _is_atari(env: str) -> bool:
    return env.startswith("ALE/") or "NoFrameskip" in env


def above_random(cell: Cell, episodes: int, baseline: Mapping[str, Any]) -> bool | None:
    """Whether ``cell``'s mean return is above random play: above the uniform random policy's mean by more than
    ``RANDOM_LEVEL_SE`` standard errors of a random evaluation as large as the cell's (seeds x episodes per
    evaluation), so that evaluation noise around random play does not explain it. None when the episodes are unknown."""
    if not episodes or not cell.n:
        return None
    return cell.mean > baseline["mean"] + RANDOM_LEVEL_SE * baseline["std"] / math.sqrt(cell.n * episodes)


def _above_random(rows: Sequence[Row], random: Mapping[str, Mapping[str, Any]]
                  ) -> dict[tuple[str, int], tuple[bool | None, bool | None]]:
    """(env, budget) -> (DreamerV2 above random play, DQN above random play) for the untagged rows of envs that have a
    random baseline, where both rows have a value."""
    by_key = {(row.env, row.label): row for row in rows if row.env in random}
    out = {}
    for (env, label), row in by_key.items():
        other = by_key.get((env, "dqn"))
        if label != "dreamerv2" or other is None:
            continue
        for budget, cell in row.cells.items():
            other_cell = other.cells.get(budget)
            if cell is not None and other_cell is not None:
                out[(env, budget)] = (above_random(cell, row.episodes, random[env]),
                                      above_random(other_cell, other.episodes, random[env]))
    return out


def render_random_line(baseline: Mapping[str, Any]) -> str:
    """One sentence on the uniform random policy's return on an env."""
    lengths = baseline.get("lengths") or []
    length = f"; mean length {np.mean(lengths):.0f} steps" if lengths else ""
    return (f"Uniform random policy on the same evaluation env: **{fmt_random(baseline)}** (standard error "
            f"{baseline['sem']:.2g}) over {baseline['episodes']} episodes{length} "
            f"(`{baseline.get('command', 'python -m benchmarks.random_baseline')}`).")


def render_markdown(
    rows: Sequence[Row],
    runs: Sequence[Run] = (),
    anchors: Sequence[Mapping[str, Any]] = (),
    plots: Mapping[str, str] | None = None,
    generated: str | None = None,
    source: str = "benchmarks/results/learning/",
    random: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The whole REPORT.md: per env the table, the random policy's return, the plot and the published anchors; then
    protocol notes."""
    plots, random = plots or {}, random or {}
    usable, failed = select_runs(runs)
    out = ["# Learning benchmark: DreamerV2 vs DQN", ""]
    if generated:
        out += [f"Generated {generated} by `python -m benchmarks.report` from `{source}`.", ""]
    out += [
        "Evaluation return = mean over the evaluation's episodes (the zoo's EvalCallback, `evaluations.npz`); each cell",
        "is the mean ± sample std over seeds of the **last evaluation at or before the budget** (no interpolation; a",
        "seed counts only if its run reached the budget, `(n=k)` when fewer seeds than the row's count). Budgets are",
        "env (agent) steps; Atari steps are 4 frames each. Steps-to-threshold: first evaluation whose mean return",
        "reaches the threshold, averaged over the seeds that reached it. *Env steps reached* is a range when the seeds",
        "stopped at different steps; *last evaluation* is each seed's final one, wherever it got to; *wall-clock / run*",
        "is the mean over finished runs, or their range when they differ by over 1.2x (budgets, threads).",
        "",
    ]
    by_env: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_env[row.env].append(row)
    if not by_env:
        out += ["No results yet: run `python -m benchmarks.learning --suite cartpole` first.", ""]
    for suite in SUITES.values():
        grid = render_suite_grid(rows, suite.name) if len(suite.envs) > 1 else ""
        if grid:
            out += [f"## {suite.name} at a glance", "",
                    f"Untagged runs, mean ± std over the suite's {len(suite.seeds)} seeds unless the cell says otherwise; "
                    "bold: the higher mean. The README shows this table.", "", grid, ""]
    comparison = render_head_to_head(head_to_head(rows, usable), random, _above_random(rows, random))
    if comparison:
        out += ["## DreamerV2 vs DQN", "",
                "Untagged runs only; *ahead* is the higher mean (for steps-to-threshold: more seeds there within the "
                "env steps every seed of both reached, then fewer steps). *Within the seed spread*: the difference is "
                "smaller than the larger of the two standard deviations. *Uniform random*: mean ± std of the random "
                "policy's episode returns on the same evaluation env (`python -m benchmarks.random_baseline`); *above "
                f"random play*: a mean above the random policy's by more than {RANDOM_LEVEL_SE:g} standard errors of a "
                "random evaluation with as many episodes (seeds x episodes per evaluation).", "", comparison, ""]
    for env, env_rows in by_env.items():
        out += [f"## {env}", "", render_env_table(env_rows), ""]
        if env in random:
            out += [render_random_line(random[env]), ""]
        if env in plots:
            out += [f"![{env} learning curves]({plots[env]})", ""]
        table = render_anchor_table(anchors, usable, env)
        if table:
            out += ["Published anchors (from `benchmarks/anchors.yaml`; *comparable* refers to this protocol):", "",
                    table, ""]
        env_failed = [r for key, rs in failed.items() if key[0] == env for r in rs]
        if env_failed:
            out += ["Failed runs (not averaged): " + ", ".join(
                f"{r.label} seed {r.seed} ({r.status}, `{Path(r.path).name}`)" for r in env_failed), ""]
    suites = [s for s in SUITES.values() if any(env in by_env for env in s.envs)]
    if suites:
        out += ["## Protocol", ""]
        out += [f"* **{s.name}** (`python -m benchmarks.learning --suite {s.name}`): {s.notes}" for s in suites]
        out += [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------- plots
def plot_env(env: str, runs_by_label: Mapping[str, Sequence[Run]], out_path: Path,
             anchors: Sequence[Mapping[str, Any]] = (), threshold: float | None = None,
             random_level: float | None = None) -> Path:
    """One PNG: mean ± std band over seeds per algorithm, published anchors as markers, the random policy's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {}
    for i, (label, runs) in enumerate(sorted(runs_by_label.items())):
        steps, mean, std, n = curve(runs)
        if len(steps) == 0:
            continue
        (line,) = ax.plot(steps, mean, label=f"{_label(label)} ({len(runs)} seeds)", color=f"C{i}")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())
        colors[label.split(" ")[0]] = line.get_color()
    reached = max((int(r.timesteps.max()) for runs in runs_by_label.values() for r in runs if len(r.timesteps)),
                  default=0)
    for a in anchors:  # only anchors inside the plotted range (far-away budgets would squash the curves)
        if a["env"] != env or int(a["budget_steps"]) > 1.05 * reached:
            continue
        color = colors.get(str(a["algo"]), "gray")
        name = str(a["source"]).split(" (")[0]
        name = name.split(" ")[0] if len(name) > 32 else name
        comparable = "comparable" if a.get("comparable") else "not comparable"
        ax.scatter([a["budget_steps"]], [a["value"]], marker="x" if a.get("comparable") else "+", color=color, s=50,
                   label=f"{_label(str(a['algo']))}: {name} ({comparable})")
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle=":", linewidth=1, label=f"threshold {_fmt_value(threshold)}")
    if random_level is not None:
        ax.axhline(random_level, color="gray", linestyle="--", linewidth=1,
                   label=f"uniform random {_fmt_value(random_level)}")
    ax.set_xlabel("env steps" + (" (1 step = 4 frames)" if _is_atari(env) else ""))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: fmt_approx_steps(x) if x > 0 else "0"))
    ax.set_ylabel("evaluation return")
    ax.set_title(env)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def make_report(results_dir: Path = LEARNING_DIR, out: Path = RESULTS_DIR / "REPORT.md",
                plots_dir: Path | None = RESULTS_DIR / "plots", anchors_file: Path = ANCHORS_FILE,
                budgets: Mapping[str, Sequence[int]] | None = None, random_dir: Path | None = RANDOM_DIR) -> str:
    """Parse, aggregate, plot and write the report; returns its markdown."""
    runs = find_runs(results_dir)
    random = load_random_baselines(random_dir) if random_dir is not None else {}
    rows = aggregate(runs, budgets=budgets)
    anchors = load_anchors(anchors_file) if anchors_file and Path(anchors_file).exists() else []
    plots: dict[str, str] = {}
    if plots_dir is not None:
        usable, _ = select_runs(runs)
        for env in sorted({r.env for r in runs}):
            by_label = {label: rs for (e, label), rs in usable.items() if e == env}
            if not any(len(r.timesteps) for rs in by_label.values() for r in rs):
                continue
            level = random[env]["mean"] if env in random else None
            path = plot_env(env, by_label, Path(plots_dir) / f"{env_slug(env)}.png", anchors, default_threshold(env),
                            level)
            try:
                plots[env] = str(path.resolve().relative_to(Path(out).resolve().parent))
            except ValueError:
                plots[env] = str(path)
    try:
        source = str(Path(results_dir).resolve().relative_to(REPO_ROOT)) + "/"
    except ValueError:
        source = str(results_dir)
    text = render_markdown(rows, runs, anchors, plots, random=random,
                           generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), source=source)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=LEARNING_DIR, help="root of the job folders")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "REPORT.md", help="markdown file to write")
    parser.add_argument("--plots-dir", type=Path, default=RESULTS_DIR / "plots", help="folder of the PNG curves")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG curves")
    parser.add_argument("--anchors", type=Path, default=ANCHORS_FILE, help="published anchors (YAML)")
    parser.add_argument("--random-dir", type=Path, default=RANDOM_DIR,
                        help="the uniform random policy's results (python -m benchmarks.random_baseline)")
    parser.add_argument("--budgets", nargs="+", metavar="ENV=B1,B2", default=[],
                        help="report budgets per env, e.g. CartPole-v1=10k,25k,50k (default: the suite's)")
    parser.add_argument("--print", action="store_true", help="also print the markdown")
    args = parser.parse_args(argv)
    budgets = {}
    for item in args.budgets:
        env, _, values = item.partition("=")
        budgets[env] = [parse_steps(v) for v in values.split(",") if v]
    text = make_report(args.results_dir, args.out, None if args.no_plots else args.plots_dir, args.anchors, budgets,
                       args.random_dir)
    if args.print:
        print(text)
    print(f"[report] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
