"""Tests of benchmarks/diagnostics.py: SB3's logger tables read back, binned and plotted per run."""

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from stable_baselines3.common.logger import HumanOutputFormat, Logger

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import diagnostics  # noqa: E402
from benchmarks.common import fmt_steps  # noqa: E402


def sb3_log(dumps):
    """The text SB3's human-readable logger prints for ``dumps`` (a list of {key: value} dicts), with a line of
    other output between tables, as in a train.log."""
    stream = io.StringIO()
    logger = Logger(folder=None, output_formats=[HumanOutputFormat(stream)])
    for values in dumps:
        for key, value in values.items():
            logger.record(key, value)
        logger.dump(step=int(values.get("time/total_timesteps", 0)))
        stream.write("Eval num_timesteps=..., episode_reward=1.00 +/- 0.00\n")
    return stream.getvalue()


def test_parse_reads_back_what_the_sb3_logger_printed():
    dumps = [
        {"rollout/ep_rew_mean": 0.25, "time/total_timesteps": 34, "train/actor_entropy": 1.0986},
        {"rollout/ep_rew_mean": 2.5, "time/total_timesteps": 2048, "train/actor_entropy": 0.0843,
         "train/model_loss": 1234.5678, "train/tag": "text is skipped"},
    ]
    records = diagnostics.parse_sb3_tables(sb3_log(dumps).splitlines(keepends=True))
    assert len(records) == 2
    assert records[0] == {"rollout/ep_rew_mean": 0.25, "time/total_timesteps": 34.0, "train/actor_entropy": 1.1}
    # SB3 prints values with 3 significant digits ("%-8.3g")
    assert records[1] == {"rollout/ep_rew_mean": 2.5, "time/total_timesteps": 2048.0, "train/actor_entropy": 0.0843,
                          "train/model_loss": 1.23e3}


def test_a_resumed_run_replaces_what_came_after_its_checkpoint():
    steps = [1000, 2000, 3000, 4000, 5000]
    first = [{"time/total_timesteps": s, "train/actor_entropy": 1.0} for s in steps]
    resumed = [{"time/total_timesteps": s, "train/actor_entropy": 0.5} for s in (3000, 4000, 6000)]  # from 3000 on
    records = diagnostics.parse_sb3_tables(io.StringIO(sb3_log(first) + "Loading checkpoint\n" + sb3_log(resumed)))
    steps_out, values = diagnostics.series(records, "train/actor_entropy")
    assert steps_out.tolist() == [1000, 2000, 3000, 4000, 6000]
    assert values.tolist() == [1.0, 1.0, 0.5, 0.5, 0.5]


def test_series_skips_records_without_the_key():
    records = [{"time/total_timesteps": 10.0}, {"time/total_timesteps": 20.0, "train/x": 3.0}, {"train/x": 4.0}]
    steps, values = diagnostics.series(records, "train/x")
    assert steps.tolist() == [20.0] and values.tolist() == [3.0]
    assert diagnostics.series(records, "train/missing")[0].size == 0


def test_binned_series_averages_each_window_at_its_right_edge():
    steps = np.array([1000, 4000, 5000, 5001, 9000, 21000], dtype=np.float64)
    values = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 7.0])
    ends, means = diagnostics.binned_series(steps, values, 5000)
    assert ends.tolist() == [5000, 10000, 25000]  # (0, 5k], (5k, 10k], (20k, 25k]; the empty windows left out
    assert means.tolist() == [2.0, 15.0, 7.0]
    same = diagnostics.binned_series(steps, values, 0)
    assert same[0] is steps and same[1] is values


def write_run(root, env, seed, tag, dumps, budget=10_000):
    """A job folder with a job.json, an evaluations.npz and the train.log of ``dumps``."""
    name = f"seed{seed}_{fmt_steps(budget)}" + (f"_{tag}" if tag else "")
    job_dir = Path(root) / "dreamerv2" / env.replace("/", "-") / name
    run_dir = job_dir / "dreamerv2" / f"{env.replace('/', '-')}_1"
    run_dir.mkdir(parents=True)
    steps = [d["time/total_timesteps"] for d in dumps]
    np.savez(run_dir / "evaluations.npz", timesteps=np.asarray(steps), results=np.zeros((len(steps), 2)),
             ep_lengths=np.ones((len(steps), 2), dtype=np.int64))
    (job_dir / "job.json").write_text(json.dumps(dict(algo="dreamerv2", env=env, seed=seed, budget=budget,
                                                      status="ok", tag=tag)))
    (job_dir / "train.log").write_text("Using cpu device\n" + sb3_log(dumps))
    return job_dir


@pytest.fixture
def results(tmp_path):
    env = "MinAtar/Breakout-v1"
    for seed, tag, level in ((0, "", 0.01), (1, "", 0.02), (0, "ent1e-2", 0.5)):
        dumps = [{"time/total_timesteps": s, "train/actor_entropy": level * (1 + s / 10_000)}
                 for s in range(1000, 10_001, 1000)]
        write_run(tmp_path / "learning", env, seed, tag, dumps)
    return tmp_path / "learning"


def test_runs_are_chosen_by_tag_and_seed_and_drawn(results, tmp_path, capsys):
    env = "MinAtar/Breakout-v1"
    runs = diagnostics.runs_for(env, tags=["ent1e-2", ""], results_dir=results)
    assert [(r.tag, r.seed) for r in runs] == [("ent1e-2", 0), ("", 0), ("", 1)]  # in the order of --tags
    assert [r.seed for r in diagnostics.runs_for(env, tags=[""], seeds=[1], results_dir=results)] == [1]
    out = tmp_path / "entropy.png"
    argv = ["--env", env, "--key", "train/actor_entropy", "--tags", "", "ent1e-2", "--bin", "5k", "--results-dir",
            str(results), "--out", str(out), "--reference", str(math.log(3)), "uniform", "--log-y", "--print"]
    assert diagnostics.main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| env steps | packaged entry s0 | packaged entry s1 | [ent1e-2] s0 |" in table
    # window (0, 5k]: mean of level * (1.1 ... 1.5) = level * 1.3; (5k, 10k]: level * 1.8
    assert "| 5k | 0.013 | 0.026 | 0.65 |" in table and "| 10k | 0.018 | 0.036 | 0.9 |" in table


def test_errors_name_the_missing_runs_or_key(results, tmp_path):
    with pytest.raises(SystemExit):
        diagnostics.main(["--env", "MinAtar/Freeway-v1", "--results-dir", str(results), "--out", str(tmp_path / "a.png")])
    with pytest.raises(SystemExit):
        diagnostics.main(["--env", "MinAtar/Breakout-v1", "--key", "train/no_such_key", "--results-dir", str(results),
                          "--out", str(tmp_path / "b.png")])
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
