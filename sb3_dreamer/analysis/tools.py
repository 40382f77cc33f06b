"""One function per analysis tool: a model and an env in, numbers and arrays out, files written to ``out_dir``.

These are what ``python -m sb3_dreamer.analysis <tool>`` runs; each latent tool collects its own episodes unless
given ``data`` (a :class:`~sb3_dreamer.analysis.rollout.LatentData` from :func:`collect_latents`, to share one rollout
between tools).
"""

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from sb3_dreamer.analysis import latents
from sb3_dreamer.analysis.open_loop import OpenLoopResult, open_loop_from_env
from sb3_dreamer.analysis.probes import TargetsFn, minatar_channel_names, probe
from sb3_dreamer.analysis.rollout import LatentData, collect_latents, make_env

EnvLike = Any  # a gymnasium env, a VecEnv or an env id


def _latents(model: Any, env: EnvLike, data: LatentData | None, **collect: Any) -> LatentData:
    return data if data is not None else collect_latents(model, env, **collect)


def run_open_loop(model: Any, env: EnvLike, out_dir: str, context: int = 5, horizon: int = 45, n_sequences: int = 4,
                  policy: str = "model", seed: int | None = 0, stride: int = 1, fps: float = 5.0) -> OpenLoopResult:
    """Open-loop prediction (files: ``open_loop.png/.gif``, ``open_loop_mse.csv/.json/.png``)."""
    result, _ = open_loop_from_env(model, env, out_dir, context, horizon, n_sequences, policy, seed, stride=stride, fps=fps)
    return result


def run_heatmap(model: Any, env: EnvLike, out_dir: str, data: LatentData | None = None,
                **collect: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Category usage ``[stoch_size, classes]`` and its summary (files: ``heatmap.png/.csv/.json``)."""
    return latents.heatmap(model, _latents(model, env, data, **collect), out_dir)


def run_traverse(model: Any, env: EnvLike, out_dir: str, variable: int | None = None, step: int | None = None,
                 data: LatentData | None = None, **collect: Any) -> np.ndarray:
    """Traversal of one variable from the posterior state of ``step`` (default: the middle step of the rollout).

    Files: ``traverse_v<variable>.png/.gif`` and ``traverse_all.png`` (every variable x every class).

    :return: preprocessed images ``[classes, C, H, W]`` of the chosen variable
    """
    data = _latents(model, env, data, **collect)
    step = len(data.rewards) // 2 if step is None else step
    variable = latents.most_used_variable(model, data) if variable is None else variable
    state = latents.state_at(data, step, model.device)
    images = latents.traverse(model, state, variable)
    latents.save_strip(images, out_dir, f"traverse_v{variable}")
    latents.save_traversal_grid(latents.traverse_all(model, state), out_dir)
    return images


def run_interpolate(model: Any, env: EnvLike, out_dir: str, start: int | None = None, end: int | None = None,
                    data: LatentData | None = None, **collect: Any) -> np.ndarray:
    """Interpolation between the posterior states of steps ``start`` and ``end`` (default: the first step and the
    step whose z_t differs most from it). Files: ``interpolate.png/.gif``.

    :return: preprocessed images ``[stoch_size + 1, C, H, W]``
    """
    data = _latents(model, env, data, **collect)
    start = 0 if start is None else start
    if end is None:
        end = int(np.argmax(np.abs(data.stoch - data.stoch[start]).sum(1)))
    images = latents.interpolate(model, latents.state_at(data, start, model.device), latents.state_at(data, end, model.device))
    latents.save_strip(images, out_dir, "interpolate")
    return images


def run_score_diff(model: Any, env: EnvLike, out_dir: str, data: LatentData | None = None, **collect: Any) -> dict[str, Any]:
    """Activation differences at rewarded steps (files: ``score_diff.png/.csv/.json``)."""
    result = latents.score_differences(model, _latents(model, env, data, **collect))
    latents.save_score_differences(result, out_dir)
    return result


def run_probe(model: Any, env: EnvLike, out_dir: str, targets_fn: TargetsFn | None = None, layers: Sequence[int] = range(6),
              latent: str = "features", data: LatentData | None = None, **kwargs: Any) -> dict[str, dict[int, float]]:
    """Probe table ``{target: {hidden_layers: MAE}}`` (files: ``probes.md``, ``probes.csv``).

    ``kwargs`` go to :func:`collect_latents` (``n_episodes``, ``max_steps``, ``policy``, ``seed``) or to the probe
    fitting (``units``, ``steps``, ``lr``, ``test_fraction``).
    """
    collect = {k: kwargs.pop(k) for k in ("n_episodes", "max_steps", "policy", "deterministic", "seed") if k in kwargs}
    data = _latents(model, env, data, **collect)
    names = minatar_channel_names(make_env(env) if isinstance(env, str) else env) if targets_fn is None else None
    return probe(data, targets_fn, names, layers, latent, out_dir, **kwargs)


def write_summary(out_dir: str, name: str, summary: dict[str, Any]) -> str:
    path = os.path.join(out_dir, f"{name}_summary.json")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as file:
        json.dump(summary, file, indent=1)
    return path
