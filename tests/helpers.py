"""Test helpers shared by several test modules."""

from stable_baselines3.common.logger import Logger


class RecordingLogger(Logger):
    """Keeps every ``train/*`` value recorded (SB3 overwrites them between dumps)."""

    def __init__(self, sink: list) -> None:
        super().__init__(folder=None, output_formats=[])
        self.sink = sink

    def record(self, key, value, exclude=None) -> None:
        if key.startswith("train/"):
            self.sink.append((key, float(value)))
        super().record(key, value, exclude)
