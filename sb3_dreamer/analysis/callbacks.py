"""TensorBoard callback showing the world model's open-loop predictions during training.

Every ``every_n_steps`` environment steps, :class:`OpenLoopVideoCallback` collects a few sequences from ``eval_env``
with the current policy, observes ``context`` frames, imagines ``horizon`` more with the real actions, and records

* ``world_model/open_loop_video``: truth | model | error, animated (an SB3 ``Video``, shown in TensorBoard's Images
  tab; torch encodes videos with ``moviepy.editor``, which moviepy 2 removed, so without it the callback writes the
  GIF summary to TensorBoard itself). The GIF is also written to ``<log dir>/open_loop/``.
* ``world_model/open_loop_grid``: the truth / model / error grid (SB3 ``Image``),
* ``world_model/open_loop_mse`` (mean over the imagined steps), ``world_model/context_mse`` (reconstruction) and
  ``world_model/open_loop_mse_last`` (last imagined step) as scalars.

Pictures are excluded from the stdout, log, JSON and CSV outputs.
"""

import io
import os
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from PIL import Image as PILImage
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Image, TensorBoardOutputFormat, Video
from stable_baselines3.common.vec_env import VecEnv

from sb3_dreamer.analysis.open_loop import grid_image, open_loop, video_frames
from sb3_dreamer.analysis.rendering import save_gif
from sb3_dreamer.analysis.rollout import as_vec_env, collect_sequences

PICTURE_EXCLUDE = ("stdout", "log", "json", "csv")


class OpenLoopVideoCallback(BaseCallback):
    """Log open-loop predictions of the world model to TensorBoard.

    :param eval_env: env to collect the sequences from (a gymnasium env, a VecEnv or an env id)
    :param every_n_steps: environment steps between two logs
    :param context: K, observed frames
    :param horizon: N, imagined frames
    :param n_sequences: sequences shown (stacked vertically)
    :param policy: act with the ``"model"`` policy or ``"random"`` actions
    :param fps: frames per second of the video
    :param stride: show every ``stride``-th step in the grid image
    :param save_gif: also write the GIF into ``<logger dir>/open_loop/`` (when the logger has a folder)
    :param verbose: 1 prints the mean open-loop error at each log
    """

    def __init__(
        self,
        eval_env: gym.Env | VecEnv | str,
        every_n_steps: int = 10_000,
        context: int = 5,
        horizon: int = 45,
        n_sequences: int = 2,
        policy: str = "model",
        fps: float = 5.0,
        stride: int = 1,
        save_gif: bool = True,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.eval_env, self.every_n_steps = eval_env, every_n_steps
        self.context, self.horizon, self.n_sequences = context, horizon, n_sequences
        self.policy_mode, self.fps, self.stride, self.save_gif = policy, fps, stride, save_gif
        self._last_log = 0
        self.n_logs = 0

    def _init_callback(self) -> None:
        self.eval_env = as_vec_env(self.model, self.eval_env)
        self._last_log = self.num_timesteps

    def _on_step(self) -> bool:
        if self.num_timesteps - self._last_log >= self.every_n_steps:
            self._last_log = self.num_timesteps
            self.log_predictions()
        return True

    def log_predictions(self) -> dict[str, Any]:
        """Collect, predict and record now; returns the recorded values."""
        samples = collect_sequences(self.model, self.eval_env, self.n_sequences, self.context + self.horizon,
                                    self.policy_mode, seed=None)
        result = open_loop(self.model, samples, self.context)
        recorded: dict[str, Any] = {
            "world_model/open_loop_mse": float(np.nanmean(result.horizon_mse)),
            "world_model/open_loop_mse_last": float(result.mse[-1]),
            "world_model/context_mse": float(np.nanmean(result.mse[: self.context])),
        }
        for key, value in recorded.items():
            self.logger.record(key, value)
        if result.image_keys:
            frames = video_frames(result, n_show=self.n_sequences)  # [T, h, w, 3]
            video = th.as_tensor(frames).permute(0, 3, 1, 2).unsqueeze(0)  # [1, T, 3, h, w]
            grid = grid_image(result, n_show=self.n_sequences, stride=self.stride)  # [h', w', 3]
            recorded["world_model/open_loop_video"] = Video(video, self.fps)
            recorded["world_model/open_loop_grid"] = Image(grid, "HWC")
            if _torch_can_encode_video():
                self.logger.record("world_model/open_loop_video", recorded["world_model/open_loop_video"],
                                   exclude=PICTURE_EXCLUDE)
            else:
                self._write_gif_summary("world_model/open_loop_video", frames)
            self.logger.record("world_model/open_loop_grid", recorded["world_model/open_loop_grid"], exclude=PICTURE_EXCLUDE)
            folder = self.logger.get_dir()
            if self.save_gif and folder:
                save_gif(frames, os.path.join(folder, "open_loop", f"step_{self.num_timesteps}.gif"), self.fps)
        self.n_logs += 1
        if self.verbose >= 1:
            print(f"open-loop MSE at {self.num_timesteps} steps: {recorded['world_model/open_loop_mse']:.4f}")
        return recorded

    def _write_gif_summary(self, tag: str, frames: np.ndarray) -> None:
        """Write an animated GIF image summary straight to the TensorBoard outputs of the logger."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        formats = [f for f in self.logger.output_formats if isinstance(f, TensorBoardOutputFormat)]
        if not formats:
            return
        buffer = io.BytesIO()
        images = [PILImage.fromarray(f) for f in frames]
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / self.fps),
                       loop=0)
        height, width = frames.shape[1:3]
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
        for output in formats:
            file_writer = output.writer._get_file_writer()  # what add_video itself writes through
            file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), self.num_timesteps)
            output.writer.flush()


def _torch_can_encode_video() -> bool:
    """Whether ``SummaryWriter.add_video`` works here (it needs ``moviepy.editor``, i.e. moviepy < 2)."""
    try:
        from moviepy import editor  # noqa: F401
    except ImportError:
        return False
    return True
