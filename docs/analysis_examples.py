"""Regenerate the example pictures of docs/analysis.md (a few CPU minutes).

Trains a small DreamerV2 on MinAtar Breakout for a few thousand steps (skipped when ``--model`` already exists), then
runs every analysis tool and writes the pictures to ``docs/images/`` and the numbers to
``docs/images/analysis_examples.json``::

    python docs/analysis_examples.py [--steps 4000] [--model /tmp/sb3_dreamer_docs/breakout.zip]
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch as th

from sb3_dreamer import DreamerV2
from sb3_dreamer.analysis import collect_latents, make_env, open_loop, probe, score_differences
from sb3_dreamer.analysis import latents as latent_tools
from sb3_dreamer.analysis.open_loop import grid_image, save_open_loop, video_frames
from sb3_dreamer.analysis.probes import minatar_channel_names, table_markdown
from sb3_dreamer.analysis.rendering import save_gif, save_png
from sb3_dreamer.analysis.rollout import collect_sequences

IMAGES = Path(__file__).resolve().parent / "images"
ENV_ID = "MinAtar/Breakout-v1"
POLICY_KWARGS = dict(deter_size=96, hidden_size=96, stoch_size=16, classes=16, mlp_layers=2, mlp_units=96,
                     cnn_depth=16, image_dist="binary")
KWARGS = dict(learning_starts=1000, batch_size=16, sequence_length=24, train_freq=10, imagination_horizon=10,
              buffer_size=20_000, learning_rate=6e-4, actor_lr=1e-4, critic_lr=2e-4)


def train(path: Path, steps: int, seed: int) -> DreamerV2:
    start = time.time()
    model = DreamerV2("CnnPolicy", make_env(ENV_ID), policy_kwargs=POLICY_KWARGS, seed=seed, device="cpu", verbose=0,
                      **KWARGS)
    model.learn(steps)
    model.save(path)
    model.save_replay_buffer(path.with_suffix(".buffer.pkl"))
    print(f"trained {steps} steps in {time.time() - start:.0f} s", flush=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "sb3_dreamer_docs" / "breakout.zip")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    th.set_num_threads(1)
    th.manual_seed(args.seed)
    args.model.parent.mkdir(parents=True, exist_ok=True)
    model = DreamerV2.load(args.model, device="cpu") if args.model.exists() else train(args.model, args.steps, args.seed)
    IMAGES.mkdir(parents=True, exist_ok=True)
    numbers: dict = {"env": ENV_ID, "train_steps": args.steps, "policy_kwargs": POLICY_KWARGS, "kwargs": KWARGS}

    # Open loop: 5 observed + 45 imagined steps with the policy's own actions.
    samples = collect_sequences(model, make_env(ENV_ID), 2, 50, policy="model", seed=args.seed, max_episodes=40)
    result = open_loop(model, samples, context=5)
    work = Path(tempfile.mkdtemp())
    paths = save_open_loop(result, str(work), n_show=2)
    save_png(grid_image(result, n_show=2, scale=3), str(IMAGES / "open_loop.png"))
    save_gif(video_frames(result, n_show=2, scale=6), str(IMAGES / "open_loop.gif"), fps=4)
    shutil.copy(paths["plot"], IMAGES / "open_loop_mse.png")
    numbers["open_loop"] = {"valid_steps": result.valid.sum(1).tolist(),
                            "context_mse": np.round(result.mse[:5], 4).tolist(),
                            "horizon_mse": [round(float(x), 4) for x in result.horizon_mse if np.isfinite(x)]}

    data = collect_latents(model, make_env(ENV_ID), n_episodes=100, policy="model", seed=args.seed)
    numbers["latent_steps"] = len(data.rewards)
    _, usage = latent_tools.heatmap(model, data, str(work))
    shutil.copy(work / "heatmap.png", IMAGES / "heatmap.png")
    numbers["heatmap"] = {k: usage[k] for k in ("fraction_used", "mean_classes_used", "n_steps")}

    step = int(np.argmax(data.rewards != 0)) if (data.rewards != 0).any() else len(data.rewards) // 2
    state = latent_tools.state_at(data, step)
    variable = latent_tools.most_used_variable(model, data)
    frames = latent_tools.traverse(model, state, variable)
    latent_tools.save_strip(frames, str(work), "traverse", scale=6)
    shutil.copy(work / "traverse.gif", IMAGES / "traverse.gif")
    latent_tools.save_traversal_grid(latent_tools.traverse_all(model, state), str(IMAGES), "traverse_all", scale=2)
    numbers["traverse"] = {"step": step, "variable": variable}

    end = int(np.argmax(np.abs(data.stoch - data.stoch[0]).sum(1)))
    frames = latent_tools.interpolate(model, latent_tools.state_at(data, 0), latent_tools.state_at(data, end))
    latent_tools.save_strip(frames, str(work), "interpolate", scale=6)
    shutil.copy(work / "interpolate.gif", IMAGES / "interpolate.gif")
    shutil.copy(work / "interpolate.png", IMAGES / "interpolate.png")

    if (data.rewards != 0).any():
        diff = score_differences(model, data)
        latent_tools.save_score_differences(diff, str(work))
        shutil.copy(work / "score_diff.png", IMAGES / "score_diff.png")
        numbers["score_diff"] = {k: diff[k] for k in ("n_rewarded", "n_unrewarded", "top_variables")}

    table = probe(data, None, minatar_channel_names(make_env(ENV_ID)), layers=range(6), steps=1500)
    numbers["probe_table"] = table_markdown(table)
    (IMAGES / "analysis_examples.json").write_text(json.dumps(numbers, indent=1))
    shutil.rmtree(work)
    print(json.dumps(numbers, indent=1))
    total = sum(os.path.getsize(p) for p in IMAGES.iterdir())
    print(f"docs/images: {total / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
