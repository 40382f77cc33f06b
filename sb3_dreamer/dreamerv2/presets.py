"""Named model sizes, chosen with ``policy_kwargs=dict(preset=...)``; any field can be overridden individually.

* ``small``: learns CartPole and MinAtar on a CPU in minutes (the default).
* ``medium``: a middle ground for harder small problems.
* ``atari``: the paper's Atari model (600-unit GRU and dense layers, 32 x 32 categorical latents, 4 x 400 MLPs,
  CNN depth 48; about 20M world-model parameters at 64x64).
"""

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(deter_size=128, hidden_size=128, stoch_size=16, classes=16, mlp_layers=2, mlp_units=128, cnn_depth=16),
    "medium": dict(deter_size=400, hidden_size=400, stoch_size=32, classes=32, mlp_layers=3, mlp_units=300, cnn_depth=32),
    "atari": dict(deter_size=600, hidden_size=600, stoch_size=32, classes=32, mlp_layers=4, mlp_units=400, cnn_depth=48),
}


def resolve_preset(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset's sizes with the non-None ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown model preset {preset!r}; choose one of {sorted(PRESETS)}.")
    sizes = dict(PRESETS[preset])
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    return sizes
