"""The files a run and the scripts write for people to read: images and image grids, GIFs, loss
and metric plots, and JSON (a file, or a JSON-lines log that grows while a run goes on), each
written whole or not at all."""
import contextlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch


# ---------------------------------------------------------------------------------------
# Every file is written whole or not at all
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` (its folder created) for the block to write; renamed over `path`
    when the block ends, removed when it fails. A failed write (disk full, no permission) raises an
    OSError naming `path`, and `path` is as it was: never a truncated or empty file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_text(text, path):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_array(path, *arrays):
    """One array as .npy, or several as .npz, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if len(arrays) == 1:
            np.save(f, arrays[0])
        else:
            np.savez(f, *arrays)


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------
def quantize_uint8(images):
    """(N, C, H, W) floats in [-1, 1] -> the same shape in uint8 [0, 255] (on the CPU), as a PNG stores them."""
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_uint8(images):
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 array."""
    return quantize_uint8(images).permute(0, 2, 3, 1).numpy()


def save_image(image, path):
    """Save one (C, H, W) image in [-1, 1] as PNG (grayscale when C == 1)."""
    with atomic_path(path) as tmp:
        _pil(to_uint8(image[None])[0]).save(tmp, format="PNG")


def grid_array(images, ncol=8, pad=2):
    """Tile (N, C, H, W) images in [-1, 1] into one (H', W', C) uint8 array with `ncol` columns."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = min(ncol, n)
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = arr[i]
    return grid


def _pil(array):
    from PIL import Image
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def save_grid(images, path, ncol=8, pad=2):
    """Tile (N, C, H, W) images in [-1, 1] into one PNG with `ncol` columns."""
    with atomic_path(path) as tmp:
        _pil(grid_array(images, ncol, pad)).save(tmp, format="PNG")


def save_gif(frames, path, ncol=8, duration_ms=120, bounce=True):
    """An animated GIF from frames (F, N, C, H, W) in [-1, 1]: each frame tiles its N images; with
    `bounce` it plays forward then back, so the loop has no jump."""
    order = list(range(len(frames))) + (list(range(len(frames) - 2, 0, -1)) if bounce else [])
    pictures = [_pil(grid_array(frames[i], ncol)) for i in order]
    with atomic_path(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0)


def save_labelled_grid(images, path, ncol, row_labels, col_labels=(), title=""):
    """A grid of (N, C, H, W) images in [-1, 1] with a label left of each row (and above each column)."""
    plt = pyplot()
    grid = grid_array(images, ncol)
    h, pad = images.shape[-2], 2
    fig, ax = plt.subplots(figsize=(2 + grid.shape[1] / 64, 0.6 + grid.shape[0] / 64))
    ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    centres = [pad + i * (h + pad) + h / 2 for i in range(max(len(row_labels), len(col_labels)))]
    ax.set_yticks(centres[:len(row_labels)], row_labels)
    ax.set_xticks(centres[:len(col_labels)], col_labels)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10, pad=20 if col_labels else 6)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    """Write a Matplotlib figure (creating its folder) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        pyplot().close(fig)


def smooth(values, window):
    """Moving average that ignores NaN (steps where a penalty was not computed)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    kernel = np.ones(window)
    num = np.convolve(np.where(ok, v, 0), kernel, mode="same")
    den = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def plot_losses(history, path, x=None, xlabel="iteration"):
    """Generator and discriminator losses per iteration (or against `x`: the kimg of stats.jsonl's
    ticks), raw (faint) and smoothed, one panel each; with augmentation, a third panel of its
    probability p and ADA's overfitting heuristic r_t."""
    plt = pyplot()
    panels = [("loss_gen", "generator loss"), ("loss_critic", "discriminator loss")]
    augmented = any(v > 0 for v in history.get("aug_p", []))
    fig, axes = plt.subplots(len(panels) + augmented, 1, figsize=(9, 6 + 2.5 * augmented), sharex=True)
    for ax, (key, title) in zip(axes, panels):
        values = np.asarray(history.get(key, []), dtype=np.float64)
        steps = np.arange(1, len(values) + 1) if x is None else np.asarray(x, dtype=np.float64)
        if len(values):
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="per iteration")
            ax.plot(steps, smooth(values, max(1, len(values) // 50)), color="tab:blue", label="smoothed")
            ax.legend(loc="upper right")
        else:  # a converted network, or a run before its first iteration
            ax.text(0.5, 0.5, "no training iterations recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_ylabel("loss")
    if augmented:
        ax = axes[-1]
        lines = (("aug_p", "p", "tab:green"), ("real_sign", "r_t = E[sign D(real)], smoothed", "tab:gray"))
        for key, label, color in lines:
            values = np.asarray(history.get(key, []), dtype=np.float64)
            if key == "real_sign" and len(values):
                values = smooth(values, max(1, len(values) // 50))
            ax.plot(np.arange(1, len(values) + 1) if x is None else np.asarray(x), values, color=color, label=label)
        ax.set_title("augmentation")
        ax.legend(loc="upper left")
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout()
    save_figure(fig, path)


def plot_metrics(metrics, path):
    """Evaluation figures over training (one panel per metric group) against thousands of images seen."""
    plt = pyplot()
    levels = sorted({k for m in metrics for k in m if k.startswith("swd_") and k[4:].isdigit()},
                    key=lambda k: -int(k[4:]))
    panels = [(["swd", *levels, "swd_heldout", *(f"{k}_heldout" for k in levels)], "sliced Wasserstein distance x1e3"),
              (["ms_ssim_fake", "ms_ssim_real", "ms_ssim_heldout"], "MS-SSIM of random pairs (diversity)"),
              (["precision", "recall", "precision_heldout", "recall_heldout", "knn_ratio"],
               "precision, recall, k-NN radius ratio"),
              (["fid"], "FID"), (["kid"], "KID"),
              (["d_real", "d_heldout", "d_fake"], "D's mean score: training reals, held-out reals, fakes")]
    panels = [(keys, title) for keys, title in panels if any(k in m for m in metrics for k in keys)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (keys, title) in zip(axes[:, 0], panels):
        for key in keys:
            points = [(m["nimg"] / 1000, m[key]) for m in metrics if m.get(key) is not None]
            if not points:
                continue
            style = (dict(linewidth=1.0, linestyle="--") if key.endswith("_heldout") and key != "d_heldout" else
                     dict(linewidth=0.8, alpha=0.6) if key in levels else dict(linewidth=1.6, marker="o"))
            ax.plot(*zip(*points), label=key, **style)
        ax.set_title(title)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("thousands of real images shown to D")
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# JSON files and logs
# ---------------------------------------------------------------------------------------
def save_json(obj, path):
    save_text(json.dumps(obj, indent=2, default=list) + "\n", path)


def append_jsonl(record, path):
    """Append `record` as one JSON line (non-finite numbers as null), flushed at once: a file that
    `tail -f` and pandas.read_json(path, lines=True) read while the run goes on."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(path, "a+b") as f:
        size = f.tell()
        cut = size > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"  # a run killed mid-line
        try:
            f.write((("\n" if cut else "") + json.dumps(clean) + "\n").encode())
            f.flush()
        except OSError as e:  # disk full: take the part-line back, so the log holds whole lines only
            f.truncate(size)
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def read_jsonl(path):
    """The records of a JSON-lines file; a line cut short (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def stats_history(lines):
    """stats.jsonl's ticks as plot_losses' (history, x): the tick means, against kimg."""
    keys = {"real_sign": "r_t"}
    history = {k: [np.nan if line.get(keys.get(k, k)) is None else line[keys.get(k, k)] for line in lines]
               for k in ("loss_gen", "loss_critic", "aug_p", "real_sign")}
    return history, [line["kimg"] for line in lines]
