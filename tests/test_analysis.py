"""World-model analysis tools on a tiny DreamerV2 trained ~200 steps on MinAtar Breakout (shared by the module)."""

import csv
import json
import os

import numpy as np
import pytest
import torch as th
from PIL import Image
from stable_baselines3.common.logger import configure

from sb3_dreamer import DreamerV2
from sb3_dreamer.analysis import (
    OpenLoopVideoCallback,
    category_usage,
    collect_latents,
    collect_sequences,
    fit_probe,
    minatar_targets,
    open_loop,
    probe,
    score_differences,
    sequences_from_replay,
    tools,
    usage_summary,
)
from sb3_dreamer.analysis.__main__ import main
from sb3_dreamer.analysis.latents import decode_states, state_at
from sb3_dreamer.analysis.probes import minatar_channel_names, table_markdown
from sb3_dreamer.analysis.rendering import default_scale, gif_frame_count, to_rgb
from sb3_dreamer.analysis.rollout import LatentData, make_env, valid_mask

ENV_ID = "MinAtar/Breakout-v1"
TINY = dict(deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_layers=1, mlp_units=32, cnn_depth=4)
CELL = 10 * default_scale(10, 10)  # rendered size of a 10x10 MinAtar frame


@pytest.fixture(scope="module")
def model():
    th.manual_seed(0)
    model = DreamerV2("CnnPolicy", make_env(ENV_ID), policy_kwargs=TINY, learning_starts=64, batch_size=4,
                      sequence_length=8, imagination_horizon=3, train_freq=4, seed=0, device="cpu")
    return model.learn(200)


@pytest.fixture(scope="module")
def data(model):
    return collect_latents(model, make_env(ENV_ID), n_episodes=12, policy="random", seed=0)


def png_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size  # (width, height)


def test_to_rgb_colours_minatar_channels():
    frame = np.full((4, 10, 10), -0.5, dtype=np.float32)
    frame[1, 2, 3] = 0.5  # one object in channel 1
    rgb = to_rgb(frame, scale=1)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
    assert rgb[2, 3].max() > 0 and rgb.sum() == rgb[2, 3].sum()
    assert to_rgb(np.zeros((2, 5, 1, 8, 8)), scale=2).shape == (2, 5, 16, 16, 3)


def test_open_loop_from_env_writes_grid_gif_and_errors(model, tmp_path):
    result = tools.run_open_loop(model, make_env(ENV_ID), str(tmp_path), n_sequences=2, policy="random")
    length = 5 + 45
    assert result.context == 5 and result.mse.shape == (length,) and result.horizon_mse.shape == (45,)
    assert result.truth["obs"].shape == result.prediction["obs"].shape == (2, length, 4, 10, 10)
    assert np.isfinite(result.mse[0])
    shown = int(result.valid.sum(1).max())  # columns after every episode has ended are left out
    assert png_size(tmp_path / "open_loop.png") == (shown * (CELL + 2), 2 + 2 * 3 * (CELL + 2))
    assert gif_frame_count(str(tmp_path / "open_loop.gif")) == shown
    with open(tmp_path / "open_loop_mse.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == length and rows[5]["phase"] == "open_loop" and rows[5]["horizon"] == "1"
    saved = json.loads((tmp_path / "open_loop_mse.json").read_text())
    assert len(saved["horizon_mse"]) == 45 and len(saved["context_mse"]) == 5
    assert os.path.getsize(tmp_path / "open_loop_mse.png") > 0


def test_open_loop_on_replay_sequences_and_masks(model):
    samples = sequences_from_replay(model, 3)  # [3, 8]
    result = open_loop(model, samples, context=3)
    assert result.prediction["obs"].shape == (3, 8, 4, 10, 10) and result.valid.shape == (3, 8)
    expected = valid_mask(samples)
    np.testing.assert_array_equal(result.valid, expected)
    manual = ((result.prediction["obs"][:, 0] - result.truth["obs"][:, 0]) ** 2).mean()
    assert result.mse[0] == pytest.approx(manual, rel=1e-5)
    with pytest.raises(ValueError):
        open_loop(model, samples, context=8)


def test_collected_sequences_pad_after_episode_end(model):
    samples = collect_sequences(model, make_env(ENV_ID), 2, 30, policy="random", seed=1)
    valid = valid_mask(samples)
    assert valid.shape == (2, 30) and valid[:, 0].all()
    assert all(np.all(np.diff(v.astype(int)) <= 0) for v in valid)  # valid steps form a prefix


def test_category_usage_matches_hand_built_latents():
    chosen = np.array([[0, 1, 2], [0, 1, 1], [0, 3, 2], [0, 1, 2]])  # [N=4, S=3] class indices
    onehot = np.eye(4)[chosen].reshape(4, 12)  # flattened one-hot [N, S * C]
    counts = category_usage(onehot, 3, 4)
    np.testing.assert_array_equal(counts, [[4, 0, 0, 0], [0, 3, 0, 1], [0, 1, 3, 0]])
    summary = usage_summary(counts)
    assert summary["fraction_used"] == pytest.approx(5 / 12)
    assert summary["classes_used_per_variable"] == [1, 2, 2] and summary["n_steps"] == 4
    assert summary["usage_entropy_per_variable"][0] == 0.0


def test_heatmap_tool(model, data, tmp_path):
    counts, summary = tools.run_heatmap(model, None, str(tmp_path), data=data)
    assert counts.shape == (4, 4) and np.all(counts.sum(1) == len(data.rewards))
    np.testing.assert_array_equal(counts, category_usage(data.stoch, 4, 4))
    assert 0 < summary["fraction_used"] <= 1
    assert np.loadtxt(tmp_path / "heatmap.csv", delimiter=",").shape == (4, 4)
    assert os.path.exists(tmp_path / "heatmap.png")


def test_traverse_tool(model, data, tmp_path):
    images = tools.run_traverse(model, None, str(tmp_path), variable=2, step=3, data=data)
    assert images.shape == (4, 4, 10, 10)  # one frame per class
    assert gif_frame_count(str(tmp_path / "traverse_v2.gif")) == 4
    assert png_size(tmp_path / "traverse_v2.png") == (4 * (CELL + 2), CELL + 2)
    assert png_size(tmp_path / "traverse_all.png") == (4 * (CELL + 2), 4 * (CELL + 2))
    state = state_at(data, 3)
    chosen = int(state.stoch.reshape(4, 4)[2].argmax())
    np.testing.assert_allclose(images[chosen], decode_states(model, state.deter, state.stoch)[0], atol=1e-6)


def test_interpolate_tool(model, data, tmp_path):
    images = tools.run_interpolate(model, None, str(tmp_path), start=0, end=5, data=data)
    assert images.shape == (4 + 1, 4, 10, 10)
    assert gif_frame_count(str(tmp_path / "interpolate.gif")) == 5
    for frame, step in ((0, 0), (-1, 5)):
        state = state_at(data, step)
        np.testing.assert_allclose(images[frame], decode_states(model, state.deter, state.stoch)[0], atol=1e-5)


def hand_built_latents(rewards: np.ndarray, stoch: np.ndarray) -> LatentData:
    n = len(rewards)
    return LatentData(np.zeros((n, 3)), stoch, np.zeros((n, 2, 2)), stoch, {"obs": np.zeros((n, 1))}, rewards,
                      np.arange(n) == 0, np.zeros(n, dtype=int))


def test_score_differences_on_planted_latents(model, data, tmp_path):
    class TwoByTwo:  # a model stand-in with 2 variables x 2 classes
        class policy:  # noqa: N801
            class world_model:  # noqa: N801
                class rssm:  # noqa: N801
                    stoch_size, classes, discrete = 2, 2, True

    # variable 0 is class 1 exactly when a reward arrives; variable 1 is always class 0
    rewards = np.array([0, 1, 0, 0, 1, 0], dtype=np.float32)
    stoch = np.where(rewards[:, None] == 1, [[0, 1, 1, 0]], [[1, 0, 1, 0]]).astype(np.float32)
    result = score_differences(TwoByTwo, hand_built_latents(rewards, stoch))
    np.testing.assert_allclose(result["stoch_diff"], [[-1, 1], [0, 0]])
    assert result["n_rewarded"] == 2 and result["top_variables"][0] == 0
    if (data.rewards != 0).any():  # the tool on real episodes
        real = tools.run_score_diff(model, None, str(tmp_path), data=data)
        assert real["stoch_diff"].shape == (4, 4) and os.path.exists(tmp_path / "score_diff.png")


def test_linear_probe_recovers_planted_target():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(400, 12))
    target = latents @ rng.normal(size=12) + 3.0
    spread = np.abs(target - target.mean()).mean()  # MAE of predicting the mean: about 2.8
    assert fit_probe(latents, target, 0) < 1e-3
    assert fit_probe(latents, target, 1, steps=300) < 0.2 * spread
    target[::7] = np.nan  # undefined steps are dropped
    assert fit_probe(latents, target, 0, steps=600) < 1e-2


def test_minatar_targets_read_positions_and_velocities():
    frames = np.zeros((3, 10, 10, 2), dtype=bool)
    for t, (row, col) in enumerate([(1, 2), (2, 3), (3, 5)]):
        frames[t, row, col, 0] = True  # a ball
    frames[:, 9, :3, 1] = True  # three bricks
    frames[2, 9, 3, 1] = True
    targets = minatar_targets(frames, ["ball", "brick"], np.array([True, False, False]))
    np.testing.assert_allclose(targets["ball_x"], [2, 3, 5])
    np.testing.assert_allclose(targets["ball_y"], [1, 2, 3])
    np.testing.assert_allclose(targets["ball_vx"], [np.nan, 1, 2])
    np.testing.assert_allclose(targets["brick_count"], [3, 3, 4])


def test_probe_tool_table(model, data, tmp_path):
    assert minatar_channel_names(make_env(ENV_ID)) == ["paddle", "ball", "trail", "brick"]
    table = probe(data, None, ["paddle", "ball", "trail", "brick"], layers=(0, 1, 2), out_dir=str(tmp_path), steps=50)
    assert {"ball_x", "ball_y", "paddle_x"} <= set(table) and all(list(row) == [0, 1, 2] for row in table.values())
    lines = (tmp_path / "probes.md").read_text().strip().splitlines()
    assert len(lines) == 2 + len(table) and lines[0].count("hidden") == 3
    with open(tmp_path / "probes.csv") as file:
        assert len(list(csv.reader(file))) == 1 + len(table)
    custom = probe(data, lambda obs: {"bricks": obs[..., 3].sum((1, 2))}, layers=(0,), steps=10)
    assert list(custom) == ["bricks"] and np.isfinite(custom["bricks"][0])
    assert table_markdown(custom).count("\n") == 3


def test_open_loop_callback_logs_to_tensorboard(model, tmp_path):
    model.set_logger(configure(str(tmp_path), ["csv", "tensorboard"]))
    callback = OpenLoopVideoCallback(make_env(ENV_ID), every_n_steps=8, context=3, horizon=5, n_sequences=1,
                                     policy="random")
    model.learn(16, callback=callback, reset_num_timesteps=False)
    assert callback.n_logs >= 1
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    gifs = os.listdir(tmp_path / "open_loop")
    assert gifs and 2 <= gif_frame_count(str(tmp_path / "open_loop" / gifs[0])) <= 8  # up to the episode end
    recorded = callback.log_predictions()
    assert recorded["world_model/open_loop_grid"].image.shape[-1] == 3
    video_shape = recorded["world_model/open_loop_video"].frames.shape  # [1, T', 3, h, w]
    assert video_shape[0] == 1 and 2 <= video_shape[1] <= 8 and video_shape[2] == 3
    model.logger.dump(model.num_timesteps)  # pictures go to TensorBoard only
    with open(tmp_path / "progress.csv") as file:
        header = file.readline()
    assert "world_model/open_loop_mse" in header and "video" not in header


@pytest.mark.parametrize("tool,expected", [
    ("open-loop", "open_loop.gif"), ("heatmap", "heatmap.png"), ("traverse", "traverse_all.png"),
    ("interpolate", "interpolate.gif"), ("score-diff", None), ("probe", "probes.md"),
])
def test_cli(model, tmp_path_factory, tool, expected):
    folder = tmp_path_factory.getbasetemp()
    path = folder / "model.zip"
    if not path.exists():
        model.save(path)
    out = folder / tool
    argv = [tool, "--model", str(path), "--env", ENV_ID, "--out", str(out), "--policy", "random", "--episodes", "10",
            "--context", "3", "--horizon", "7", "--sequences", "2", "--layers", "0", "1", "--probe-steps", "20"]
    try:
        assert main(argv) == 0
    except ValueError as error:  # score-diff needs rewarded steps, which a random agent may not get
        assert tool == "score-diff" and "reward" in str(error)
        return
    summary = json.loads((out / f"{tool.replace('-', '_')}_summary.json").read_text())
    assert summary["tool"] == tool
    if expected:
        assert (out / expected).exists()


def test_callback_video_reaches_tensorboard_event_file(model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model.set_logger(configure(str(tmp_path), ["tensorboard"]))
    callback = OpenLoopVideoCallback(make_env(ENV_ID), every_n_steps=1, context=2, horizon=3, n_sequences=1,
                                     policy="random", save_gif=False)
    callback.init_callback(model)
    callback.log_predictions()
    model.logger.dump(model.num_timesteps)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert {"world_model/open_loop_video", "world_model/open_loop_grid"} <= set(events.Tags()["images"])
    assert "world_model/open_loop_mse" in events.Tags()["scalars"]
    video = events.Images("world_model/open_loop_video")[0]
    assert video.encoded_image_string[:3] == b"GIF"
