from sb3_dreamer.dreamerv2.dreamerv2 import DreamerV2
from sb3_dreamer.dreamerv2.policies import CnnPolicy, DreamerV2Policy, MlpPolicy, MultiInputPolicy

__all__ = ["CnnPolicy", "DreamerV2", "DreamerV2Policy", "MlpPolicy", "MultiInputPolicy"]
