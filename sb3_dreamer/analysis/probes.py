"""Probes: how much of a game's state can be read off the model state, and how non-linearly.

For each target quantity (ball x, paddle x, ball velocity, ...) an MLP with 0..5 hidden layers is trained to predict it
from the latents of many steps; the mean absolute error on held-out steps, per number of hidden layers, is the table
the study reported for Pong (ball x: 4.35 with a linear probe, 0.62 with five hidden layers). Every probe, the linear
one (0 hidden layers) included, is trained the same way: Adam on the squared error of the standardized target.
Inputs are standardized on the training split; the last ``test_fraction`` of the steps (whole later episodes, mostly)
are held out.

Targets come from ``targets_fn(observations) -> {name: [N]}`` on the raw observations. For MinAtar,
:func:`minatar_targets` reads them off the boolean object channels: the position (x = column, y = row) of every channel
that holds a single object in most frames, its velocity (change since the previous step of the same episode), and the
object count of the other channels. Steps where a target is undefined (NaN) are dropped for that target.
"""

import csv
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch as th

from sb3_dreamer.analysis.rollout import LatentData
from sb3_dreamer.common.networks import mlp

TargetsFn = Callable[[Any], dict[str, np.ndarray]]


def minatar_channel_names(env: Any) -> list[str] | None:
    """Channel names of a MinAtar env (``env.unwrapped.game.env.channels``), or None for other envs."""
    if hasattr(env, "envs"):  # DummyVecEnv
        env = env.envs[0]
    try:
        channels = env.unwrapped.game.env.channels
    except AttributeError:
        return None
    return [name for name, _ in sorted(channels.items(), key=lambda item: item[1])]


def minatar_targets(
    observations: np.ndarray, channel_names: Sequence[str] | None = None, is_first: np.ndarray | None = None,
    single_object_fraction: float = 0.8,
) -> dict[str, np.ndarray]:
    """Game quantities of MinAtar frames ``[N, 10, 10, C]`` (channel-last booleans).

    :param observations: the raw frames of consecutive steps
    :param channel_names: names of the C channels (default ``channel_i``)
    :param is_first: ``[N]`` episode starts (velocities are NaN there); None treats all steps as one episode
    :param single_object_fraction: a channel whose non-empty frames hold exactly one cell this often is an object with
        a position (``<name>_x``, ``<name>_y``, ``<name>_vx``, ``<name>_vy``); other channels give ``<name>_count``
    :return: ``{name: [N]}`` floats (NaN where undefined), constant targets left out
    """
    frames = np.asarray(observations).astype(np.float32)  # [N, H, W, C]
    n, height, width, channels = frames.shape
    names = list(channel_names) if channel_names is not None else [f"channel_{c}" for c in range(channels)]
    starts = np.zeros(n, dtype=bool) if is_first is None else np.asarray(is_first, dtype=bool)
    rows, cols = np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32)
    targets: dict[str, np.ndarray] = {}
    for c, name in enumerate(names):
        grid = frames[..., c]  # [N, H, W]
        cells = grid.sum((1, 2))  # [N]
        present = cells > 0
        if present.any() and (cells[present] == 1).mean() >= single_object_fraction:
            with np.errstate(invalid="ignore", divide="ignore"):
                x = np.where(present, (grid.sum(1) * cols).sum(1) / cells, np.nan)  # column centroid
                y = np.where(present, (grid.sum(2) * rows).sum(1) / cells, np.nan)  # row centroid
            for axis, position in (("x", x), ("y", y)):
                velocity = np.full(n, np.nan, dtype=np.float32)
                velocity[1:] = position[1:] - position[:-1]
                velocity[starts] = np.nan
                targets[f"{name}_{axis}"], targets[f"{name}_v{axis}"] = position, velocity
        else:
            targets[f"{name}_count"] = cells
    return {k: v for k, v in targets.items() if np.nanstd(v) > 0}


def _split(n: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_test = max(1, int(round(n * test_fraction)))
    return np.arange(n - n_test), np.arange(n - n_test, n)


def fit_probe(
    inputs: np.ndarray,
    target: np.ndarray,
    hidden_layers: int,
    units: int = 64,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 3e-3,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> float:
    """Train one probe and return its mean absolute error on the held-out steps (target units).

    :param inputs: latents ``[N, F]``
    :param target: ``[N]``; NaN rows are dropped
    :param hidden_layers: 0 (a linear probe) to any depth (ELU MLP)
    """
    keep = np.isfinite(target)
    x, y = np.asarray(inputs, dtype=np.float64)[keep], np.asarray(target, dtype=np.float64)[keep]
    if len(y) < 4:
        return float("nan")
    train, test = _split(len(y), test_fraction)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    generator = th.Generator().manual_seed(seed)
    th.manual_seed(seed)
    net = mlp(x.shape[1], 1, hidden_layers, units)
    optimizer = th.optim.Adam(net.parameters(), lr=lr)
    x_t, y_t = th.as_tensor(x, dtype=th.float32), th.as_tensor(y, dtype=th.float32)
    y_mean, y_std = y_t[train].mean(), y_t[train].std() + 1e-6  # regress the standardized target
    train_t = th.as_tensor(train)
    for _ in range(steps):
        batch = train_t[th.randint(len(train_t), (min(batch_size, len(train_t)),), generator=generator)]
        loss = ((net(x_t[batch]).squeeze(-1) - (y_t[batch] - y_mean) / y_std) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with th.no_grad():
        prediction = net(x_t[test]).squeeze(-1) * y_std + y_mean
    return float((prediction - y_t[test]).abs().mean())


def probe_table(
    inputs: np.ndarray, targets: dict[str, np.ndarray], layers: Sequence[int] = range(6), **fit_kwargs: Any
) -> dict[str, dict[int, float]]:
    """Held-out MAE for every target and number of hidden layers: ``{target: {layers: mae}}``."""
    return {name: {int(n): fit_probe(inputs, target, int(n), **fit_kwargs) for n in layers}
            for name, target in targets.items()}


def latent_inputs(data: LatentData, latent: str = "features") -> np.ndarray:
    """What the probes read: ``"features"`` (what the heads see), ``"stoch"`` (z_t), ``"deter"`` (h_t) or ``"full"``
    ([z_t, h_t] whatever the heads see)."""
    choices = {"features": data.features, "stoch": data.stoch, "deter": data.deter,
               "full": np.concatenate([data.stoch, data.deter], axis=1)}
    if latent not in choices:
        raise ValueError(f"latent must be one of {sorted(choices)}, got {latent!r}")
    return choices[latent]


def table_markdown(table: dict[str, dict[int, float]]) -> str:
    layers = sorted(next(iter(table.values()))) if table else []
    lines = ["| target | " + " | ".join(f"{n} hidden" for n in layers) + " |",
             "|---|" + "---:|" * len(layers)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[n]:.3f}" for n in layers) + " |")
    return "\n".join(lines) + "\n"


def save_probe_table(table: dict[str, dict[int, float]], out_dir: str, name: str = "probes") -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"md": os.path.join(out_dir, f"{name}.md"), "csv": os.path.join(out_dir, f"{name}.csv")}
    with open(paths["md"], "w") as file:
        file.write(table_markdown(table))
    layers = sorted(next(iter(table.values()))) if table else []
    with open(paths["csv"], "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["target", *[f"mae_{n}_hidden" for n in layers]])
        for target, row in table.items():
            writer.writerow([target, *[f"{row[n]:.6g}" for n in layers]])
    return paths


def probe(
    data: LatentData,
    targets_fn: TargetsFn | None = None,
    channel_names: Sequence[str] | None = None,
    layers: Sequence[int] = range(6),
    latent: str = "features",
    out_dir: str | None = None,
    **fit_kwargs: Any,
) -> dict[str, dict[int, float]]:
    """Probe tables for the targets of ``targets_fn(observations)`` (default: :func:`minatar_targets`)."""
    observations = data.observations["obs"] if list(data.observations) == ["obs"] else data.observations
    if targets_fn is None:
        if not (isinstance(observations, np.ndarray) and observations.ndim == 4 and observations.dtype == bool):
            raise ValueError("Default targets need MinAtar observations; pass targets_fn(observations) -> {name: [N]}.")
        targets = minatar_targets(observations, channel_names, data.is_first)
    else:
        targets = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in targets_fn(observations).items()}
    table = probe_table(latent_inputs(data, latent), targets, layers, **fit_kwargs)
    if out_dir is not None:
        save_probe_table(table, out_dir)
    return table
