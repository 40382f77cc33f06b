"""Looking at the stochastic state z_t: category usage, single-variable traversals, interpolation, reward differences.

z_t is ``stoch_size`` categorical variables with ``classes`` classes each (flattened one-hot ``[stoch_size * classes]``),
or ``stoch_size`` Gaussian variables with ``latent_type="gaussian"``. Posterior states come from
:func:`~sb3_dreamer.analysis.rollout.collect_latents` (the posterior's mode at every step of many episodes).

* :func:`category_usage` counts how often each class of each variable is the chosen one; the fraction of (variable,
  class) pairs ever used measures how sparsely the model uses its code book.
* :func:`traverse` decodes a real posterior state while one variable sweeps through its classes (Gaussian: through
  mean ± 3 std), everything else fixed.
* :func:`interpolate` moves from latent A to latent B one variable at a time (h_t linearly in step).
* :func:`score_differences` compares the mean latent activation at steps with a reward with steps without.
"""

import csv
import json
import os
from typing import Any

import numpy as np
import torch as th

from sb3_dreamer.analysis.rendering import image_grid, plot_heatmap, save_gif, save_png, to_rgb, with_progress_bar
from sb3_dreamer.analysis.rollout import LatentData
from sb3_dreamer.common.type_aliases import RSSMState


def _rssm(model: Any) -> Any:
    return model.policy.world_model.rssm


def category_usage(stoch: np.ndarray, stoch_size: int, classes: int) -> np.ndarray:
    """How often each class of each variable is active: ``[stoch_size, classes]`` counts.

    :param stoch: one-hot latents ``[N, stoch_size * classes]`` (or ``[N, stoch_size, classes]``)
    """
    onehot = np.asarray(stoch).reshape(-1, stoch_size, classes)  # [N, S, C]
    chosen = onehot.argmax(-1)  # [N, S]
    counts = np.zeros((stoch_size, classes), dtype=np.int64)
    for variable in range(stoch_size):
        counts[variable] = np.bincount(chosen[:, variable], minlength=classes)
    return counts


def usage_summary(counts: np.ndarray) -> dict[str, Any]:
    """Fraction of (variable, class) pairs ever used, classes used per variable, and the normalized usage entropy."""
    used = counts > 0
    probs = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)
    return {
        "fraction_used": float(used.mean()),
        "classes_used_per_variable": used.sum(1).tolist(),
        "mean_classes_used": float(used.sum(1).mean()),
        "usage_entropy_per_variable": (entropy / np.log(counts.shape[1]) + 0.0).tolist(),  # + 0.0: no -0.0
        "n_steps": int(counts[0].sum()),
    }


def heatmap(model: Any, data: LatentData, out_dir: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Category usage over all steps of ``data``; writes ``heatmap.png``, ``heatmap.csv`` and ``heatmap.json``."""
    rssm = _rssm(model)
    if not rssm.discrete:
        raise ValueError("The category-usage heatmap needs categorical latents (latent_type='categorical').")
    counts = category_usage(data.stoch, rssm.stoch_size, rssm.classes)
    summary = usage_summary(counts)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        np.savetxt(os.path.join(out_dir, "heatmap.csv"), counts, fmt="%d", delimiter=",")
        with open(os.path.join(out_dir, "heatmap.json"), "w") as file:
            json.dump(summary, file, indent=1)
        frequency = counts / max(1, summary["n_steps"])
        plot_heatmap(frequency, os.path.join(out_dir, "heatmap.png"), "class", "variable",
                     f"class usage over {summary['n_steps']} steps ({100 * summary['fraction_used']:.0f}% of pairs used)")
    return counts, summary


def state_at(data: LatentData, index: int, device: th.device | str = "cpu") -> RSSMState:
    """The posterior state of step ``index`` of ``data`` as a batch of one."""
    return RSSMState(*(th.as_tensor(x[index : index + 1], device=device) for x in (data.deter, data.stoch, data.stats)))


def decode_states(model: Any, deter: th.Tensor, stoch: th.Tensor, key: str | None = None) -> np.ndarray:
    """Decode ``[N]`` states into preprocessed images ``[N, C, H, W]`` of observation ``key`` (first image key)."""
    world_model = model.policy.world_model
    if not world_model.decoder.cnn_keys:
        raise ValueError("Rendering latents needs an image observation (a CNN decoder).")
    key = key or world_model.decoder.cnn_keys[0]
    with th.no_grad():
        features = world_model.features(RSSMState(deter, stoch, th.zeros(0)))
        return world_model.decode(features)[key].cpu().numpy()


def traverse(model: Any, state: RSSMState, variable: int, n_values: int = 9) -> np.ndarray:
    """Decode ``state`` (a batch of one) while ``variable`` sweeps through its values.

    :return: preprocessed images ``[classes, C, H, W]`` (categorical) or ``[n_values, C, H, W]`` (Gaussian: mean
        ± 3 std of the state's posterior)
    """
    rssm = _rssm(model)
    if not 0 <= variable < rssm.stoch_size:
        raise ValueError(f"variable must lie in [0, {rssm.stoch_size - 1}], got {variable}")
    if rssm.discrete:
        n = rssm.classes
        stoch = state.stoch.reshape(1, rssm.stoch_size, rssm.classes).repeat(n, 1, 1)  # [C, S, C]
        stoch[:, variable] = th.eye(n, device=stoch.device)
        stoch = stoch.flatten(1)
    else:
        n = n_values
        mean, std = state.stats.chunk(2, dim=-1)
        stoch = state.stoch.repeat(n, 1)  # [n, S]
        offsets = th.linspace(-3, 3, n, device=stoch.device)
        stoch[:, variable] = mean[0, variable] + offsets * std[0, variable]
    return decode_states(model, state.deter.repeat(stoch.shape[0], 1), stoch)


def traverse_all(model: Any, state: RSSMState, n_values: int = 9) -> np.ndarray:
    """:func:`traverse` for every variable: ``[stoch_size, n, C, H, W]``."""
    return np.stack([traverse(model, state, v, n_values) for v in range(_rssm(model).stoch_size)])


def interpolate(model: Any, start: RSSMState, end: RSSMState) -> np.ndarray:
    """Decode the path from ``start`` to ``end`` (batches of one) that swaps z_t one variable at a time.

    Frame i has variables ``0..i-1`` from ``end`` and the rest from ``start``; h_t moves linearly,
    h = (1 - i/S) h_start + (i/S) h_end.

    :return: preprocessed images ``[stoch_size + 1, C, H, W]``
    """
    rssm = _rssm(model)
    size = rssm.stoch_size
    width = rssm.classes if rssm.discrete else 1
    a = start.stoch.reshape(size, width)
    b = end.stoch.reshape(size, width)
    stochs, deters = [], []
    for i in range(size + 1):
        stochs.append(th.cat([b[:i], a[i:]]).reshape(-1))
        deters.append(start.deter[0] + (i / size) * (end.deter[0] - start.deter[0]))
    return decode_states(model, th.stack(deters), th.stack(stochs))


def score_differences(model: Any, data: LatentData) -> dict[str, Any]:
    """Mean latent activation at steps with a reward minus at steps without (overall and per reward value).

    Activations are the posterior one-hots reshaped to ``[stoch_size, classes]`` (Gaussian: the sampled values,
    ``[stoch_size, 1]``) and h_t ``[deter_size]``. A step's reward is the one received on arriving at it.

    :return: ``{"stoch_diff": [S, C], "deter_diff": [D], "n_rewarded": int, "n_unrewarded": int,
        "per_reward": {value: {"stoch_diff", "n"}}, "top_variables": [...]}``
    """
    rssm = _rssm(model)
    width = rssm.classes if rssm.discrete else 1
    stoch = data.stoch.reshape(len(data.stoch), rssm.stoch_size, width)  # [N, S, C]
    rewarded = data.rewards != 0
    if rewarded.all() or not rewarded.any():
        raise ValueError("score differences need steps both with and without reward; collect more episodes.")
    base_stoch, base_deter = stoch[~rewarded].mean(0), data.deter[~rewarded].mean(0)
    stoch_diff = stoch[rewarded].mean(0) - base_stoch
    per_reward = {
        float(value): {"stoch_diff": (stoch[data.rewards == value].mean(0) - base_stoch).tolist(),
                       "n": int((data.rewards == value).sum())}
        for value in np.unique(data.rewards[rewarded])
    }
    strength = np.abs(stoch_diff).sum(1)  # [S] how much each variable's distribution shifts
    return {
        "stoch_diff": stoch_diff,
        "deter_diff": data.deter[rewarded].mean(0) - base_deter,
        "n_rewarded": int(rewarded.sum()),
        "n_unrewarded": int((~rewarded).sum()),
        "per_reward": per_reward,
        "top_variables": np.argsort(-strength)[:8].tolist(),
        "variable_shift": strength.tolist(),
    }


def save_score_differences(result: dict[str, Any], out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "score_diff.json"), "csv": os.path.join(out_dir, "score_diff.csv")}
    with open(paths["json"], "w") as file:
        json.dump({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}, file, indent=1)
    diff = result["stoch_diff"]
    with open(paths["csv"], "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["variable", *[f"class_{c}" for c in range(diff.shape[1])]])
        for v, row in enumerate(diff):
            writer.writerow([v, *[f"{x:.6g}" for x in row]])
    paths["png"] = plot_heatmap(diff, os.path.join(out_dir, "score_diff.png"), "class", "variable",
                                f"activation with reward - without ({result['n_rewarded']} rewarded steps)",
                                cmap="RdBu_r", symmetric=True)
    return paths


def save_strip(images: np.ndarray, out_dir: str, name: str, fps: float = 3.0, scale: int | None = None) -> dict[str, str]:
    """Preprocessed images ``[n, C, H, W]`` as a one-row PNG strip and an ``n``-frame GIF."""
    frames = to_rgb(images, scale)  # [n, h, w, 3]
    return {"png": save_png(image_grid([frames]), os.path.join(out_dir, f"{name}.png")),
            "gif": save_gif(with_progress_bar(frames), os.path.join(out_dir, f"{name}.gif"), fps)}


def save_traversal_grid(images: np.ndarray, out_dir: str, name: str = "traverse_all", scale: int | None = None) -> str:
    """``[S, n, C, H, W]`` as a grid: one row per variable, one column per class."""
    return save_png(image_grid([to_rgb(row, scale) for row in images]), os.path.join(out_dir, f"{name}.png"))


def most_used_variable(model: Any, data: LatentData) -> int:
    """The variable whose classes are most evenly used (0 for Gaussian latents): the most informative to traverse."""
    rssm = _rssm(model)
    if not rssm.discrete:
        return 0
    counts = category_usage(data.stoch, rssm.stoch_size, rssm.classes)
    return int(np.argmax(usage_summary(counts)["usage_entropy_per_variable"]))
