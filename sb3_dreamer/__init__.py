"""sb3_dreamer: DreamerV2 as a Stable-Baselines3 algorithm."""

from sb3_dreamer.common.buffers import SequenceReplayBuffer
from sb3_dreamer.dreamerv2 import CnnPolicy, DreamerV2, DreamerV2Policy, MlpPolicy, MultiInputPolicy

__version__ = "0.1.0"

__all__ = ["CnnPolicy", "DreamerV2", "DreamerV2Policy", "MlpPolicy", "MultiInputPolicy", "SequenceReplayBuffer", "__version__"]
