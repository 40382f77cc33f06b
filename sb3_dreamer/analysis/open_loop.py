"""Open-loop video prediction: observe K frames, imagine the next N with the real actions, compare with the truth.

For each sequence x_{1:K+N} with actions a_{0:K+N-1}:

* steps 1..K (context): posterior s_t ~ q(z_t | h_t, e_t) from the frames; the model row shows the reconstruction;
* steps K+1..K+N (open loop): prior ŝ_t from :meth:`RSSM.img_step` with the real a_{t-1}, never seeing x_t; the model
  row shows the decoded prediction.

The per-horizon error is the mean squared error per observation element, in the world model's preprocessed space
([-0.5, 0.5] for images), averaged over the sequences whose episode is still running at that step (MinAtar games can end
within a window; the remaining steps are masked out).
"""

import csv
import json
import os
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.vec_env import VecEnv

from sb3_dreamer.analysis.rendering import (
    CONTEXT_COLOUR,
    IMAGINED_COLOUR,
    error_rgb,
    image_grid,
    plot_curves,
    save_gif,
    save_png,
    to_rgb,
    with_progress_bar,
)
from sb3_dreamer.analysis.rollout import collect_sequences, posterior_states, valid_mask
from sb3_dreamer.common.type_aliases import RSSMState, SequenceSamples


class OpenLoopResult(NamedTuple):
    truth: dict[str, np.ndarray]  # preprocessed observations per key: [B, T, *shape]
    prediction: dict[str, np.ndarray]  # reconstructions (t < K) and open-loop predictions (t >= K): [B, T, *shape]
    valid: np.ndarray  # [B, T] the step belongs to the episode the window starts in
    mse: np.ndarray  # [T] mean squared error per element at each step (NaN where no sequence is valid)
    mse_per_key: dict[str, np.ndarray]  # [T] per observation key
    context: int  # K
    image_keys: list[str]  # keys rendered as pictures

    @property
    def horizon_mse(self) -> np.ndarray:
        """``[N]`` the error of the imagined steps only, indexed by horizon 1..N."""
        return self.mse[self.context :]


def open_loop(model: Any, samples: SequenceSamples, context: int = 5, sample: bool = False) -> OpenLoopResult:
    """Observe ``context`` steps of each sequence, then predict the rest open loop with the recorded actions.

    :param model: a :class:`~sb3_dreamer.DreamerV2`
    :param samples: sequences ``[B, T, ...]`` (e.g. from :func:`collect_sequences` or the replay buffer)
    :param context: K, steps seen by the posterior (at least 1, less than T)
    :param sample: sample the latents (default: their mode, deterministic)
    """
    world_model = model.policy.world_model
    length = samples.actions.shape[1]
    if not 1 <= context < length:
        raise ValueError(f"context must lie in [1, {length - 1}] for sequences of {length} steps, got {context}")
    with th.no_grad():
        inputs = world_model.encoder.preprocess(samples.observations)  # {key: [B, T, *shape]}
        actions = world_model.action_codec.buffer_to_model(samples.actions)  # [B, T, A]
        observed = SequenceSamples(*(_slice(x, context) for x in samples))
        post = posterior_states(world_model, observed, sample)  # [B, K, ...]
        state = RSSMState(*(x[:, -1] for x in post))
        imagined = []
        for t in range(context, length):
            state = world_model.rssm.img_step(state, actions[:, t], sample)
            imagined.append(state)
        states = RSSMState(*(th.cat([p, th.stack(i, dim=1)], dim=1) for p, i in zip(post, zip(*imagined))))
        decoded = world_model.decode(world_model.features(states))  # {key: [B, T, *shape]}
    truth = {k: v.cpu().numpy() for k, v in inputs.items()}
    prediction = {k: decoded[k].cpu().numpy() for k in truth}
    valid = valid_mask(samples)
    squared = {k: ((prediction[k] - truth[k]) ** 2).reshape(*valid.shape, -1) for k in truth}  # [B, T, D_k]
    weights = valid.astype(np.float64)
    counts = weights.sum(0)  # [T]
    with np.errstate(invalid="ignore", divide="ignore"):
        mse_per_key = {k: (s.mean(-1) * weights).sum(0) / counts for k, s in squared.items()}
        total = sum(s.sum(-1) for s in squared.values()) / sum(s.shape[-1] for s in squared.values())
        mse = (total * weights).sum(0) / counts
    return OpenLoopResult(truth, prediction, valid, mse, mse_per_key, context, list(world_model.decoder.cnn_keys))


def _slice(x: Any, length: int) -> Any:
    return {k: v[:, :length] for k, v in x.items()} if isinstance(x, dict) else x[:, :length]


def render_rows(result: OpenLoopResult, key: str | None = None, n_show: int = 4,
                scale: int | None = None) -> list[np.ndarray]:
    """Truth, model and error rows (``uint8`` ``[T', h, w, 3]`` each) for the first ``n_show`` sequences.

    Steps outside the starting episode are blanked (white); T' = :func:`shown_length` drops the trailing steps where
    every shown episode has already ended.
    """
    key = key or result.image_keys[0]
    length = shown_length(result, n_show)
    rows = []
    for b in range(min(n_show, result.valid.shape[0])):
        truth = to_rgb(result.truth[key][b, :length], scale)  # [T', h, w, 3]
        model = to_rgb(result.prediction[key][b, :length], scale)
        error = error_rgb(truth, model)
        for row in (truth, model, error):
            row = row.copy()
            row[~result.valid[b, :length]] = 255
            rows.append(row)
    return rows


def shown_length(result: OpenLoopResult, n_show: int) -> int:
    """Steps drawn: up to the last step where one of the first ``n_show`` sequences is still in its episode."""
    valid = result.valid[:n_show].any(0)  # [T]
    return int(np.nonzero(valid)[0][-1]) + 1


def step_colours(result: OpenLoopResult, length: int | None = None) -> list[tuple[int, int, int]]:
    length = result.valid.shape[1] if length is None else length
    return [CONTEXT_COLOUR if t < result.context else IMAGINED_COLOUR for t in range(length)]


def grid_image(result: OpenLoopResult, key: str | None = None, n_show: int = 4, stride: int = 1,
               scale: int | None = None) -> np.ndarray:
    """One picture: columns are steps (every ``stride``-th, up to :func:`shown_length`), rows are truth / model / error
    per sequence.

    A bar above each column is green for observed steps and red for imagined ones.
    """
    rows = [row[::stride] for row in render_rows(result, key, n_show, scale)]
    return image_grid(rows, markers=step_colours(result, shown_length(result, n_show))[::stride])


def video_frames(result: OpenLoopResult, key: str | None = None, n_show: int = 4, scale: int | None = None) -> np.ndarray:
    """Animation frames ``[T', h', w', 3]`` (T' = :func:`shown_length`): per sequence a line ``truth | model | error``,
    sequences stacked."""
    rows = render_rows(result, key, n_show, scale)
    length, h, w = rows[0].shape[:3]
    pad = 2
    frames = np.full((length, (len(rows) // 3) * (h + pad), 3 * (w + pad), 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        y, x = (i // 3) * (h + pad), (i % 3) * (w + pad)
        frames[:, y : y + h, x : x + w] = row
    return with_progress_bar(frames, step_colours(result, length))


def save_open_loop(result: OpenLoopResult, out_dir: str, prefix: str = "open_loop", n_show: int = 4, stride: int = 1,
                   fps: float = 5.0) -> dict[str, str]:
    """Write the grid PNG, the GIF, the per-horizon error (CSV + JSON) and its plot; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str] = {}
    if result.image_keys:
        paths["grid"] = save_png(grid_image(result, n_show=n_show, stride=stride), os.path.join(out_dir, f"{prefix}.png"))
        paths["gif"] = save_gif(video_frames(result, n_show=n_show), os.path.join(out_dir, f"{prefix}.gif"), fps)
    steps = np.arange(1, len(result.mse) + 1)
    counts = result.valid.sum(0)
    paths["csv"] = os.path.join(out_dir, f"{prefix}_mse.csv")
    with open(paths["csv"], "w", newline="") as file:
        writer = csv.writer(file)
        keys = list(result.mse_per_key)
        writer.writerow(["step", "phase", "horizon", "n_sequences", "mse", *[f"mse_{k}" for k in keys]])
        for t in range(len(steps)):
            phase = "context" if t < result.context else "open_loop"
            horizon = max(0, t - result.context + 1)
            writer.writerow([steps[t], phase, horizon, int(counts[t]), _number(result.mse[t]),
                             *[_number(result.mse_per_key[k][t]) for k in keys]])
    paths["json"] = os.path.join(out_dir, f"{prefix}_mse.json")
    with open(paths["json"], "w") as file:
        json.dump({"context": result.context, "horizon": len(steps) - result.context, "n_sequences": int(len(result.valid)),
                   "context_mse": [_number(x) for x in result.mse[: result.context]],
                   "horizon_mse": [_number(x) for x in result.horizon_mse],
                   "valid_sequences": counts.tolist()}, file, indent=1)
    paths["plot"] = plot_curves(steps, {"mse": result.mse}, os.path.join(out_dir, f"{prefix}_mse.png"), "step",
                                "MSE per element", "open-loop prediction error", vline=result.context + 0.5)
    return paths


def _number(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def open_loop_from_env(
    model: Any,
    env: gym.Env | VecEnv | str,
    out_dir: str | None = None,
    context: int = 5,
    horizon: int = 45,
    n_sequences: int = 4,
    policy: str = "model",
    seed: int | None = 0,
    **save_kwargs: Any,
) -> tuple[OpenLoopResult, dict[str, str]]:
    """Collect ``n_sequences`` sequences of ``context + horizon`` steps with the model's policy (or random actions),
    predict them open loop and (with ``out_dir``) write the files of :func:`save_open_loop`."""
    samples = collect_sequences(model, env, n_sequences, context + horizon, policy, seed=seed)
    result = open_loop(model, samples, context)
    paths = save_open_loop(result, out_dir, n_show=n_sequences, **save_kwargs) if out_dir is not None else {}
    return result, paths
