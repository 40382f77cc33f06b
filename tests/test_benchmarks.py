"""Tests of the benchmark harness (benchmarks/): report aggregation, job skipping, a tiny end-to-end run, throughput."""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import diagnostics, learning, peers, random_baseline, report  # noqa: E402
from benchmarks.common import fmt_steps, parse_steps  # noqa: E402

TINY_DREAMER = [
    'policy_kwargs:"dict(deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_layers=1, mlp_units=32)"',
    "learning_starts:100",
    "batch_size:4",
    "sequence_length:8",
]


def write_job(root, algo, env, seed, budget, steps, values, status="ok", tag="", spread=5.0, wall=10.0):
    """A job folder as the harness leaves it: job.json (unless status is None) and the zoo's evaluations.npz."""
    name = f"seed{seed}_{fmt_steps(budget)}" + (f"_{tag}" if tag else "")
    job_dir = Path(root) / algo / env.replace("/", "-") / name
    run_dir = job_dir / algo / f"{env.replace('/', '-')}_1"
    run_dir.mkdir(parents=True)
    values = np.asarray(values, dtype=np.float64)
    results = np.stack([values - spread, values + spread], axis=1)  # 2 episodes per evaluation, mean = value
    np.savez(run_dir / "evaluations.npz", timesteps=np.asarray(steps), results=results,
             ep_lengths=np.ones_like(results, dtype=np.int64))
    if status is not None:
        record = dict(algo=algo, env=env, seed=seed, budget=budget, status=status, tag=tag, wall_seconds=wall)
        (job_dir / "job.json").write_text(json.dumps(record))
    return job_dir


STEPS = [10_000, 20_000, 30_000, 40_000, 50_000]


@pytest.fixture
def synthetic(tmp_path):
    root = tmp_path / "learning"
    env = "CartPole-v1"
    write_job(root, "dqn", env, 0, 50_000, STEPS, [100, 300, 480, 500, 500])
    write_job(root, "dqn", env, 1, 50_000, STEPS, [120, 476, 490, 500, 500])
    write_job(root, "dqn", env, 2, 50_000, STEPS, [90, 200, 300, 400, 470])
    write_job(root, "dreamerv2", env, 0, 50_000, STEPS, [20, 50, 100, 200, 300])
    write_job(root, "dreamerv2", env, 1, 50_000, STEPS[:2], [30, 60], status=None)  # still running, no job.json
    write_job(root, "dreamerv2", env, 2, 50_000, STEPS[:1], [10], status="failed")
    return root


def test_steps_format_roundtrip():
    for steps, text in [(300, "300"), (2500, "2.5k"), (50_000, "50k"), (1_250_000, "1.25M"), (2501, "2501")]:
        assert fmt_steps(steps) == text
        assert parse_steps(text) == steps
    assert parse_steps("1e5") == 100_000


def test_find_runs_parses_job_folders(synthetic):
    runs = report.find_runs(synthetic)
    assert len(runs) == 6
    status = {(r.algo, r.seed): r.status for r in runs}
    assert status[("dreamerv2", 1)] == "running" and status[("dreamerv2", 2)] == "failed"
    run = next(r for r in runs if r.algo == "dqn" and r.seed == 0)
    assert run.budget == 50_000 and run.env == "CartPole-v1"
    np.testing.assert_allclose(run.returns, [100, 300, 480, 500, 500])  # mean over the evaluation's episodes


def test_value_at_uses_last_evaluation_at_or_before_budget():
    run = report.Run("dqn", "CartPole-v1", 0, 50_000, np.array([5_000, 10_000, 15_000]), np.array([1.0, 2.0, 3.0]),
                     status="running")
    assert report.value_at(run, 12_000) == 2.0  # last evaluation <= budget, no interpolation
    assert report.value_at(run, 15_000) == 3.0
    assert report.value_at(run, 4_000) is None  # no evaluation yet
    assert report.value_at(run, 20_000) is None  # the (running) run has not reached the budget
    run.status = "ok"  # a finished run with a budget >= 20k covers 20k with its last evaluation
    assert report.value_at(run, 20_000) == 3.0
    assert report.value_at(run, 60_000) is None
    assert report.steps_to_threshold(run, 2.0) == 10_000
    assert report.steps_to_threshold(run, 4.0) is None


def test_aggregate_known_table(synthetic):
    runs = report.find_runs(synthetic)
    rows = report.aggregate(runs, budgets={"CartPole-v1": [10_000, 25_000, 50_000, 100_000]})
    by_algo = {row.algo: row for row in rows}
    assert [row.label for row in rows] == ["dqn", "dreamerv2"]
    dqn, dreamer = by_algo["dqn"], by_algo["dreamerv2"]
    assert list(dqn.cells) == [10_000, 25_000, 50_000]  # 100k: no data anywhere -> no column

    def check(cell, values):
        assert cell.n == len(values)
        assert cell.mean == pytest.approx(np.mean(values))
        assert cell.std == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0.0)

    check(dqn.cells[10_000], [100, 120, 90])
    check(dqn.cells[25_000], [300, 476, 200])  # the 20k evaluation
    check(dqn.cells[50_000], [500, 500, 470])
    assert dqn.threshold == 475.0  # the cartpole suite's threshold
    assert dqn.threshold_reached == 2 and dqn.n_seeds == 3
    check(dqn.threshold_steps, [30_000, 20_000])
    assert dqn.wall_seconds_mean == pytest.approx(10.0)
    check(dqn.last, [500, 500, 470])  # every DQN seed ended at 50k

    assert dreamer.n_seeds == 2 and dreamer.n_failed == 1  # the failed run is listed, never averaged
    check(dreamer.cells[10_000], [20, 30])
    check(dreamer.cells[25_000], [50])  # the running seed stopped at 20k: it does not count at 25k
    check(dreamer.cells[50_000], [300])
    assert dreamer.threshold_steps is None and (dreamer.min_steps, dreamer.max_steps) == (20_000, 50_000)

    table = report.render_env_table(rows)
    assert "| algorithm | return @ 10k | return @ 25k | return @ 50k | steps to ≥ 475.0 | seeds |" in table
    assert f"| DQN | 103.3 ± {np.std([100, 120, 90], ddof=1):.1f} |" in table
    assert "| 490.0 ± 17.3 | 25k ± 7.1k (2/3 seeds) | 3 | 50k | 490.0 ± 17.3 |" in table
    dreamer_row = ("| DreamerV2 | 25.0 ± 7.1 | 50.0 ± 0.0 (n=1) | 300.0 ± 0.0 (n=1) | not reached (0/2 seeds) "
                   "| 2 (1 running) (+1 failed) | 20k-50k |")
    assert dreamer_row in table


def test_env_table_gives_ranges_where_seeds_differ(tmp_path):
    """Seeds that stopped at different steps, or ran for different times, show a range, not a misleading mean."""
    root = tmp_path / "learning"
    write_job(root, "dqn", "CartPole-v1", 0, 50_000, STEPS, [1, 2, 3, 4, 5], wall=600.0)
    write_job(root, "dqn", "CartPole-v1", 1, 20_000, STEPS[:2], [1, 2], wall=7200.0)
    write_job(root, "dqn", "CartPole-v1", 2, 20_000, STEPS[:2], [1, 2], wall=610.0)
    (row,) = report.aggregate(report.find_runs(root), budgets={"CartPole-v1": [20_000]})
    assert (row.min_steps, row.max_steps) == (20_000, 50_000)
    assert row.wall_seconds_range == (600.0, 7200.0)
    assert "| 3 | 20k-50k | 3.0 ± 1.7 | 10 min-2.0 h |" in report.render_env_table([row])
    row.min_steps, row.wall_seconds_mean, row.wall_seconds_range = 50_000, 605.0, (600.0, 610.0)  # no range to show
    assert "| 3 | 50k | 3.0 ± 1.7 | 10 min |" in report.render_env_table([row])


def test_head_to_head_known_verdicts(synthetic, tmp_path):
    runs = report.find_runs(synthetic)
    rows = report.aggregate(runs, budgets={"CartPole-v1": [10_000, 50_000]})
    usable, _ = report.select_runs(runs)
    at_10k, at_50k, threshold = report.head_to_head(rows, usable)
    assert (at_10k.measure, at_10k.dreamer, at_10k.ahead) == ("return @ 10k", "25.0 ± 7.1", "DQN")
    assert at_10k.dqn == f"103.3 ± {np.std([100, 120, 90], ddof=1):.1f}"
    assert not at_10k.within_spread  # 78.3 apart, stds 7.1 and 15.3
    assert (at_50k.dreamer, at_50k.ahead, at_50k.within_spread) == ("300.0 ± 0.0 (n=1)", "DQN", False)
    # the running DreamerV2 seed stopped at 20k, so both are judged within 20k: DQN seed 1 reached 476 at 20k
    assert threshold.measure == "seeds ≥ 475.0 within 20k"
    assert (threshold.dreamer, threshold.dqn, threshold.ahead) == ("0/2 seeds", "1/3 seeds, first at 20k on average",
                                                                   "DQN")
    text = report.render_head_to_head([at_10k, threshold])
    assert "| CartPole-v1 | return @ 10k | 25.0 ± 7.1 |" in text
    assert [line.rsplit("|", 2)[1].strip() for line in text.splitlines()[2:]] == ["DQN", "DQN"]  # the ahead column
    assert "minatar @" not in text  # no MinAtar game measured

    root = tmp_path / "minatar"
    for seed, (dv2, dqn) in enumerate([(5.0, 4.0), (6.0, 4.4)]):
        write_job(root, "dreamerv2", "MinAtar/Breakout-v1", seed, 100_000, [50_000, 100_000], [3.0, dv2])
        write_job(root, "dqn", "MinAtar/Breakout-v1", seed, 100_000, [50_000, 100_000], [3.0, dqn])
        write_job(root, "dreamerv2", "MinAtar/Seaquest-v1", seed, 100_000, [50_000, 100_000], [1.0, 2.0])
        write_job(root, "dqn", "MinAtar/Seaquest-v1", seed, 100_000, [50_000, 100_000], [1.0, 3.0 + seed])
    runs = report.find_runs(root)
    comparisons = report.head_to_head(report.aggregate(runs), report.select_runs(runs)[0])
    verdicts = {(c.env, c.measure): (c.ahead, c.within_spread) for c in comparisons}
    assert verdicts == {
        ("MinAtar/Breakout-v1", "return @ 50k"): ("tie", False),
        ("MinAtar/Breakout-v1", "return @ 100k"): ("DreamerV2", False),  # 5.5 vs 4.2, stds 0.71 and 0.28
        ("MinAtar/Seaquest-v1", "return @ 50k"): ("tie", False),
        ("MinAtar/Seaquest-v1", "return @ 100k"): ("DQN", False),  # 2.0 vs 3.5: 1.5 apart, stds 0 and 0.71
    }
    text = report.render_head_to_head(comparisons)
    assert "* **minatar @ 100k**: DreamerV2 ahead on 1 of 2 games measured by both (5 in the suite)." in text
    assert "* **minatar @ 50k**: DreamerV2 ahead on 0 of 2 games" in text
    assert "## DreamerV2 vs DQN" in report.render_markdown(report.aggregate(runs), runs)


def random_result(env, mean, std=1.0, episodes=100):
    return {"env": env, "mean": mean, "std": std, "sem": std / 10, "episodes": episodes, "lengths": [60] * episodes,
            "command": "python -m benchmarks.random_baseline --suite minatar"}


def test_head_to_head_shows_the_random_policy_and_who_is_above_it(tmp_path):
    root = tmp_path / "learning"
    for seed in (0, 1):  # Breakout: both above random (0.4); Asterix: DreamerV2 at 0.5 below random (0.6), DQN above
        write_job(root, "dreamerv2", "MinAtar/Breakout-v1", seed, 50_000, [50_000], [4.0])
        write_job(root, "dqn", "MinAtar/Breakout-v1", seed, 50_000, [50_000], [2.0])
        write_job(root, "dreamerv2", "MinAtar/Asterix-v1", seed, 50_000, [50_000], [0.5])
        write_job(root, "dqn", "MinAtar/Asterix-v1", seed, 50_000, [50_000], [1.0])
    runs = report.find_runs(root)
    rows = report.aggregate(runs)
    random = {"MinAtar/Breakout-v1": random_result("MinAtar/Breakout-v1", 0.36, 0.56),
              "MinAtar/Asterix-v1": random_result("MinAtar/Asterix-v1", 0.6)}
    # write_job stores 2 episodes per evaluation: 2 seeds x 2 episodes, so random play's margin is 2 std / sqrt(4) = std
    assert {row.episodes for row in rows} == {2}
    above = report._above_random(rows, random)
    assert above == {("MinAtar/Breakout-v1", 50_000): (True, True),  # 4.0 and 2.0 > 0.36 + 0.56
                     ("MinAtar/Asterix-v1", 50_000): (False, False)}  # 0.5 and 1.0 <= 0.6 + 1.0
    text = report.render_head_to_head(report.head_to_head(rows, report.select_runs(runs)[0]), random, above)
    assert "| env | measure | DreamerV2 | DQN | uniform random | ahead |" in text
    assert "| MinAtar/Breakout-v1 | return @ 50k | 4.0 ± 0.0 | 2.0 ± 0.0 | 0.4 ± 0.6 | DreamerV2 |" in text
    assert ("| MinAtar/Asterix-v1 | return @ 50k | 0.5 ± 0.0 | 1.0 ± 0.0 | 0.6 ± 1.0 | DQN (neither above random "
            "play) |") in text
    assert ("* **minatar @ 50k**: DreamerV2 ahead on 1 of 2 games measured by both (5 in the suite). Above random "
            "play on 1 (DreamerV2) and 1 (DQN) of the 2 with a random baseline.") in text
    no_random = report.render_head_to_head(report.head_to_head(rows, report.select_runs(runs)[0]))
    assert "| 4.0 ± 0.0 | 2.0 ± 0.0 | — | DreamerV2 |" in no_random and "Above the uniform" not in no_random

    random_dir = tmp_path / "random"
    random_dir.mkdir()
    (random_dir / "MinAtar-Asterix-v1.json").write_text(json.dumps(random["MinAtar/Asterix-v1"]))
    assert report.load_random_baselines(random_dir) == {"MinAtar/Asterix-v1": random["MinAtar/Asterix-v1"]}
    markdown = report.make_report(root, tmp_path / "REPORT.md", tmp_path / "plots", random_dir=random_dir)
    asterix = markdown.split("## MinAtar/Asterix-v1")[1].split("## ")[0]
    assert ("Uniform random policy on the same evaluation env: **0.6 ± 1.0** (standard error 0.1) over 100 episodes; "
            "mean length 60 steps (`python -m benchmarks.random_baseline --suite minatar`).") in asterix
    assert "Uniform random" not in markdown.split("## MinAtar/Breakout-v1")[1].split("## ")[0]  # no file for Breakout
    assert (tmp_path / "plots" / "MinAtar-Asterix-v1.png").stat().st_size > 1000


def test_above_random_play_is_two_standard_errors_above_the_random_mean():
    baseline = {"mean": 0.5, "std": 0.86}  # margin for 3 seeds x 10 episodes: 2 * 0.86 / sqrt(30) = 0.314
    assert report.above_random(report.Cell(mean=0.82, std=0.3, n=3), 10, baseline) is True
    assert report.above_random(report.Cell(mean=0.81, std=0.3, n=3), 10, baseline) is False
    assert report.above_random(report.Cell(mean=0.81, std=0.3, n=3), 40, baseline) is True  # margin 0.157
    assert report.above_random(report.Cell(mean=5.0, std=0.0, n=1), 0, baseline) is None  # episodes unknown


def test_random_baseline_plays_the_suite_evaluation_env(tmp_path):
    assert random_baseline.parse_env_kwargs([learning.MINATAR_TIME_LIMIT]) == {"max_episode_steps": 10_000}
    assert random_baseline.parse_env_kwargs([]) == {}
    env = random_baseline.make_eval_env("MinAtar/Breakout-v1", {"max_episode_steps": 10_000}, seed=0)
    assert type(env.envs[0]).__name__ == "Monitor" and env.envs[0].env._max_episode_steps == 10_000
    env.close()
    assert random_baseline.env_wrapper("CartPole-v1") is None
    (atari_wrapper,) = random_baseline.env_wrapper("ALE/Pong-v5")  # the yml's `atari` entry, as the zoo picks it
    assert "sb3_dreamer.envs.DreamerAtariWrapper" in atari_wrapper

    args = ["--suite", "minatar", "--envs", "MinAtar/Breakout-v1", "--episodes", "4", "--seed", "3"]
    random_baseline.main([*args, "--out-dir", str(tmp_path / "a")])
    random_baseline.main([*args, "--out-dir", str(tmp_path / "b")])
    first, second = (json.loads((tmp_path / d / "MinAtar-Breakout-v1.json").read_text()) for d in ("a", "b"))
    assert first["returns"] == second["returns"] and first["lengths"] == second["lengths"]  # seeded
    returns = np.array(first["returns"])
    assert len(returns) == first["episodes"] == 4 and first["env_kwargs"] == {"max_episode_steps": 10_000}
    assert first["mean"] == pytest.approx(returns.mean()) and first["std"] == pytest.approx(returns.std(ddof=1))
    assert first["sem"] == pytest.approx(returns.std(ddof=1) / 2) and min(first["lengths"]) >= 1
    with pytest.raises(SystemExit):
        random_baseline.main(["--suite", "minatar", "--episodes", "0"])


def test_uniform_random_agent_samples_one_seeded_action_per_env():
    from gymnasium import spaces

    def actions(seed):
        agent = random_baseline.UniformRandomAgent(spaces.Discrete(3), seed)
        return [agent.predict(np.zeros((5, 2)))[0] for _ in range(20)]

    batches = actions(0)
    assert all(batch.shape == (5,) and set(batch.tolist()) <= {0, 1, 2} for batch in batches)
    assert set(np.concatenate(batches).tolist()) == {0, 1, 2}  # 100 draws cover the 3 actions
    assert all((a == b).all() for a, b in zip(batches, actions(0)))
    agent = random_baseline.UniformRandomAgent(spaces.Box(-1, 1, (2,)), 0)
    assert agent.predict({"image": np.zeros((3, 4)), "vector": np.zeros((3, 1))})[0].shape == (3, 2)


def test_aggregate_missing_data_and_unknown_env(tmp_path):
    root = tmp_path / "learning"
    assert report.aggregate(report.find_runs(root)) == []  # nothing yet
    assert "No results yet" in report.render_markdown([], [])
    write_job(root, "dqn", "Acrobot-v1", 0, 8_000, [2_000, 4_000, 6_000, 8_000], [-500, -400, -200, -100])
    write_job(root, "dqn", "Acrobot-v1", 1, 8_000, [], [])  # finished without evaluations
    (row,) = report.aggregate(report.find_runs(root))
    assert row.threshold is None and list(row.cells) == [2_000, 4_000, 8_000]  # no suite: 1/4, 1/2, all of the data
    assert row.cells[4_000].mean == -400 and row.cells[4_000].n == 1
    assert "n/a" not in report.render_env_table([row])  # no threshold column at all


def test_suite_grid_known_table(tmp_path):
    root = tmp_path / "learning"
    steps = [50_000, 100_000]
    for seed in range(3):
        write_job(root, "dqn", "MinAtar/Breakout-v1", seed, 100_000, steps, [2.0 + seed, 4.0])
        write_job(root, "dqn", "MinAtar/Seaquest-v1", seed, 100_000, steps, [1.0, 2.0])
    for seed in range(2):  # two DreamerV2 seeds at 100k, a third one only to 50k
        write_job(root, "dreamerv2", "MinAtar/Breakout-v1", seed, 100_000, steps, [3.0, 5.0 + seed])
    write_job(root, "dreamerv2", "MinAtar/Breakout-v1", 2, 100_000, steps[:1], [6.0], status="stopped")
    write_job(root, "dreamerv2", "MinAtar/Seaquest-v1", 0, 100_000, steps, [1.0, 1.5])
    write_job(root, "dreamerv2", "MinAtar/Seaquest-v1", 0, 100_000, steps, [9.0, 9.0], tag="other")  # tagged: left out
    rows = report.aggregate(report.find_runs(root))
    assert report.render_suite_grid(rows, "minatar") == "\n".join([
        "| game | DreamerV2 @ 50k | DQN @ 50k | DreamerV2 @ 100k | DQN @ 100k |",
        "|---|---|---|---|---|",
        "| Breakout | **4.0 ± 1.7** | 3.0 ± 1.0 | **5.5 ± 0.7 (2 seeds)** | 4.0 ± 0.0 |",
        "| Seaquest | 1.0 (1 seed) | 1.0 ± 0.0 | 1.5 (1 seed) | **2.0 ± 0.0** |",  # equal means: no bold
        "| DreamerV2 ahead on | 1 of 2 |  | 1 of 2 |  |",
    ])
    assert report.render_suite_grid(rows, "cartpole") == ""  # no CartPole runs
    assert "## minatar at a glance" in report.render_markdown(rows, report.find_runs(root))


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_docs_show_the_minatar_grid_of_the_committed_results(doc):
    """The MinAtar table in the docs is the one the report generates from benchmarks/results/learning/ (no drift)."""
    rows = report.aggregate(report.find_runs(report.LEARNING_DIR))
    grid = report.render_suite_grid(rows, "minatar")
    assert grid and grid in (ROOT / doc).read_text(), (
        f"{doc}'s MinAtar table differs from the committed results; paste this one:\n" + grid)


def test_report_markdown_anchors_and_plots(synthetic, tmp_path):
    out = tmp_path / "REPORT.md"
    text = report.make_report(synthetic, out, tmp_path / "plots")
    assert out.read_text() == text
    assert (tmp_path / "plots" / "CartPole-v1.png").stat().st_size > 1000
    assert "![CartPole-v1 learning curves](plots/CartPole-v1.png)" in text
    # the zoo DQN anchor (500 at 50k) next to our DQN at 50k
    assert "| DQN | 50k | 500.0 (500.0 ± 0.0) [T] | 490.0 ± 17.3 |" in text
    assert "Failed runs (not averaged): dreamerv2 seed 2 (failed" in text
    for anchor in report.load_anchors():
        assert isinstance(anchor["comparable"], bool) and anchor["why"], anchor
        assert {"env", "algo", "source", "budget_steps", "value", "metric", "action_set", "sticky"} <= set(anchor)


def test_curve_mean_std_band():
    runs = [
        report.Run("dqn", "e", 0, 30, np.array([10, 20, 30]), np.array([1.0, 2.0, 3.0])),
        report.Run("dqn", "e", 1, 30, np.array([10, 20]), np.array([3.0, 4.0]), status="running"),
    ]
    steps, mean, std, n = report.curve(runs)
    np.testing.assert_array_equal(steps, [10, 20, 30])
    np.testing.assert_allclose(mean, [2.0, 3.0, 3.0])
    np.testing.assert_allclose(std, [np.sqrt(2), np.sqrt(2), 0.0])
    np.testing.assert_array_equal(n, [2, 2, 1])


class _EvalEnvSeen(Exception):
    pass


@pytest.mark.parametrize("algo", ["dreamerv2", "dqn"])
def test_zoo_gives_the_evaluation_env_the_minatar_time_limit_inside_its_monitor(algo, tmp_path, monkeypatch):
    """The env EvalCallback gets from the suite's command line: Monitor above the TimeLimit, so truncations count."""
    import stable_baselines3.common.callbacks as callbacks

    from sb3_dreamer import zoo

    def capture(model, env, **kwargs):
        raise _EvalEnvSeen(env)

    monkeypatch.setattr(callbacks, "evaluate_policy", capture)
    job = learning.build_jobs(learning.SUITES["minatar"], results_dir=tmp_path, seeds=[0], envs=["MinAtar/Seaquest-v1"],
                              algos=[algo])[0]
    args = job.command()[4:]  # after "python -m sb3_dreamer.zoo train"
    args[args.index("-n") + 1], args[args.index("--eval-freq") + 1] = "40", "20"
    no_training = ["learning_starts:1000", "buffer_size:1000"]
    args += no_training if "-params" in args else ["-params", *no_training]  # -params comes last in a job's command
    with pytest.raises(_EvalEnvSeen) as seen:
        zoo.main(["train", *args])
    env = seen.value.args[0].envs[0]
    assert type(env).__name__ == "Monitor"
    assert env.env._max_episode_steps == learning.MINATAR_MAX_EPISODE_STEPS  # the TimeLimit right under the Monitor


def test_minatar_time_limit_ends_evaluations_of_a_policy_that_survives():
    """Seaquest's sub never dies at the surface: the evaluation must still end, at the limit, seen by the Monitor."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    key = learning.MINATAR_TIME_LIMIT.split(":")[0]
    spec = gym.spec("MinAtar/Seaquest-v1")  # made as the zoo makes it, with --env-kwargs (a 60-step limit here)
    env = make_vec_env(lambda **kwargs: spec.make(**kwargs), n_envs=1, seed=0, env_kwargs={key: 60})

    class StayUp:  # action 2 of the minimal set moves the sub up: it stays surfaced (what a greedy seed learned)
        def predict(self, obs, state=None, episode_start=None, deterministic=True):
            return np.full(len(obs), 2), None

    rewards, lengths = evaluate_policy(StayUp(), env, n_eval_episodes=2, return_episode_rewards=True)
    assert lengths == [60, 60] and rewards == [0.0, 0.0]


def test_suites_and_commands(tmp_path):
    jobs = learning.build_jobs(learning.SUITES["minatar"], results_dir=tmp_path, seeds=[0], envs=["MinAtar/Breakout-v1"],
                               algo_params={"dreamerv2": ["batch_size:4"]})
    cmd = {job.algo: job.command() for job in jobs}
    assert set(cmd) == {"dreamerv2", "dqn"}
    for algo, args in cmd.items():
        assert args[args.index("--eval-episodes") + 1] == "10" and args[args.index("-n") + 1] == "500000"
        assert args[args.index("--log-folder") + 1] == str(tmp_path / algo / "MinAtar-Breakout-v1" / "seed0_500k")
        assert args[args.index("--env-kwargs") + 1] == learning.MINATAR_TIME_LIMIT  # both algorithms, every env
    assert "exploration_fraction:0.2" in cmd["dqn"]  # 100k exploration steps of 500k
    assert "batch_size:4" in cmd["dreamerv2"] and "batch_size:4" not in cmd["dqn"]
    cartpole = learning.build_jobs(learning.SUITES["cartpole"], results_dir=tmp_path)
    assert len(cartpole) == 6  # 2 algos x 3 seeds
    dqn = next(j for j in cartpole if j.algo == "dqn")
    assert dqn.conf_file.endswith("rl_zoo3/hyperparams/dqn.yml") and Path(dqn.conf_file).is_file()
    pong = {j.algo: j for j in learning.build_jobs(learning.SUITES["atari-pong"], results_dir=tmp_path, seeds=[0])}
    assert any("DreamerAtariWrapper" in p for p in pong["dqn"].params)  # DreamerV2's Atari protocol for DQN too


def test_dry_run_prints_commands(tmp_path, capsys):
    rc = learning.main(["--suite", "cartpole", "--seeds", "0", "--results-dir", str(tmp_path), "--dry-run",
                        "--algo-params", "dreamerv2", "learning_starts:100"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("sb3_dreamer.zoo train") == 2 and "learning_starts:100" in out
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def _fake_python(tmp_path, rc):
    script = tmp_path / f"fake_python_{rc}"
    script.write_text(f"#!/bin/sh\necho fake zoo \"$@\"\nexit {rc}\n")
    script.chmod(0o755)
    return str(script)


def test_run_job_writes_job_json_and_skips_finished(tmp_path, monkeypatch):
    suite = learning.SUITES["cartpole"]
    (ok_job,) = learning.build_jobs(suite, results_dir=tmp_path, algos=["dqn"], seeds=[0], budget=300)
    ok_job = learning.dataclasses.replace(ok_job, python=_fake_python(tmp_path, 0))
    record = learning.run_job(ok_job, echo=False)
    saved = json.loads(ok_job.job_file.read_text())
    assert saved == record and saved["status"] == "ok" and saved["returncode"] == 0
    for key in ("command", "start_time", "end_time", "wall_seconds", "machine"):
        assert key in saved
    assert {"cpu_model", "cpu_cores", "torch", "git_commit"} <= set(saved["machine"])
    assert "fake zoo -m sb3_dreamer.zoo train --algo dqn" in (ok_job.dir / "train.log").read_text()
    assert "warning" in saved  # no evaluations.npz from the fake zoo
    assert not list(ok_job.dir.glob(".job.json.*"))  # atomic write leaves no temporary file

    (failed_job,) = learning.build_jobs(suite, results_dir=tmp_path, algos=["dqn"], seeds=[1], budget=300)
    failed_job = learning.dataclasses.replace(failed_job, python=_fake_python(tmp_path, 3))
    assert learning.run_job(failed_job, echo=False)["status"] == "failed"

    calls = []
    monkeypatch.setattr(learning, "run_job", lambda job, timeout=None, force=False: calls.append(job) or {"status": "ok"})
    outcome = learning.run_jobs([ok_job, failed_job])
    assert outcome["skipped"] == [ok_job]  # finished: skipped
    assert calls == [failed_job] and outcome["ok"] == [failed_job]  # failed: run again
    calls.clear()
    learning.run_jobs([ok_job], force=True)
    assert calls == [ok_job]


def test_ctrl_c_with_parallel_jobs_leaves_them_interrupted_not_finished(tmp_path, monkeypatch):
    """A zoo run stopped by Ctrl-C saves its model and exits 0 (rl-zoo3 catches the interruption). With --parallel the
    harness's worker threads never see the KeyboardInterrupt, so without help they would record such jobs as "ok"
    (finished, skipped forever). The main thread must stop the zoo processes and the jobs must end "interrupted"."""
    fake = tmp_path / "fake_zoo"  # behaves like the zoo on SIGINT: exit 0
    fake.write_text('#!/bin/sh\nsleep 30 &\npid=$!\ntrap \'kill $pid; echo interrupted; exit 0\' INT\n'
                    'touch "$FAKE_ZOO_DIR/started.$$"\nwait $pid\necho finished\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_ZOO_DIR", str(tmp_path))
    jobs = [learning.dataclasses.replace(job, python=str(fake)) for job in learning.build_jobs(
        learning.SUITES["cartpole"], results_dir=tmp_path / "results", algos=["dqn"], seeds=[0, 1, 2], budget=300)]

    def interrupt_once_both_started():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if len(list(tmp_path.glob("started.*"))) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # the harness's main thread gets the KeyboardInterrupt
                return
            time.sleep(0.05)

    threading.Thread(target=interrupt_once_both_started, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        learning.run_jobs(jobs, parallel=2)
    assert time.monotonic() - t0 < 20  # the zoo processes were stopped, not waited out
    statuses = [learning.read_job(job.dir)["status"] if learning.read_job(job.dir) else None for job in jobs]
    assert statuses == ["interrupted", "interrupted", None]  # the third job never started
    for job in jobs[:2]:
        log = (job.dir / "train.log").read_text()
        assert "interrupted" in log and "finished" not in log
    # the next call runs them again (they are not "ok"); the flag of the interrupted call does not carry over
    monkeypatch.setattr(learning, "run_job", lambda job, timeout=None, force=False: {"status": "ok"})
    assert learning.run_jobs(jobs, parallel=2)["ok"] == jobs


def test_a_job_whose_time_is_up_is_asked_to_checkpoint_and_stop(tmp_path, monkeypatch):
    """At its timeout a job with checkpoints gets the zoo's pause signal (checkpoint this step, exit 0) and ends
    "paused"; one without checkpoints has nothing to save and is killed."""
    fake = tmp_path / "fake_zoo"  # stands in for the zoo's pause handler: note the signal, exit 0
    fake.write_text('#!/bin/sh\nsleep 30 &\npid=$!\ntrap \'kill $pid; echo paused on USR1; exit 0\' USR1\n'
                    'echo started\nwait $pid\necho finished\n')
    fake.chmod(0o755)
    suite = learning.SUITES["cartpole"]
    with_checkpoints, without = (
        learning.dataclasses.replace(job, python=str(fake), checkpoint_freq=freq)
        for job, freq in zip(learning.build_jobs(suite, results_dir=tmp_path, algos=["dqn"], seeds=[0, 1]), (100, 0)))
    calls = []

    def resume_point(job):  # none when the job starts, the checkpoint of the pause once it has stopped
        calls.append(job)
        return None if len(calls) == 1 else SimpleNamespace(steps=123)

    monkeypatch.setattr(learning, "resume_point", resume_point)
    t0 = time.monotonic()
    record = learning.run_job(with_checkpoints, timeout=2.0, echo=False)
    assert time.monotonic() - t0 < 20  # it exited on the signal, well within the grace period
    assert record["status"] == "paused" and record["segments"][-1]["stopped_by"] == "timeout"
    log = (with_checkpoints.dir / "train.log").read_text()
    assert "paused on USR1" in log and "finished" not in log
    monkeypatch.setattr(learning, "resume_point", lambda job: None)
    assert learning.run_job(without, timeout=2.0, echo=False)["status"] == "timeout"  # killed: no checkpoint to pause to
    assert "USR1" not in (without.dir / "train.log").read_text()


def test_a_zoo_run_that_exits_0_short_of_its_budget_is_paused_not_finished(tmp_path, monkeypatch):
    """``kill -USR1`` on a job's zoo run (or a Ctrl-C that only the zoo got) ends it with exit 0 before its budget; its
    newest checkpoint says how far it got. A finished run's last checkpoint is at its budget."""
    suite = learning.SUITES["cartpole"]
    jobs = [learning.dataclasses.replace(job, python=_fake_python(tmp_path, 0), checkpoint_freq=freq)
            for job, freq in zip(learning.build_jobs(suite, results_dir=tmp_path, algos=["dqn"], seeds=[0, 1, 2],
                                                     budget=300), (100, 100, 0))]  # fmt: skip
    last_checkpoint = {0: 123, 1: 300, 2: None}  # where each fake zoo run leaves its newest checkpoint
    started = set()

    def resume_point(job):  # none when the job starts (a fresh run), then the checkpoint its zoo run left
        if job.seed not in started:
            started.add(job.seed)
            return None
        steps = last_checkpoint[job.seed]
        return None if steps is None else SimpleNamespace(steps=steps)

    monkeypatch.setattr(learning, "resume_point", resume_point)
    short, finished, no_checkpoints = (learning.run_job(job, echo=False) for job in jobs)
    assert short["status"] == "paused" and short["segments"][-1]["stopped_by"] == "request"
    assert finished["status"] == "ok" and no_checkpoints["status"] == "ok"
    assert learning.stopped_short(jobs[0]) and not learning.stopped_short(jobs[1])


def test_a_paused_job_without_its_checkpoints_is_kept_not_started_over(tmp_path, monkeypatch, capsys):
    """Paused results copied or committed without their checkpoints (a fresh clone) cannot be continued; starting them
    over would delete hours of evaluations, so the harness leaves them alone unless told to with --force."""
    (job,) = learning.build_jobs(learning.SUITES["cartpole"], results_dir=tmp_path, algos=["dqn"], seeds=[0], budget=300)
    job = learning.dataclasses.replace(job, python=_fake_python(tmp_path, 0))
    job.run_folder.mkdir(parents=True)
    evaluations = job.run_folder / "evaluations.npz"
    evaluations.write_bytes(b"evaluations so far")
    learning.atomic_write_json(job.job_file, {"algo": "dqn", "status": "paused", "segments": []})
    monkeypatch.setattr(learning, "resume_point", lambda job: None)  # no checkpoints here

    outcome = learning.run_jobs([job])
    assert outcome["stranded"] == [job] and not outcome["ok"]
    assert evaluations.read_bytes() == b"evaluations so far" and learning.read_job(job.dir)["status"] == "paused"
    assert "checkpoints are not in" in capsys.readouterr().out

    monkeypatch.setattr(learning, "resume_point", lambda job: SimpleNamespace(steps=123))  # checkpoints put back
    assert learning.run_jobs([job], dry_run=True)["planned"] == [job]
    assert "--resume" in capsys.readouterr().out
    monkeypatch.setattr(learning, "resume_point", lambda job: None)
    assert learning.run_jobs([job], force=True)["ok"] == [job]  # --force starts it over
    assert not evaluations.exists() and learning.read_job(job.dir)["status"] == "ok"


def test_a_job_whose_harness_was_killed_is_kept_when_only_its_checkpoints_could_continue_it(tmp_path, monkeypatch):
    """job.json still says "running" (the harness was killed) and its process is gone: with evaluations written and
    checkpoints expected but missing, it is stranded like a paused job; without either it can only start over."""
    (job,) = learning.build_jobs(learning.SUITES["cartpole"], results_dir=tmp_path, algos=["dqn"], seeds=[0], budget=300)
    job = learning.dataclasses.replace(job, python=_fake_python(tmp_path, 0), checkpoint_freq=100)
    evaluations = job.run_folder / "CartPole-v1_1" / "evaluations.npz"
    evaluations.parent.mkdir(parents=True)
    evaluations.write_bytes(b"evaluations so far")
    dead = {"algo": "dqn", "status": "running", "pid": 2**22 + 1, "host": "another-host", "segments": []}
    learning.atomic_write_json(job.job_file, dead)
    monkeypatch.setattr(learning, "resume_point", lambda job: None)  # no checkpoints here

    assert learning.stopped_part_way(job, dead) == "stopped while running (its harness was killed)"
    outcome = learning.run_jobs([job])
    assert outcome["stranded"] == [job] and not outcome["ok"]
    assert evaluations.read_bytes() == b"evaluations so far" and learning.read_job(job.dir)["status"] == "running"

    no_checkpoints = learning.dataclasses.replace(job, checkpoint_freq=0)
    assert learning.stopped_part_way(no_checkpoints, dead) is None
    evaluations.unlink()
    assert learning.stopped_part_way(job, dead) is None  # killed before its first evaluation
    assert learning.run_jobs([job])["ok"] == [job]
    assert learning.read_job(job.dir)["status"] == "ok"


def test_retag_moves_a_job_and_keeps_its_history(tmp_path, monkeypatch):
    """When a packaged entry changes, its old untagged runs get a tag and the runs of the new settings lose theirs."""
    def jobs(tag):
        return learning.build_jobs(learning.SUITES["minatar"], results_dir=tmp_path, algos=["dreamerv2"],
                                   envs=["MinAtar/Breakout-v1"], seeds=[0], budget=250_000, tag=tag)

    (old,), (new,) = jobs(""), jobs("ent1e-2")
    for job in (old, new):
        job.run_folder.mkdir(parents=True)
        ran_in = f"/elsewhere/dreamerv2/MinAtar-Breakout-v1/{job.dir.name}"  # copied from another results folder
        learning.atomic_write_json(job.job_file, {"status": "ok", "tag": job.tag, "command": shlex.join(job.command()),
                                                  "command_portable": f"python -m x --log-folder {ran_in} -n 5",
                                                  "segments": [{"command": shlex.join(job.command())}]})
    learning.atomic_write_json(old.job_file, {**learning.read_job(old.dir), "retagged": "from 'seed0_250k_rr64'"})
    with pytest.raises(FileExistsError, match="retag that job first"):
        learning.retag_job(new, "", why="entry changed")
    assert learning.main(["--suite", "minatar", "--algos", "dreamerv2", "--envs", "MinAtar/Breakout-v1", "--seeds",
                          "0", "--budget", "250000", "--results-dir", str(tmp_path), "--retag", "ent1e-3", "--why",
                          "the entry now sets actor_entropy_coef 0.01"]) == 0  # fmt: skip
    promoted = learning.retag_job(new, "", why="its settings are the entry's now")

    assert promoted.dir == old.dir and not new.dir.exists() and (old.dir / "dreamerv2").is_dir()
    record = learning.read_job(promoted.dir)
    assert record["tag"] == "" and record["command"] == shlex.join(old.command())
    assert record["command_portable"] == "python -m x --log-folder /elsewhere/dreamerv2/MinAtar-Breakout-v1/seed0_250k -n 5"
    assert record["segments"] == [{"command": shlex.join(new.command())}]  # what ran, as it ran
    assert [(r["from"], r["to"], r["why"]) for r in record["retagged"]] == [
        ("seed0_250k_ent1e-2", "seed0_250k", "its settings are the entry's now")]
    demoted = learning.read_job(jobs("ent1e-3")[0].dir)
    assert demoted["tag"] == "ent1e-3" and "seed0_250k_ent1e-3" in demoted["command"]
    assert demoted["retagged"][0] == "from 'seed0_250k_rr64'"  # an earlier note written by hand, kept
    assert demoted["retagged"][1]["why"] == "the entry now sets actor_entropy_coef 0.01"

    with pytest.raises(SystemExit, match="--why"):
        learning.main(["--suite", "minatar", "--results-dir", str(tmp_path), "--retag", "x"])
    monkeypatch.setattr(learning, "is_alive", lambda record: True)
    with pytest.raises(RuntimeError, match="is running"):
        learning.retag_job(promoted, "x", why="no")


@pytest.mark.skipif(not learning.zoo_available(), reason="sb3_dreamer.zoo (the zoo launcher) is not available yet")
def test_end_to_end_tiny_harness_and_report(tmp_path):
    results = tmp_path / "learning"
    argv = ["--suite", "cartpole", "--seeds", "0", "--budget", "300", "--eval-freq", "100", "--eval-episodes", "2",
            "--device", "cpu", "--threads", "1", "--parallel", "2", "--results-dir", str(results),
            "--algo-params", "dreamerv2", *TINY_DREAMER]
    assert learning.main(argv) == 0
    for algo in ("dreamerv2", "dqn"):
        record = learning.read_job(results / algo / "CartPole-v1" / "seed0_300")
        assert record["status"] == "ok", (results / algo / "CartPole-v1" / "seed0_300" / "train.log").read_text()[-3000:]
        assert list((results / algo / "CartPole-v1" / "seed0_300" / algo).glob("CartPole-v1_1/evaluations.npz"))
    text = report.make_report(results, tmp_path / "REPORT.md", tmp_path / "plots", budgets={"CartPole-v1": [100, 300]})
    table = text.split("## CartPole-v1")[1].split("\n\n")[1]
    assert "| algorithm | return @ 100 | return @ 300 | steps to ≥ 475.0 |" in table
    assert "\n| DQN | " in table and "\n| DreamerV2 | " in table
    assert (tmp_path / "plots" / "CartPole-v1.png").exists()
    # the training diagnostics read the values DreamerV2 logged from the harness's train.log (2 actions: <= ln 2)
    log = diagnostics.read_train_log(results / "dreamerv2" / "CartPole-v1" / "seed0_300" / "train.log")
    steps, entropy = diagnostics.series(log, "train/actor_entropy")
    assert len(steps) and np.all(np.diff(steps) > 0) and steps[-1] <= 300
    assert np.all((entropy > 0) & (entropy <= 0.6935))
    # rerun: both jobs are finished and skipped
    outcome = learning.run_jobs(learning.build_jobs(learning.SUITES["cartpole"], results_dir=results, seeds=[0],
                                                    budget=300, eval_freq=100, eval_episodes=2))
    assert len(outcome["skipped"]) == 2 and not outcome["ok"]


def test_throughput_quick_writes_valid_json(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--quick", "--devices", "cpu", "--threads", "1",
           "--out-dir", str(tmp_path), "--machine", "test", "--in-process"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "test-cpu.json").read_text())
    (case,) = data["cases"]
    assert case["case"] == "tiny-vector" and "error" not in case
    assert case["grad_step"]["total_s"]["median"] > 0 and case["grad_step"]["world_model_update_s"]["median"] > 0
    assert case["grad_step"]["behaviour_update_s"]["median"] > 0
    assert case["flops"]["total_gflop"] > 0 and data["matmul_peak"]["gflops"] > 0
    assert case["flops"]["world_model_update_gflop"] + case["flops"]["behaviour_update_gflop"] <= case["flops"][
        "total_gflop"] * 1.0001
    assert case["replay"]["raw_obs_bytes_per_step"] == 16 and case["replay"]["bytes_per_step"] >= 16
    assert set(case["collection"]) == {"1", "8"} and case["peak_rss_mb"] > 0
    assert "## Gradient steps" in (tmp_path / "test-cpu.md").read_text()
    assert data["precision"] == "fp32" and data["matmul_peak"]["dtype"] == "fp32"


def test_throughput_cases_sample_observations_of_their_spaces():
    from benchmarks import throughput

    rng = np.random.default_rng(0)
    assert {name for names in throughput.PRESETS.values() for name in names} == set(throughput.CASES)
    for case in throughput.CASES.values():
        obs_space, action_space = throughput.make_spaces(case)
        obs = throughput.random_obs(obs_space, 3, rng)
        assert obs.shape == (3, *obs_space.shape) and obs.dtype == obs_space.dtype, case.name
        assert action_space.n == case.n_actions
    minatar = throughput.CASES["minatar"]  # the spaces and sizes the MinAtar learning runs train
    assert throughput.make_spaces(minatar)[0].shape == (10, 10, 4) and minatar.sequence_length == 32


def test_throughput_bf16_opt_in_writes_its_own_files(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--quick", "--devices", "cpu", "--threads", "1", "--no-flops",
           "--out-dir", str(tmp_path), "--machine", "test", "--precision", "bf16"]  # subprocess mode: the flag travels
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "test-cpu-bf16.json").read_text())
    (case,) = data["cases"]
    assert data["precision"] == case["precision"] == "bf16" and data["matmul_peak"]["dtype"] == "bf16"
    assert "Training precision: bf16. bf16 matmul peak" in (tmp_path / "test-cpu-bf16.md").read_text()


def test_peer_results_side_by_side(tmp_path):
    (tmp_path / "dv2_cartpole_small.json").write_text(json.dumps(
        {"grad_step_s_median": 0.9, "grad_step_cpu_s_mean": 1.7, "policy_forward_s_mean": 0.001,
         "policy_phase_env_steps_per_s_excl_train": 650.0, "loadavg_start": ["0.1", "0.1", "0.1"]}))
    (tmp_path / "dv2_cartpole_small.time").write_text("\tMaximum resident set size (kbytes): 1178624\n")
    (tmp_path / "sb3_cartpole.json").write_text(json.dumps({"grad_steps_per_s": 900.0,
                                                            "train_phase_env_steps_per_s": 1500.0}))
    assert peers.find_peer_dir(tmp_path) == tmp_path
    results = peers.load_peer_results(tmp_path)
    assert set(results) == {"dv2_cartpole_small", "sb3_cartpole"}
    assert results["dv2_cartpole_small"]["peak_rss_mb"] == pytest.approx(1151.0)
    ours = {"case": "small-cartpole", "peer": "dv2_cartpole_small", "peak_rss_mb": 800.0,
            "grad_step": {"total_s": {"median": 0.45}, "cpu_s": {"median": 0.8}},
            "collection": {"1": {"policy_step_ms": {"median": 0.7}}}}
    md = peers.render_side_by_side([ours], results, "cpu")
    assert "| small-cartpole | dv2_cartpole_small | 0.45 | 0.9 | 0.50 |" in md
    assert "| sb3_cartpole | 900 | 1500 |" in md
    published = peers.render_side_by_side([ours], {}, "cpu")  # no peer folder: the published numbers
    assert "dv2_cartpole_small (published) | 0.45 | 0.88 |" in published


def test_runs_stopped_by_hand_count_up_to_where_they_got(tmp_path):
    root = tmp_path / "learning"
    write_job(root, "dreamerv2", "CartPole-v1", 0, 50_000, STEPS, [20, 50, 100, 200, 300])
    write_job(root, "dreamerv2", "CartPole-v1", 1, 50_000, STEPS[:2], [480, 60], status="stopped")
    rows = report.aggregate(report.find_runs(root), budgets={"CartPole-v1": [10_000, 50_000]})
    (row,) = rows
    assert row.n_seeds == 2 and row.n_stopped == 1 and row.n_failed == 0
    assert row.cells[10_000].n == 2 and row.cells[50_000].n == 1  # the stopped seed counts only where it got
    assert row.threshold_reached == 1
    assert "| 2 (1 stopped early) |" in report.render_env_table(rows)


def test_paused_runs_count_up_to_where_they_got(tmp_path):
    root = tmp_path / "learning"
    write_job(root, "dqn", "MinAtar/Breakout-v1", 0, 250_000, [25_000, 50_000, 75_000], [1.0, 2.0, 3.0], status="paused")
    write_job(root, "dqn", "MinAtar/Breakout-v1", 1, 250_000, [25_000], [5.0], status="timeout")  # no checkpoint: failed
    (row,) = report.aggregate(report.find_runs(root), budgets={"MinAtar/Breakout-v1": [50_000, 250_000]})
    assert row.n_seeds == 1 and row.n_paused == 1 and row.n_failed == 1
    assert row.cells == {50_000: report.Cell(2.0, 0.0, 1)}  # 250k: no run got there yet, no column
    assert "| 1 (1 paused, to be continued) (+1 failed) |" in report.render_env_table([row])


def test_a_longer_run_replaces_a_shorter_one_only_once_it_got_further(tmp_path):
    root = tmp_path / "learning"
    write_job(root, "dqn", "MinAtar/Breakout-v1", 0, 100_000, [50_000, 100_000], [2.0, 4.0])
    write_job(root, "dqn", "MinAtar/Breakout-v1", 0, 250_000, [25_000, 50_000], [1.0, 3.0], status="paused")
    (row,) = report.aggregate(report.find_runs(root), budgets={"MinAtar/Breakout-v1": [50_000, 100_000]})
    assert row.n_seeds == 1 and row.n_paused == 0 and row.cells[100_000].mean == 4.0  # the finished 100k run
    write_job(root, "dqn", "MinAtar/Breakout-v1", 1, 100_000, [50_000, 100_000], [2.0, 4.0])
    write_job(root, "dqn", "MinAtar/Breakout-v1", 1, 250_000, [50_000, 125_000], [3.0, 6.0], status="paused")
    usable, _ = report.select_runs(report.find_runs(root))
    assert [(r.seed, r.budget) for r in usable[("MinAtar/Breakout-v1", "dqn")]] == [(0, 100_000), (1, 250_000)]


def test_time_budget_stops_the_call_and_defers_the_rest(tmp_path, monkeypatch):
    jobs = learning.build_jobs(learning.SUITES["cartpole"], results_dir=tmp_path, algos=["dqn"], seeds=[0, 1, 2])
    limits = []

    def fake_run_job(job, timeout=None, force=False):
        limits.append(timeout)
        if len(limits) == 2:
            learning.time.sleep(0.3)  # this one outlasts the budget: the harness would stop it at its limit
        return {"status": "paused" if len(limits) == 2 else "ok"}

    monkeypatch.setattr(learning, "run_job", fake_run_job)
    outcome = learning.run_jobs(jobs, timeout=100.0, time_budget=0.25)
    assert outcome["ok"] == jobs[:1] and outcome["paused"] == jobs[1:2] and outcome["deferred"] == jobs[2:]
    assert len(limits) == 2 and all(0 < limit <= 0.25 for limit in limits)  # the budget's rest, below --timeout
    limits.clear()
    learning.run_jobs(jobs[:1], timeout=100.0)
    assert limits == [100.0]


def test_gpu_checks_script_parses_and_names_its_steps():
    script = ROOT / "benchmarks" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # syntax
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "wheels|run" in usage.stderr
    missing_out = subprocess.run(["bash", str(script), "run"], capture_output=True, text=True, env={**os.environ, "OUT": ""})
    assert missing_out.returncode != 0 and "OUT" in missing_out.stderr  # results must go to the folder that comes back
