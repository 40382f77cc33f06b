"""Turning observations and model predictions into pictures: RGB frames, image grids, GIFs and line plots.

Everything here works on the world model's *preprocessed* image space, ``[*, C, H, W]`` floats in [-0.5, 0.5]
(what :meth:`WorldModel.decode` predicts and ``encoder.preprocess`` produces):

* one channel renders as grayscale, three channels as RGB;
* any other channel count (MinAtar's boolean object grids, e.g. Breakout's paddle / ball / trail / brick) renders as
  a colour image: channel c gets a fixed palette colour, scaled by its intensity, and overlapping channels take the
  brightest colour. Small images are upscaled with nearest-neighbour pixels.
"""

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CONTEXT_COLOUR = (40, 160, 60)  # observed steps (the posterior saw the frame)
IMAGINED_COLOUR = (200, 40, 40)  # imagined steps (open loop, prior only)


def channel_palette(channels: int) -> np.ndarray:
    """A distinct RGB colour per channel: ``[C, 3]`` floats in [0, 1]."""
    cmap = matplotlib.colormaps["tab10" if channels <= 10 else "hsv"]
    return np.array([cmap(i if channels <= 10 else i / channels)[:3] for i in range(channels)])


def default_scale(height: int, width: int, target: int = 48) -> int:
    """Integer upscaling factor bringing the larger side to about ``target`` pixels (at least 1)."""
    return max(1, target // max(height, width))


def to_rgb(images: np.ndarray, scale: int | None = None) -> np.ndarray:
    """Preprocessed images ``[*, C, H, W]`` (values in [-0.5, 0.5]) to ``uint8`` RGB ``[*, H·s, W·s, 3]``."""
    images = np.asarray(images, dtype=np.float32)
    batch, (channels, height, width) = images.shape[:-3], images.shape[-3:]
    intensity = np.clip(images + 0.5, 0.0, 1.0).reshape(-1, channels, height, width)  # [N, C, H, W]
    if channels == 1:
        rgb = np.repeat(intensity, 3, axis=1)
    elif channels == 3:
        rgb = intensity
    else:
        palette = channel_palette(channels)  # [C, 3]
        rgb = (intensity[:, :, None] * palette[None, :, :, None, None]).max(axis=1)  # [N, 3, H, W]
    rgb = rgb.transpose(0, 2, 3, 1)  # [N, H, W, 3]
    s = default_scale(height, width) if scale is None else scale
    if s > 1:
        rgb = rgb.repeat(s, axis=1).repeat(s, axis=2)
    return (rgb * 255).round().astype(np.uint8).reshape(*batch, height * s, width * s, 3)


def error_rgb(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Per-pixel absolute error of two RGB renders, as a ``uint8`` RGB image of the same shape."""
    return np.abs(truth.astype(np.int16) - prediction.astype(np.int16)).astype(np.uint8)


def image_grid(rows: Sequence[np.ndarray], pad: int = 2, markers: Sequence[tuple[int, int, int]] | None = None) -> np.ndarray:
    """Tile rows of frames into one picture.

    :param rows: each ``[n_columns, h, w, 3]`` ``uint8`` (all the same shape)
    :param pad: white pixels between cells
    :param markers: optional RGB colour per column, drawn as a ``pad``-high bar above the first row
    :return: ``uint8`` ``[top + n_rows·(h + pad), n_columns·(w + pad), 3]`` with ``top = pad`` if markers else 0
    """
    n_columns, h, w = rows[0].shape[:3]
    top = pad if markers is not None else 0
    grid = np.full((top + len(rows) * (h + pad), n_columns * (w + pad), 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c in range(n_columns):
            y, x = top + r * (h + pad), c * (w + pad)
            grid[y : y + h, x : x + w] = row[c]
    if markers is not None:
        for c, colour in enumerate(markers):
            grid[:top, c * (w + pad) : c * (w + pad) + w] = colour
    return grid


def save_png(image: np.ndarray, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path, optimize=True)
    return path


def with_progress_bar(frames: np.ndarray, colours: Sequence[tuple[int, int, int]] | None = None,
                      height: int = 3) -> np.ndarray:
    """Append a bar under each frame showing how far the animation is (also keeps GIF frames distinct).

    :param frames: ``[T, h, w, 3]`` ``uint8``
    :param colours: bar colour per frame (default gray)
    :return: ``[T, h + height, w, 3]``
    """
    n, h, w = frames.shape[:3]
    out = np.full((n, h + height, w, 3), 255, dtype=np.uint8)
    out[:, :h] = frames
    for t in range(n):
        filled = max(1, round(w * (t + 1) / n))
        out[t, h:, :filled] = colours[t] if colours is not None else (90, 90, 90)
    return out


def save_gif(frames: np.ndarray, path: str, fps: float = 5.0) -> str:
    """Write ``[T, h, w, 3]`` ``uint8`` frames as a looping GIF (frames are kept even when identical)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0, optimize=False,
                   disposal=1)
    return path


def gif_frame_count(path: str) -> int:
    with Image.open(path) as image:
        return int(getattr(image, "n_frames", 1))


def plot_curves(x: np.ndarray, curves: dict[str, np.ndarray], path: str, xlabel: str, ylabel: str, title: str = "",
                vline: float | None = None) -> str:
    """A small line plot of one or more curves (NaNs leave gaps)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=80)
    for label, y in curves.items():
        ax.plot(x, y, marker=".", label=label)
    if vline is not None:
        ax.axvline(vline, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_heatmap(values: np.ndarray, path: str, xlabel: str, ylabel: str, title: str = "", cmap: str = "viridis",
                 symmetric: bool = False) -> str:
    """A 2-D array as a heatmap with a colour bar (``symmetric`` centres a diverging map on 0)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(min(10, 2 + 0.25 * cols), min(10, 1.5 + 0.25 * rows)), dpi=80)
    limit = float(np.nanmax(np.abs(values))) if symmetric and values.size else None
    image = ax.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest",
                      vmin=-limit if limit else None, vmax=limit if limit else None)
    fig.colorbar(image, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
