"""Small helpers shared by the benchmark scripts: step formatting, atomic JSON writes, machine description."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def fmt_steps(steps: int | float) -> str:
    """Compact, exact step count: 300 -> '300', 2500 -> '2.5k', 50000 -> '50k', 1250000 -> '1.25M'."""
    steps = int(steps)
    if steps >= 1_000_000 and steps % 1000 == 0:
        return f"{steps / 1e6:.3f}".rstrip("0").rstrip(".") + "M"
    if steps >= 1000 and steps % 100 == 0:
        return f"{steps / 1e3:.1f}".rstrip("0").rstrip(".") + "k"
    return str(steps)


def parse_steps(text: str | int) -> int:
    """Inverse of :func:`fmt_steps`; also accepts plain integers and '1e5'."""
    if isinstance(text, int):
        return text
    text = str(text).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kKmM]?)", text)
    if match is None:
        return int(float(text))
    value, suffix = float(match.group(1)), match.group(2).lower()
    return int(round(value * {"": 1, "k": 1_000, "m": 1_000_000}[suffix]))


def env_slug(env_id: str) -> str:
    """The folder name of an env id (the zoo's convention: '/' -> '-')."""
    return env_id.replace("/", "-")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """The current commit, with ``+dirty`` when tracked files differ from it (None outside a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, timeout=10)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def loadavg() -> list[str] | None:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return None


def machine_info(with_torch: bool = True) -> dict[str, Any]:
    """CPU model and cores, torch version and CUDA device, python, git commit."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpu_cores_usable"] = len(os.sched_getaffinity(0))
    if with_torch:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
