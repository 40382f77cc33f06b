"""Networks for the baselines that run next to DreamerV2 through the zoo launcher.

:class:`MinAtarCNN` is the DQN network of the MinAtar paper (Young & Tian 2019): one 3x3 convolution with 16 channels
and stride 1, then a 128-unit dense layer, ReLU activations. As an SB3 features extractor it outputs the 128 features;
pass ``net_arch=[]`` to DQN so that the Q-head is a single linear layer on top, as in the paper.
"""

import gymnasium as gym
import torch as th
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


class MinAtarCNN(BaseFeaturesExtractor):
    """Conv(16, 3x3, stride 1) → ReLU → Linear(128) → ReLU, for small grids such as MinAtar's ``(10, 10, C)`` bool obs.

    :param observation_space: a 3-D ``Box`` (any dtype; bools are cast to float by SB3's preprocessing)
    :param features_dim: size of the dense layer (128 in the MinAtar paper)
    :param channels_last: observations are ``(H, W, C)`` (MinAtar); False for ``(C, H, W)``
    """

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 128, channels_last: bool = True) -> None:
        super().__init__(observation_space, features_dim)
        if len(observation_space.shape) != 3:
            raise ValueError(f"MinAtarCNN needs 3-D observations, got shape {observation_space.shape}")
        self.channels_last = channels_last
        if channels_last:
            height, width, channels = observation_space.shape
        else:
            channels, height, width = observation_space.shape
        self.conv = nn.Sequential(nn.Conv2d(channels, 16, kernel_size=3, stride=1), nn.ReLU(), nn.Flatten())
        conv_out = 16 * (height - 2) * (width - 2)
        self.linear = nn.Sequential(nn.Linear(conv_out, features_dim), nn.ReLU())

    def forward(self, observations: th.Tensor) -> th.Tensor:
        x = observations.float()
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
        return self.linear(self.conv(x))
