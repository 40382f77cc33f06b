"""Learning benchmark: DreamerV2 beside SB3 DQN, every job one run of the zoo launcher.

A job is keyed by (algo, env, seed, budget) and runs, as a subprocess,

    python -m sb3_dreamer.zoo train --algo ALGO --env ENV -n BUDGET --seed SEED \\
        --eval-freq EVAL_FREQ --eval-episodes 10 --log-folder <job dir> [--device D] [-params k:v ...]

so both algorithms see the same env ids, the same wrappers as their YAML entries declare, the same seeds and the same
evaluation protocol (the zoo's EvalCallback every ``--eval-freq`` env steps, ``--eval-episodes`` episodes,
deterministic except on Atari, where the zoo evaluates stochastically for every algorithm). Each job writes into

    benchmarks/results/learning/<algo>/<env with / -> ->/seed<k>_<budget>[_<tag>]/

the zoo's log folder (``<algo>/<EnvName>_1/evaluations.npz``, ``config.yml``, the model) plus ``train.log`` and
``job.json`` (command, start/end time, wall seconds, machine, torch version, git commit, status), written atomically
with ``"status": "running"`` when the job starts and rewritten when it ends. Rerunning skips jobs whose ``job.json``
says ``"status": "ok"``, and jobs still running (their process is alive on this host).

Long jobs are resumable: with a checkpoint frequency (the suite's ``checkpoint_freq``, or ``--checkpoint-freq``) the
zoo saves the model and its replay buffer every so many steps (``sb3_dreamer.zoo train --checkpoint-freq``, keeping the
newest). A job stopped before its end (``--timeout``, ``--time-budget``, Ctrl-C, a killed session) is then ``"paused"``
(its evaluations so far count in the report). When its time is up the harness asks the zoo run to checkpoint the step
it is at and stop (SIGUSR1, see ``sb3_dreamer.zoo_resume``), so such a pause loses nothing; a Ctrl-C or a killed
session falls back on the newest periodic checkpoint. The next run of the harness continues it from its newest
checkpoint (``sb3_dreamer.zoo train --resume``: same run folder, same step counters, the evaluations up to the
checkpoint kept);
``job.json`` lists every segment and sums their wall time. A job without a checkpoint, or one run with ``--force``,
starts again from scratch (its partial zoo output is removed first), except a paused job, or one whose harness was
killed after it had written evaluations, whose checkpoints are not there (results committed without them, a fresh
clone): it is skipped with a message, its evaluations kept, unless ``--force`` says to start it over.

Usage::

    python -m benchmarks.learning --suite cartpole                   # 2 algos x 3 seeds, 50k steps
    python -m benchmarks.learning --suite minatar --algos dqn --seeds 0 --envs MinAtar/Breakout-v1
    python -m benchmarks.learning --suite cartpole --dry-run         # print the commands only
    python -m benchmarks.learning --suite cartpole --algos dreamerv2 --budget 5000 --eval-freq 500 \\
        --algo-params dreamerv2 learning_starts:500 --tag quick
    python -m benchmarks.learning --suite minatar --algos dreamerv2 --seeds 0 --budget 250000 --time-budget 3000
        # 50 minutes of the suite now; the same command later carries on from the newest checkpoints
    python -m benchmarks.learning --suite minatar --algos dreamerv2 --envs MinAtar/Breakout-v1 --budget 250000 \\
        --retag old-entry --why "the entry changed in <commit>"   # move untagged runs to a tag (--tag: from a tag)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, RESULTS_DIR, atomic_write_json, env_slug, fmt_steps, loadavg, machine_info

LEARNING_DIR = RESULTS_DIR / "learning"
MINATAR_GAMES = ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")
# MinAtar envs have no time limit: without one a good agent can make an evaluation episode last forever. It goes in
# through the zoo's --env-kwargs (gym.make's max_episode_steps), which reach the evaluation env too, so the TimeLimit
# sits *inside* SB3's Monitor. As an env_wrapper it sat outside: the Monitor never saw a truncated episode end, and
# EvalCallback (which counts the Monitor's episodes) waited forever on a policy that survives, e.g. a Seaquest sub that
# stays surfaced. (-params env_kwargs would not do: the zoo gives YAML/-params env_kwargs to the training env only.)
MINATAR_MAX_EPISODE_STEPS = 10_000
MINATAR_TIME_LIMIT = f"max_episode_steps:{MINATAR_MAX_EPISODE_STEPS}"  # an --env-kwargs item
# DreamerV2's Atari protocol (the `atari` entry of sb3_dreamer/hyperparams/dreamerv2.yml), given to DQN as well.
DREAMER_ATARI_PROTOCOL = (
    "env_wrapper:[{'sb3_dreamer.envs.DreamerAtariWrapper': dict(noop_max=30, frame_skip=4, screen_size=64, "
    "action_repeat_probability=0.25)}]",
    "env_kwargs:dict(frameskip=1, repeat_action_probability=0.0, max_num_frames_per_episode=108_000)",
)


_SAY_LOCK = threading.Lock()
# Ctrl-C with parallel jobs: the main thread gets the KeyboardInterrupt, the worker threads waiting on their zoo
# processes do not, and a zoo run that a Ctrl-C stops saves its model and exits 0 (rl-zoo3 catches the interruption).
# So the main thread records the interruption here and stops the live zoo processes; their jobs end "interrupted"
# (paused when they have a checkpoint), never "ok".
_INTERRUPTED = threading.Event()
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()
STOP_GRACE_SECONDS = 60.0  # how long an interrupted or paused zoo process may take to exit before it is killed
PAUSE_SIGNAL = signal.SIGUSR1  # sb3_dreamer.zoo_resume.PAUSE_SIGNAL: "write a checkpoint of this step and stop"


def say(message: str) -> None:
    """Print one progress line whole: parallel jobs report from worker threads, and ``print`` writes the text and its
    newline separately, so two lines could run together."""
    with _SAY_LOCK:
        sys.stdout.write(f"[learning] {message}\n")
        sys.stdout.flush()


def zoo_dqn_conf_file() -> str:
    """rl-zoo3's own packaged ``dqn.yml`` (its tuned hyperparameters, e.g. CartPole-v1 at 50k steps)."""
    import rl_zoo3

    return str(Path(rl_zoo3.__file__).resolve().parent / "hyperparams" / "dqn.yml")


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named preset: which jobs to run and how the report reads them."""

    name: str
    envs: tuple[str, ...]
    algos: tuple[str, ...]
    seeds: tuple[int, ...]
    budget: int  # env steps (agent steps; Atari: frames = 4 x steps)
    eval_freq: int  # env steps between evaluations
    eval_episodes: int = 10
    report_budgets: tuple[int, ...] = ()
    threshold: float | None = None  # steps-to-threshold in the report (None: not applicable)
    conf_files: tuple[tuple[str, str], ...] = ()  # (algo, conf file) overrides of the launcher's default file
    env_kwargs: tuple[str, ...] = ()  # --env-kwargs "key:value" items for every env, training and evaluation
    algo_params: tuple[tuple[str, str], ...] = ()  # (algo, "key:value") -params for one algorithm
    scaled_params: tuple[tuple[str, str, int], ...] = ()  # (algo, key, steps): key = steps / budget (a fraction)
    checkpoint_freq: int = 0  # env steps between resumable checkpoints (0: none; short jobs just rerun)
    notes: str = ""

    def conf_file(self, algo: str) -> str | None:
        for name, conf in self.conf_files:
            if name == algo:
                return zoo_dqn_conf_file() if conf == "rl_zoo3:dqn.yml" else conf
        return None

    def params(self, algo: str, budget: int) -> list[str]:
        """The -params of ``algo`` at ``budget`` steps (per-algorithm, then budget-scaled fractions)."""
        out = [item for name, item in self.algo_params if name == algo]
        out += [f"{key}:{min(1.0, steps / budget):.6g}" for name, key, steps in self.scaled_params if name == algo]
        return out


SUITES: dict[str, Suite] = {
    "cartpole": Suite(
        name="cartpole",
        envs=("CartPole-v1",),
        algos=("dreamerv2", "dqn"),
        seeds=(0, 1, 2),
        budget=50_000,
        eval_freq=2_500,
        report_budgets=(10_000, 20_000, 25_000, 50_000),
        threshold=475.0,
        conf_files=(("dqn", "rl_zoo3:dqn.yml"),),
        notes="DQN with rl-zoo3's tuned CartPole-v1 hyperparameters (its packaged dqn.yml, 50k steps); DreamerV2 with "
        "sb3_dreamer/hyperparams/dreamerv2.yml. Deterministic evaluation, 10 episodes every 2.5k steps.",
    ),
    "minatar": Suite(
        name="minatar",
        envs=tuple(f"MinAtar/{game}-v1" for game in MINATAR_GAMES),
        algos=("dreamerv2", "dqn"),
        seeds=(0, 1, 2),
        budget=500_000,
        eval_freq=25_000,
        report_budgets=(50_000, 100_000, 250_000, 500_000),
        env_kwargs=(MINATAR_TIME_LIMIT,),
        scaled_params=(("dqn", "exploration_fraction", 100_000),),
        checkpoint_freq=10_000,
        notes="MinAtar -v1 ids (minimal action set), sticky actions 0.1 (the minatar default), no frame skip: steps = "
        "frames. DQN with sb3_dreamer/hyperparams/dqn.yml (Young & Tian's DQN; epsilon 1 -> 0.1 over the first 100k "
        "steps whatever the budget), DreamerV2 with sb3_dreamer/hyperparams/dreamerv2.yml. A TimeLimit of 10k steps "
        "on training and evaluation envs of both algorithms (MinAtar has none; Freeway ends itself at 2500). "
        "Deterministic evaluation, 10 episodes every 25k steps.",
    ),
    "atari-pong": Suite(
        name="atari-pong",
        envs=("ALE/Pong-v5",),
        algos=("dreamerv2", "dqn"),
        seeds=(0, 1, 2),
        budget=250_000,
        eval_freq=25_000,
        report_budgets=(100_000, 250_000, 500_000, 1_000_000),
        algo_params=tuple(("dqn", item) for item in DREAMER_ATARI_PROTOCOL),
        checkpoint_freq=25_000,
        notes="ALE/Pong-v5 with DreamerV2's Atari protocol for both algorithms (sb3_dreamer.envs.DreamerAtariWrapper: "
        "sticky actions 0.25, action repeat 4 with max-pool, up to 30 no-ops, 64x64 gray, no life-loss termination, "
        "no reward clipping, 108k-frame episodes; minimal action set). Each agent step is 4 frames: budget 250k steps "
        "= 1M frames (100k steps = Atari100k's 400k frames). DreamerV2 with the `atari` entry of "
        "sb3_dreamer/hyperparams/dreamerv2.yml; DQN with rl-zoo3's `atari` hyperparameters (frame stack 4 kept; "
        "learning_starts 100k; its exploration_fraction 0.1 applies to -n, so epsilon reaches 0.01 at 25k steps of "
        "a 250k run) but the wrapper above instead of AtariWrapper. The zoo evaluates Atari envs stochastically for "
        "both algorithms (DQN: epsilon-greedy at the current epsilon, 0.01 after 25k steps; DreamerV2: its sampled "
        "actor), 10 full games every 25k steps.",
    ),
}


@dataclasses.dataclass(frozen=True)
class Job:
    algo: str
    env: str
    seed: int
    budget: int
    eval_freq: int
    eval_episodes: int
    results_dir: Path
    params: tuple[str, ...] = ()
    env_kwargs: tuple[str, ...] = ()
    conf_file: str | None = None
    device: str | None = None
    threads: int | None = None
    tag: str = ""
    checkpoint_freq: int = 0
    python: str = sys.executable

    @property
    def key(self) -> str:
        return f"{self.algo}/{self.env}/seed{self.seed}/{fmt_steps(self.budget)}"

    @property
    def dir(self) -> Path:
        name = f"seed{self.seed}_{fmt_steps(self.budget)}" + (f"_{self.tag}" if self.tag else "")
        return self.results_dir / self.algo / env_slug(self.env) / name

    @property
    def job_file(self) -> Path:
        return self.dir / "job.json"

    @property
    def run_folder(self) -> Path:
        """The zoo's ``<algo>`` folder inside the job folder (holding ``<EnvName>_<k>`` run folders)."""
        return self.dir / self.algo

    def has_evaluations(self) -> bool:
        """Whether the zoo run has written its ``evaluations.npz``."""
        return any(self.run_folder.glob("*/evaluations.npz"))

    def command(self, resume: bool = False) -> list[str]:
        cmd = [
            self.python, "-m", "sb3_dreamer.zoo", "train",
            "--algo", self.algo,
            "--env", self.env,
            "-n", str(self.budget),
            "--seed", str(self.seed),
            "--eval-freq", str(self.eval_freq),
            "--eval-episodes", str(self.eval_episodes),
            "--log-folder", str(self.dir),
        ]  # fmt: skip
        if self.device:
            cmd += ["--device", self.device]
        if self.threads:
            cmd += ["--num-threads", str(self.threads)]
        if self.conf_file:
            cmd += ["--conf-file", self.conf_file]
        if self.env_kwargs:
            cmd += ["--env-kwargs", *self.env_kwargs]
        if self.checkpoint_freq:
            cmd += ["--checkpoint-freq", str(self.checkpoint_freq)]
        if resume:
            cmd += ["--resume"]
        if self.params:
            cmd += ["-params", *self.params]
        return cmd


def portable_command(cmd: Sequence[str]) -> str:
    """``cmd`` with ``python`` for the interpreter and paths relative to the repository root (for the README)."""
    out = ["python" if i == 0 else arg for i, arg in enumerate(cmd)]
    root = str(REPO_ROOT) + "/"
    return shlex.join(arg[len(root):] if arg.startswith(root) and "site-packages" not in arg else arg for arg in out)


def zoo_available() -> bool:
    """Whether the zoo launcher ``sb3_dreamer.zoo`` can be imported."""
    import importlib.util

    try:
        return importlib.util.find_spec("sb3_dreamer.zoo") is not None
    except (ImportError, ValueError):
        return False


def read_job(job_dir: Path) -> dict[str, Any] | None:
    """The job.json of a job folder, or None when absent or unreadable."""
    try:
        return json.loads((Path(job_dir) / "job.json").read_text())
    except (OSError, ValueError):
        return None


def build_jobs(
    suite: Suite,
    results_dir: Path = LEARNING_DIR,
    algos: Sequence[str] | None = None,
    envs: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    budget: int | None = None,
    eval_freq: int | None = None,
    eval_episodes: int | None = None,
    extra_params: Sequence[str] = (),
    algo_params: dict[str, Sequence[str]] | None = None,
    device: str | None = None,
    threads: int | None = None,
    tag: str = "",
    checkpoint_freq: int | None = None,
) -> list[Job]:
    """All jobs of a suite (with overrides), ordered seed-major so that partial runs cover every (algo, env) early."""
    algo_params = algo_params or {}
    jobs = []
    for seed in seeds if seeds is not None else suite.seeds:
        for env in envs or suite.envs:
            for algo in algos or suite.algos:
                jobs.append(
                    Job(
                        algo=algo, env=env, seed=int(seed), budget=int(budget or suite.budget),
                        eval_freq=int(eval_freq or suite.eval_freq),
                        eval_episodes=int(eval_episodes or suite.eval_episodes), results_dir=Path(results_dir),
                        params=(*suite.params(algo, int(budget or suite.budget)), *extra_params,
                                *algo_params.get(algo, ())),
                        env_kwargs=suite.env_kwargs, conf_file=suite.conf_file(algo),
                        device=device, threads=threads, tag=tag,
                        checkpoint_freq=int(suite.checkpoint_freq if checkpoint_freq is None else checkpoint_freq),
                    )
                )
    return jobs


def process_running(pid: Any, marker: str) -> bool:
    """Whether process ``pid`` runs a command line containing ``marker`` (without /proc: whether it exists)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    from sb3_dreamer.common.checkpointing import pid_alive

    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        return marker in cmdline if cmdline else pid_alive(pid)  # empty: between fork and exec, or exiting
    except FileNotFoundError:
        return not Path("/proc/self").exists() and pid_alive(pid)
    except OSError:
        return pid_alive(pid)


def is_alive(record: dict[str, Any] | None) -> bool:
    """Whether the job.json ``record`` is that of a job still running on this host (its harness or its zoo process)."""
    if record is None or record.get("status") != "running" or record.get("host") != socket.gethostname():
        return False
    return process_running(record.get("pid"), "benchmarks") or process_running(record.get("zoo_pid"), "sb3_dreamer.zoo")


def resume_point(job: Job) -> Any:
    """The checkpoint the zoo's ``--resume`` would continue ``job`` from (a ``zoo_resume.Checkpoint``), or None."""
    if not job.checkpoint_freq:
        return None
    from huggingface_sb3 import EnvironmentName
    from rl_zoo3.utils import ALGOS

    from sb3_dreamer.zoo import register
    from sb3_dreamer.zoo_resume import newest_resume_point

    register()
    found = newest_resume_point(job.run_folder, f"{EnvironmentName(job.env)}", ALGOS[job.algo])
    return None if found is None else found[1]


def finish_killed_segment(segment: dict[str, Any], job: Job) -> dict[str, Any]:
    """A segment of ``job.json`` as it is; one whose harness was killed (it has no end) ended at train.log's last write."""
    if "end_time" in segment:
        return segment
    end = datetime.fromtimestamp((job.dir / "train.log").stat().st_mtime, timezone.utc)
    wall = max((end - datetime.fromisoformat(segment["start_time"])).total_seconds(), 0.0)
    return {**segment, "end_time": end.isoformat(timespec="seconds"), "wall_seconds": round(wall, 2), "status": "killed",
            "note": "the harness was killed; end time from train.log's last write"}  # fmt: skip


def run_job(job: Job, timeout: float | None = None, echo: bool = True, force: bool = False) -> dict[str, Any]:
    """Run one job, or continue it from its newest checkpoint; write job.json at the start and at the end.

    Without a checkpoint to continue from (or with ``force``) the partial output of an earlier attempt is removed first.
    """
    job.dir.mkdir(parents=True, exist_ok=True)
    previous = read_job(job.dir)
    point = None if force else resume_point(job)
    if point is None:
        previous = None
        for stale in (job.run_folder, job.job_file):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
    cmd = job.command(resume=point is not None)
    started = datetime.now(timezone.utc)
    segment: dict[str, Any] = {
        "start_time": started.isoformat(timespec="seconds"), "resumed_from_step": point.steps if point else None,
        "command": shlex.join(cmd), "loadavg_start": loadavg(),
    }  # fmt: skip
    record: dict[str, Any] = {
        "algo": job.algo, "env": job.env, "seed": job.seed, "budget": job.budget,
        "budget_label": fmt_steps(job.budget), "eval_freq": job.eval_freq, "eval_episodes": job.eval_episodes,
        "params": list(job.params), "conf_file": job.conf_file, "device": job.device, "threads": job.threads,
        "tag": job.tag, "checkpoint_freq": job.checkpoint_freq,
        "command": shlex.join(job.command()), "command_portable": portable_command(job.command()), "cwd": str(REPO_ROOT),
        "start_time": (previous or {}).get("start_time", segment["start_time"]),
        "loadavg_start": (previous or {}).get("loadavg_start", segment["loadavg_start"]),
    }  # fmt: skip
    segments = [*(finish_killed_segment(s, job) for s in (previous or {}).get("segments", [])), segment]
    if echo:
        how = f"resume from step {point.steps}" if point else "start"
        say(f"{how} {job.key}: {segment['command']}")
    t0 = time.perf_counter()
    status, returncode = "ok", None
    with open(job.dir / "train.log", "a" if point else "w") as log:
        if point:
            log.write(f"\n[learning] {segment['start_time']}: resuming from the checkpoint at step {point.steps}\n")
            log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        atomic_write_json(job.job_file, {**record, "segments": segments, "status": "running", "pid": os.getpid(),
                                         "zoo_pid": proc.pid, "host": socket.gethostname()})  # fmt: skip
        try:
            returncode = proc.wait(timeout=timeout)
            status = "interrupted" if _INTERRUPTED.is_set() else "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            if job.checkpoint_freq:
                pause_zoo(proc)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    if status in ("timeout", "interrupted") and resume_point(job) is not None:
        segment["stopped_by"], status = status, "paused"
    elif status == "ok" and job.checkpoint_freq and stopped_short(job):
        segment["stopped_by"], status = "request", "paused"  # e.g. `kill -USR1` on its zoo process: it exits 0
    segment.update(end_time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   wall_seconds=round(time.perf_counter() - t0, 2), status=status, loadavg_end=loadavg())  # fmt: skip
    record.update(
        end_time=segment["end_time"], wall_seconds=round(sum(s["wall_seconds"] for s in segments), 2), status=status,
        returncode=returncode, loadavg_end=segment["loadavg_end"], machine=machine_info(), segments=segments,
    )
    if status == "ok" and not job.has_evaluations():
        record["warning"] = "the zoo run ended without evaluations.npz (budget below --eval-freq?)"
    atomic_write_json(job.job_file, record)
    if echo:
        say(f"{status} {job.key} in {segment['wall_seconds']:.0f} s (log: {job.dir / 'train.log'})")
    if segment.get("stopped_by") == "interrupted" or status == "interrupted":
        raise KeyboardInterrupt
    return record


def stopped_short(job: Job) -> bool:
    """Whether a job whose zoo run exited 0 stopped before its budget: its newest checkpoint (a finished run writes one
    at its last step) is short of it. A run paused on request, or stopped by a Ctrl-C that only it received, exits 0
    like a finished one."""
    point = resume_point(job)
    return point is not None and point.steps < job.budget


def pause_zoo(proc: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """Ask a zoo run with checkpoints to write one of its current step and stop (``PAUSE_SIGNAL``); wait up to ``grace``
    seconds for it to exit. Its time is up, but nothing since its last periodic checkpoint is lost."""
    if proc.poll() is None:
        proc.send_signal(PAUSE_SIGNAL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # then the caller kills it
            proc.wait(timeout=grace)


def stop_live_jobs(grace: float = STOP_GRACE_SECONDS) -> None:
    """After a Ctrl-C in the main thread: mark the call interrupted and stop every running zoo process (SIGINT, as a
    terminal's Ctrl-C would have sent it, then SIGKILL after ``grace`` seconds)."""
    _INTERRUPTED.set()
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for proc in live:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def _as_list(value: Any) -> list[Any]:
    """A job.json list field; a single value (e.g. a ``retagged`` note written by hand) becomes its only item."""
    return [] if value is None else value if isinstance(value, list) else [value]


def retag_job(job: Job, tag: str, why: str) -> Job:
    """Move ``job``'s folder to the one of the same job under ``tag`` ("" for untagged) and say so in its job.json.

    For when a packaged entry changes: the untagged runs of the old entry get a tag, and tagged runs whose settings the
    entry now has become untagged. The run itself is untouched; ``command`` names the new folder, the segments keep
    the commands they ran, and ``retagged`` lists every move with its reason.
    """
    record = read_job(job.dir)
    if record is None:
        raise FileNotFoundError(f"{job.key}: no job.json in {job.dir}")
    if is_alive(record):
        raise RuntimeError(f"{job.key} is running (pid {record.get('pid')}): retag it once it has stopped")
    moved = dataclasses.replace(job, tag=tag)
    if moved.dir.exists():
        raise FileExistsError(f"{job.key}: {moved.dir} exists; retag that job first")

    def in_new_folder(command: str) -> str:  # its --log-folder: absolute, relative, or where the job ran before a copy
        def moved_arg(arg: str) -> str:
            path = Path(arg)
            return str(path.with_name(moved.dir.name)) if path.parts[-2:] == job.dir.parts[-2:] else arg

        return shlex.join(moved_arg(arg) for arg in shlex.split(command))

    job.dir.rename(moved.dir)
    record.update(
        tag=tag, command=in_new_folder(record.get("command", "")),
        command_portable=in_new_folder(record.get("command_portable", "")),
        retagged=[*_as_list(record.get("retagged")), {"from": job.dir.name, "to": moved.dir.name, "why": why,
                                                      "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}],
    )  # fmt: skip
    atomic_write_json(moved.job_file, record)
    return moved


def stopped_part_way(job: Job, record: dict[str, Any] | None) -> str | None:
    """Why ``job`` (not running now) is an unfinished run that only its checkpoints could continue, or None.

    That is a paused job, or one whose harness was killed while it ran (``job.json`` still says ``"running"``) after it
    had written evaluations, when it saves checkpoints. A job without checkpoints could only start over anyway.
    """
    status = None if record is None else record.get("status")
    if status == "paused":
        return "paused"
    if status == "running" and job.checkpoint_freq and job.has_evaluations():
        return "stopped while running (its harness was killed)"
    return None


def run_jobs(jobs: Sequence[Job], parallel: int = 1, force: bool = False, timeout: float | None = None,
             dry_run: bool = False, time_budget: float | None = None) -> dict[str, list[Job]]:
    """Run the jobs that are not finished yet (continuing paused ones); return them grouped as
    ``skipped``/``busy``/``stranded``/``ok``/``paused``/``failed``/``deferred``/``planned``.

    A job stopped part-way (:func:`stopped_part_way`) whose checkpoints are missing (results copied or committed without
    them, another machine) is ``stranded``: it is left as it is, since starting it over would delete the evaluations
    it has; ``force`` starts it over.

    :param timeout: seconds per job (per segment of it)
    :param time_budget: seconds for the whole call: jobs still running then are stopped (paused when they have a
        checkpoint) and jobs not started yet are ``deferred`` to the next call
    """
    outcome: dict[str, list[Job]] = {"skipped": [], "busy": [], "stranded": [], "ok": [], "paused": [], "failed": [],
                                     "deferred": [], "planned": []}  # fmt: skip
    deadline = None if time_budget is None else time.monotonic() + time_budget
    _INTERRUPTED.clear()
    todo = []
    for job in jobs:
        record = read_job(job.dir)
        if is_alive(record):
            outcome["busy"].append(job)
            say(f"skip {job.key} (running now: pid {record.get('pid')}, zoo pid {record.get('zoo_pid')})")
        elif not force and record is not None and record.get("status") == "ok":
            outcome["skipped"].append(job)
            say(f"skip {job.key} (finished: {job.job_file})")
        elif not force and (why := stopped_part_way(job, record)) and resume_point(job) is None:
            outcome["stranded"].append(job)  # e.g. results committed without their checkpoints: keep them
            say(f"skip {job.key} ({why}, but its checkpoints are not in {job.run_folder / 'checkpoints'}: put them "
                "back to continue it, or pass --force to start it over, discarding its evaluations so far)")
        else:
            todo.append(job)
    if dry_run:
        for job in todo:
            print(shlex.join(job.command(resume=not force and resume_point(job) is not None)))
        outcome["planned"] = todo
        return outcome

    def one(job: Job) -> tuple[Job, str]:
        if _INTERRUPTED.is_set():
            return job, "deferred"
        limit = timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                say(f"defer {job.key} (the time budget is spent)")
                return job, "deferred"
            limit = left if limit is None else min(limit, left)
        return job, run_job(job, timeout=limit, force=force)["status"]

    if parallel <= 1:
        results = [one(job) for job in todo]
    else:
        pool = ThreadPoolExecutor(max_workers=parallel)
        try:
            results = list(pool.map(one, todo))
        except KeyboardInterrupt:
            stop_live_jobs()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    for job, status in results:
        outcome[status if status in ("ok", "paused", "deferred") else "failed"].append(job)
    return outcome


def parse_algo_params(groups: Sequence[Sequence[str]] | None) -> dict[str, list[str]]:
    """``[["dreamerv2", "a:1", "b:2"], ...]`` -> ``{"dreamerv2": ["a:1", "b:2"]}``."""
    out: dict[str, list[str]] = {}
    for group in groups or []:
        if len(group) < 2:
            raise SystemExit("--algo-params needs an algo followed by key:value items")
        out.setdefault(group[0], []).extend(group[1:])
    return out


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="cartpole", help="named preset of jobs")
    parser.add_argument("--algos", nargs="+", help="algorithms (default: the suite's, dreamerv2 and dqn)")
    parser.add_argument("--envs", nargs="+", help="env ids (default: the suite's)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the suite's)")
    parser.add_argument("--budget", type=int, help="env steps per run (default: the suite's)")
    parser.add_argument("--eval-freq", type=int, help="env steps between evaluations (default: the suite's)")
    parser.add_argument("--eval-episodes", type=int, help="episodes per evaluation (default: 10)")
    parser.add_argument("--device", help="torch device passed to the zoo (default: the zoo's 'auto')")
    parser.add_argument("--threads", type=int, help="torch threads per job (zoo --num-threads)")
    parser.add_argument("--extra-params", nargs="+", default=[], metavar="KEY:VALUE",
                        help="hyperparameter overrides passed as -params to every algorithm")
    parser.add_argument("--algo-params", nargs="+", action="append", metavar="ALGO KEY:VALUE",
                        help="overrides for one algorithm: --algo-params dreamerv2 batch_size:4 sequence_length:8")
    parser.add_argument("--tag", default="", help="suffix of the job folders (runs with non-default settings)")
    parser.add_argument("--results-dir", type=Path, default=LEARNING_DIR, help="root of the job folders")
    parser.add_argument("--parallel", type=int, default=1, help="jobs run at the same time (mind the cores)")
    parser.add_argument("--timeout", type=float,
                        help="seconds per job (per segment) before it is stopped: paused if it has a checkpoint")
    parser.add_argument("--time-budget", type=float,
                        help="seconds for this whole call: running jobs are then stopped (paused if they have a "
                        "checkpoint), the rest deferred to the next call (for sessions or device calls of fixed length)")
    parser.add_argument("--checkpoint-freq", type=int,
                        help="env steps between resumable checkpoints (default: the suite's; 0: none)")
    parser.add_argument("--force", action="store_true", help="rerun finished jobs too, and paused ones from scratch")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the jobs to run, run nothing")
    parser.add_argument("--retag", metavar="NEW_TAG",
                        help="run nothing: move the selected jobs (those of --tag) to NEW_TAG ('' for untagged), e.g. "
                        "when a packaged entry changes; needs --why")
    parser.add_argument("--why", help="the reason for --retag, kept in each job.json")
    parser.add_argument("--list-suites", action="store_true", help="describe the suites and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.list_suites:
        for suite in SUITES.values():
            print(f"{suite.name}: envs={list(suite.envs)} algos={list(suite.algos)} seeds={list(suite.seeds)} "
                  f"budget={fmt_steps(suite.budget)} eval_freq={fmt_steps(suite.eval_freq)} "
                  f"checkpoint_freq={fmt_steps(suite.checkpoint_freq) if suite.checkpoint_freq else None}\n  {suite.notes}")
        return 0
    suite = SUITES[args.suite]
    jobs = build_jobs(
        suite, results_dir=args.results_dir, algos=args.algos, envs=args.envs, seeds=args.seeds, budget=args.budget,
        eval_freq=args.eval_freq, eval_episodes=args.eval_episodes, extra_params=args.extra_params,
        algo_params=parse_algo_params(args.algo_params), device=args.device, threads=args.threads, tag=args.tag,
        checkpoint_freq=args.checkpoint_freq,
    )
    if args.retag is not None:
        if not args.why:
            raise SystemExit("--retag needs --why: the reason is kept in each job.json")
        for job in jobs:
            if job.dir.is_dir():
                say(f"retag {job.key}: {job.dir.name} -> {retag_job(job, args.retag, args.why).dir.name}")
            else:
                say(f"skip {job.key}: no job folder {job.dir}")
        return 0
    if not args.dry_run and not zoo_available():
        print("[learning] sb3_dreamer.zoo is missing: the zoo launcher is needed to run jobs", file=sys.stderr)
        return 2
    outcome = run_jobs(jobs, parallel=args.parallel, force=args.force, timeout=args.timeout, dry_run=args.dry_run,
                       time_budget=args.time_budget)  # fmt: skip
    say(f"{len(jobs)} jobs: " + ", ".join(f"{len(v)} {k}" for k, v in outcome.items() if v))
    return 1 if outcome["failed"] else 0  # paused jobs are not failures: the next run continues them


if __name__ == "__main__":
    sys.exit(main())
