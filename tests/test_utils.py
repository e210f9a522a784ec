"""utils.py: image grids, GIFs, loss plots, and the JSON-lines logs (a line cut short by a killed run is
skipped)."""
import errno
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import utils
from utils import append_jsonl, read_jsonl


# ---------------------------------------------------------------------------------------
# Images and plots
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_save_grid_size_and_values(tmp_path, channels):
    images = torch.stack([torch.full((channels, 4, 5), v) for v in (-1.0, 1.0, 0.0)])
    path = tmp_path / "sub" / "grid.png"
    utils.save_grid(images, path, ncol=8, pad=2)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.mode == ("L" if channels == 1 else "RGB")
        assert img.size == (3 * (5 + 2) + 2, 1 * (4 + 2) + 2)  # (width, height)
        arr = np.asarray(img)
    arr = arr if arr.ndim == 3 else arr[..., None]
    assert (arr[2:6, 2:7] == 0).all()  # -1 -> 0
    assert (arr[2:6, 9:14] == 255).all()  # 1 -> 255
    assert (arr[2:6, 16:21] == 128).all()  # 0 -> 127.5 rounds to 128
    assert (arr[:2] == 0).all() and (arr[:, :2] == 0).all()  # padding


def test_save_grid_wraps_rows_and_clamps(tmp_path):
    images = torch.linspace(-3, 3, 10).reshape(10, 1, 1, 1).expand(10, 1, 3, 3)
    path = tmp_path / "grid.png"
    utils.save_grid(images, path, ncol=4, pad=1)
    with Image.open(path) as img:
        assert img.size == (4 * 4 + 1, 3 * 4 + 1)
        arr = np.asarray(img)
    assert arr[1, 1] == 0 and arr[3 * 4 - 3, 2 * 4 - 3] == 255  # image 0 clamps low, image 9 high
    assert (arr[9:12, 9:12] == 0).all()  # slot 10 is empty


def test_save_image_grayscale_and_rgb(tmp_path):
    utils.save_image(torch.full((1, 6, 7), 1.0), tmp_path / "g.png")
    utils.save_image(torch.full((3, 6, 7), -1.0), tmp_path / "c.png")
    with Image.open(tmp_path / "g.png") as g, Image.open(tmp_path / "c.png") as c:
        assert (g.mode, g.size) == ("L", (7, 6))
        assert (c.mode, c.size) == ("RGB", (7, 6))
        assert np.asarray(g).min() == 255 and np.asarray(c).max() == 0


def test_smooth_ignores_nan():
    out = utils.smooth([1.0, float("nan"), 3.0, float("nan"), 5.0], 3)
    assert out.shape == (5,)
    assert np.allclose(out, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert np.allclose(utils.smooth([2.0, 4.0, 6.0], 1), [2.0, 4.0, 6.0])


def test_plot_losses_writes_png(tmp_path):
    n = 120
    history = dict(loss_gen=list(np.sin(np.arange(n))), loss_critic=[float("nan") if i % 4 else -1.0 * i
                                                                        for i in range(n)], gp=[1.0] * n)
    path = tmp_path / "plots" / "losses.png"
    utils.plot_losses(history, path)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 100 and img.size[1] > 100
    with warnings.catch_warnings():  # matplotlib warns about an empty legend
        warnings.simplefilter("ignore")
        utils.plot_losses({}, tmp_path / "empty.png")  # a run with no history yet still plots
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_a_cut_line_is_skipped_when_read_and_the_next_line_starts_afresh(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text('{"kimg": 4.0, "nimg": 4000}\n{"kimg": 8.0, "ni')
    assert read_jsonl(path) == [{"kimg": 4.0, "nimg": 4000}]
    append_jsonl({"kimg": 8.0, "nimg": 8000, "gp": float("nan")}, path)  # the resumed run's next tick
    assert read_jsonl(path) == [{"kimg": 4.0, "nimg": 4000}, {"kimg": 8.0, "nimg": 8000, "gp": None}]


def test_save_gif_bounces(tmp_path):
    frames = torch.linspace(-1, 1, 4)[:, None, None, None, None].expand(4, 2, 1, 8, 8)  # 4 frames of 2 tiles
    utils.save_gif(frames, tmp_path / "a.gif", ncol=2)
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 6  # 0 1 2 3 2 1
        levels = []
        for i in range(gif.n_frames):
            gif.seek(i)
            levels.append(int(np.asarray(gif.convert("L"))[4, 4]))
    assert levels == [levels[0], levels[1], levels[2], levels[3], levels[2], levels[1]]
    assert levels[0] < levels[1] < levels[2] < levels[3]


def full_disk(after=10):
    """A write that puts `after` bytes on disk, then fails as a full disk does."""
    def write(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"x" * after)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


@pytest.mark.parametrize("writer", ["grid", "image", "gif", "figure", "json", "text"])
def test_a_failed_write_leaves_no_file_and_names_the_path(tmp_path, monkeypatch, writer):
    """Every writer goes through atomic_path: the target is never a truncated or empty file."""
    import matplotlib.figure
    from PIL import Image as PILImage
    monkeypatch.setattr(PILImage.Image, "save", full_disk())
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk())
    monkeypatch.setattr(Path, "write_text", lambda self, text: full_disk()(self, self))
    images = torch.zeros(2, 1, 4, 4)
    path = tmp_path / "out" / ("result." + {"gif": "gif", "json": "json", "text": "md"}.get(writer, "png"))
    write = {"grid": lambda: utils.save_grid(images, path), "image": lambda: utils.save_image(images[0], path),
             "gif": lambda: utils.save_gif(images[None].repeat(3, 1, 1, 1, 1), path),
             "figure": lambda: utils.plot_losses({"loss_gen": [1.0, 2.0]}, path),
             "json": lambda: utils.save_json({"a": 1}, path), "text": lambda: utils.save_text("| a |", path)}[writer]
    with pytest.raises(OSError) as e:
        write()
    assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor a temporary one


def test_a_failed_log_line_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "stats.jsonl"
    append_jsonl({"kimg": 1}, path)
    before = path.read_bytes()
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def write(self, data):
            self.f.write(data[:5])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda *a, **k: Full(real_open(*a, **k)))
    with pytest.raises(OSError) as e:
        append_jsonl({"kimg": 2}, path)
    monkeypatch.undo()
    assert e.value.filename == str(path) and path.read_bytes() == before
