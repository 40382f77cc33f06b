"""Looking inside a trained DreamerV2 world model.

* :mod:`~sb3_dreamer.analysis.open_loop`: observe K frames, imagine N with the real actions; truth / model / error
  grids and GIFs, per-horizon prediction error.
* :mod:`~sb3_dreamer.analysis.latents`: category-usage heatmaps, single-variable traversals, interpolation between
  latents, activation differences at rewarded steps.
* :mod:`~sb3_dreamer.analysis.probes`: MLP probes (0-5 hidden layers) predicting game quantities from the latents.
* :mod:`~sb3_dreamer.analysis.callbacks`: :class:`OpenLoopVideoCallback` for TensorBoard during training.

Command line: ``python -m sb3_dreamer.analysis {open-loop,heatmap,traverse,interpolate,score-diff,probe} --model
model.zip --env MinAtar/Breakout-v1 --out DIR``.
"""

from sb3_dreamer.analysis.callbacks import OpenLoopVideoCallback
from sb3_dreamer.analysis.latents import (
    category_usage,
    heatmap,
    interpolate,
    score_differences,
    traverse,
    traverse_all,
    usage_summary,
)
from sb3_dreamer.analysis.open_loop import OpenLoopResult, open_loop, open_loop_from_env, save_open_loop
from sb3_dreamer.analysis.probes import fit_probe, minatar_targets, probe, probe_table
from sb3_dreamer.analysis.rollout import (
    LatentData,
    collect_episodes,
    collect_latents,
    collect_sequences,
    make_env,
    posterior_states,
    sequences_from_replay,
)

__all__ = [
    "LatentData",
    "OpenLoopResult",
    "OpenLoopVideoCallback",
    "category_usage",
    "collect_episodes",
    "collect_latents",
    "collect_sequences",
    "fit_probe",
    "heatmap",
    "interpolate",
    "make_env",
    "minatar_targets",
    "open_loop",
    "open_loop_from_env",
    "posterior_states",
    "probe",
    "probe_table",
    "save_open_loop",
    "score_differences",
    "sequences_from_replay",
    "traverse",
    "traverse_all",
    "usage_summary",
]
