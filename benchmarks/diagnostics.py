"""Training diagnostics of the learning benchmark: any logged ``train/`` or ``rollout/`` value over env steps.

The evaluation curves (``benchmarks.report``) say *how well* a run plays; the values SB3's logger printed while it
trained say *why*: the actor's entropy collapsing to a NOOP policy on Breakout, or held at the uniform policy's ln |A|
by a large entropy scale on Freeway (docs/results.md). Every job's ``train.log`` holds those tables (the harness
captures the zoo's stdout), so this module reads them back:

1. :func:`parse_sb3_tables` turns SB3's human-readable logger output into one record per dump
   (``{"time/total_timesteps": 52348.0, "train/actor_entropy": 0.0843, ...}``). A resumed job appends to its
   ``train.log`` from its checkpoint on, so a record at or before an earlier one's step replaces what came after it:
   the series is the run as it continued.
2. :func:`binned_series` averages one key over fixed windows of env steps (``--bin``; 5k by default), as the
   accounts in docs/results.md quote them.
3. :func:`plot_diagnostic` draws one PNG: a line per run (colour per configuration tag, line style per seed),
   optional reference levels (e.g. ``--reference 1.0986 "uniform policy, ln 3"``).

Runs are chosen as the report chooses them (``benchmarks.report.select_runs``: per seed the run that got furthest).

Usage::

    python -m benchmarks.diagnostics --env MinAtar/Breakout-v1 --key train/actor_entropy --tags "" ent1e-2 \\
        --reference 1.0986 "uniform policy (ln 3)"
    python -m benchmarks.diagnostics --env MinAtar/Freeway-v1 --key rollout/ep_rew_mean --print
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, env_slug, fmt_steps, parse_steps
from benchmarks.learning import LEARNING_DIR
from benchmarks.report import Run, find_runs, fmt_approx_steps, select_runs

DIAGNOSTICS_DIR = RESULTS_DIR / "plots" / "diagnostics"
STEP_KEY = "time/total_timesteps"
_SECTION_RE = re.compile(r"^\|\s(?P<name>\S+)/\s+\|\s+\|$")  # "| train/               |          |"
_VALUE_RE = re.compile(r"^\|\s{4}(?P<key>\S.*?)\s*\|\s(?P<value>.*?)\s*\|$")  # "|    actor_entropy   | 0.0843   |"


def parse_sb3_tables(lines: Iterable[str]) -> list[dict[str, float]]:
    """The numeric values of every table that SB3's ``HumanOutputFormat`` printed, one dict per dump, in step order.

    Keys are ``section/name`` as logged (``train/actor_entropy``). Non-numeric values are skipped. A table whose
    ``time/total_timesteps`` is at or below an earlier table's (a job resumed from a checkpoint) drops the earlier
    tables from that step on.
    """
    records: list[dict[str, float]] = []
    current: dict[str, float] | None = None
    section = ""
    for raw in lines:
        line = raw.rstrip("\n")
        if line.startswith("---") and set(line) == {"-"}:
            if current:  # a closing rule (SB3 prints one above and one below every table)
                _append(records, current)
            current, section = ({} if not current else None), ""
            continue
        if current is None or not line.startswith("|"):
            continue
        match = _SECTION_RE.match(line)
        if match:
            section = match.group("name") + "/"
            continue
        match = _VALUE_RE.match(line)
        if match:
            with contextlib.suppress(ValueError):  # text values (e.g. a schedule's name) are not series
                current[section + match.group("key")] = float(match.group("value"))
    return records


def _append(records: list[dict[str, float]], record: dict[str, float]) -> None:
    step = record.get(STEP_KEY)
    if step is not None:
        while records and records[-1].get(STEP_KEY, -math.inf) >= step:
            records.pop()  # superseded by the resumed run
    records.append(record)


def read_train_log(path: Path | str) -> list[dict[str, float]]:
    """:func:`parse_sb3_tables` of a file (an empty list when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, errors="replace") as f:
        return parse_sb3_tables(f)


def series(records: Sequence[Mapping[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(env steps, values) of ``key`` over the records that logged both."""
    pairs = [(r[STEP_KEY], r[key]) for r in records if STEP_KEY in r and key in r]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def binned_series(steps: np.ndarray, values: np.ndarray, bin_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` per window ``((k - 1) * bin_steps, k * bin_steps]``, reported at its right edge
    ``k * bin_steps``; windows without a value are left out. ``bin_steps <= 0`` returns the series as it is."""
    if bin_steps <= 0 or len(steps) == 0:
        return steps, values
    edges = np.ceil(steps / bin_steps).astype(np.int64) * bin_steps
    ends = np.unique(edges)
    return ends.astype(np.float64), np.array([values[edges == end].mean() for end in ends])


# ---------------------------------------------------------------------------------------------------------- runs
def runs_for(env: str, algo: str = "dreamerv2", tags: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
             results_dir: Path | str = LEARNING_DIR) -> list[Run]:
    """The report's usable runs of ``algo`` on ``env`` (one per seed and tag), in tag then seed order."""
    usable, _ = select_runs(r for r in find_runs(results_dir) if r.env == env and r.algo == algo)
    chosen = []
    for (_, _label), runs in sorted(usable.items()):
        for run in runs:
            if (tags is None or run.tag in tags) and (seeds is None or run.seed in seeds):
                chosen.append(run)
    order = {tag: i for i, tag in enumerate(tags or ())}
    return sorted(chosen, key=lambda r: (order.get(r.tag, len(order)), r.tag, r.seed))


def load_series(runs: Sequence[Run], key: str) -> list[tuple[Run, np.ndarray, np.ndarray]]:
    """(run, env steps, values) of ``key`` for every run, each ``train.log`` read once."""
    return [(run, *series(read_train_log(Path(run.path) / "train.log"), key)) for run in runs]


def tag_label(tag: str) -> str:
    return f"[{tag}]" if tag else "packaged entry"


def plot_diagnostic(env: str, key: str, curves: Sequence[tuple[Run, np.ndarray, np.ndarray]], out_path: Path,
                    bin_steps: int = 5_000, references: Sequence[tuple[float, str]] = (), log_y: bool = False) -> Path:
    """One PNG of ``key`` over env steps (``curves`` from :func:`load_series`): a line per run, colour per tag, line
    style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    tags = list(dict.fromkeys(run.tag for run, _, _ in curves))
    styles = ("-", "--", ":", "-.")
    for run, raw_steps, raw_values in curves:
        if len(raw_steps) == 0:
            continue
        steps, values = binned_series(raw_steps, raw_values, bin_steps)
        reached = fmt_approx_steps(raw_steps[-1])
        ax.plot(steps, values, color=f"C{tags.index(run.tag)}", linestyle=styles[run.seed % len(styles)],
                label=f"{tag_label(run.tag)}, seed {run.seed} (to {reached})")
    for level, name in references:
        ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("env steps")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: fmt_approx_steps(x) if x > 0 else "0"))
    per = f" (mean over {fmt_steps(bin_steps)}-step windows)" if bin_steps > 0 else ""
    ax.set_ylabel(key + per, fontsize=9)
    ax.set_title(f"{env}: {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def default_out(env: str, key: str) -> Path:
    return DIAGNOSTICS_DIR / f"{env_slug(env)}-{key.replace('/', '-')}.png"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True, help="env id as the benchmark names it, e.g. MinAtar/Breakout-v1")
    parser.add_argument("--key", default="train/actor_entropy", help="logged key (section/name)")
    parser.add_argument("--algo", default="dreamerv2")
    parser.add_argument("--tags", nargs="+", help='configuration tags to include ("" = untagged); default: all')
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds to include (default: all)")
    parser.add_argument("--bin", default="5k", help="window of env steps to average over (0: every logged value)")
    parser.add_argument("--reference", nargs=2, action="append", default=[], metavar=("VALUE", "LABEL"),
                        help="a horizontal reference line, e.g. 1.0986 'uniform policy (ln 3)'")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.add_argument("--results-dir", type=Path, default=LEARNING_DIR)
    parser.add_argument("--out", type=Path, help="PNG to write (default: results/plots/diagnostics/<env>-<key>.png)")
    parser.add_argument("--print", action="store_true", help="also print the binned values as a markdown table")
    args = parser.parse_args(argv)
    bin_steps = parse_steps(args.bin) if args.bin not in ("0", "") else 0
    runs = runs_for(args.env, args.algo, args.tags, args.seeds, args.results_dir)
    if not runs:
        parser.error(f"no {args.algo} runs of {args.env} with tags {args.tags} under {args.results_dir}")
    curves = load_series(runs, args.key)
    if not any(len(steps) for _, steps, _ in curves):
        parser.error(f"no run logged {args.key!r} (keys look like train/actor_entropy or rollout/ep_rew_mean)")
    references = [(float(value), label) for value, label in args.reference]
    out = plot_diagnostic(args.env, args.key, curves, args.out or default_out(args.env, args.key), bin_steps,
                          references, args.log_y)
    if args.print:
        print(render_table(curves, bin_steps))
    print(f"[diagnostics] wrote {out}", file=sys.stderr)
    return 0


def render_table(curves: Sequence[tuple[Run, np.ndarray, np.ndarray]], bin_steps: int) -> str:
    """The binned values of :func:`load_series` ``curves``, a column per run and a row per window."""
    columns = {f"{tag_label(run.tag)} s{run.seed}": dict(zip(*binned_series(steps, values, bin_steps)))
               for run, steps, values in curves}
    ends = sorted({end for col in columns.values() for end in col})
    out = ["| env steps | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for end in ends:
        cells = [f"{col[end]:.3g}" if end in col else "" for col in columns.values()]
        out.append(f"| {fmt_steps(int(end))} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
