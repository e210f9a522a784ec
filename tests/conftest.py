"""Shared test setup: make the flat-script modules importable and build tiny image folders."""
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The tiny test models are far too small to gain from intra-op threads, and on a 2-core machine
# shared with another busy process, 2 OpenMP threads run ~20x slower than 1 (spinning threads
# fight over the cores). Override with TEST_TORCH_THREADS=N.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))


@pytest.fixture(autouse=True)
def winograd_as_imported():
    """The scripts switch Winograd's convolution, channels-last activations and the fused convolution epilogue on
    for the CPU (module-wide settings); every test starts from the module's defaults, off."""
    import ops
    saved, layout, epilogue = dict(ops.WINOGRAD), dict(ops.LAYOUT), dict(ops.EPILOGUE)
    yield
    ops.WINOGRAD.update(saved)
    ops.LAYOUT.update(layout)
    ops.EPILOGUE.update(epilogue)


def assert_user_error(capsys, code, *needles):
    """Exit status 2, exactly one error line on stderr, mentioning each needle, no traceback.
    (tqdm progress bars, which also go to stderr and end in \\r, are not error lines.)"""
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in re.split(r"[\r\n]", err)
             if line.strip() and not line.startswith("loading images")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_images(folder, n, size=32, mode="L", seed=0, ext="png", prefix="img"):
    """Write `n` random images of `size` (int or (w, h)) into `folder`; returns their paths."""
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (h, w) if mode == "L" else (h, w, 3)
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        path = folder / f"{prefix}{i:03d}.{ext}"
        Image.fromarray(arr).convert(mode).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def tiny_images(tmp_path):
    """Factory: tiny_images(relative_folder, n, size=32, mode='L', ext='png') -> list of paths
    under this test's tmp_path."""
    def make(folder="images", n=4, size=32, mode="L", ext="png", seed=0, prefix="img"):
        return write_images(tmp_path / folder, n, size=size, mode=mode, seed=seed, ext=ext, prefix=prefix)
    return make


def write_classes(root, n=24, res=32, seed=0):
    """AD_NC-like layout with two classes of random blobs."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c, level in (("AD", 255), ("NC", 120)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                a = (rng.random((res, res - 2)) * 60).astype(np.uint8)
                x, y = rng.integers(0, res - 12, 2)
                a[y:y + 10, x:x + 10] = level
                Image.fromarray(a).save(d / f"{i}.jpeg")
    return root


QUICK = ("--eval-every", "0", "--device", "cpu")  # train.py flags for runs that need no evaluation


def steps_of(models):
    """The steps of the checkpoints in a Models/ folder, oldest first."""
    import checkpoints
    return [checkpoints.checkpoint_step(p) for p in checkpoints.list_checkpoints(models)]


def smoke(data, out, *flags):
    """train.py arguments for a smoke-preset run on `data` writing to `out`."""
    return ["--preset", "smoke", "--data-root", str(data), "--out-dir", str(out), "--batch-size", "8", *flags]


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A small AD_NC folder (train and test splits, 24 slices per class each)."""
    return write_classes(tmp_path_factory.mktemp("adni") / "AD_NC")


@pytest.fixture(scope="session")
def cond_run(data, tmp_path_factory):
    """One 2-epoch conditional smoke run (evaluated after each epoch, the smoke preset's EVAL_EVERY),
    shared by the tests that only read its outputs."""
    import train
    out = tmp_path_factory.mktemp("cond")
    assert train.main(smoke(data, out, "--epochs", "2", "--conditional")) == 0
    return out


@pytest.fixture(scope="session")
def uncond_run(data, tmp_path_factory):
    """A 4-iteration unconditional smoke run on the shared AD_NC folder (its classes ignored)."""
    import train
    out = tmp_path_factory.mktemp("uncond")
    assert train.main(smoke(data, out, "--max-steps", "4")) == 0
    return out


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """A weights file with the layout of pt_inception-2015-12-05 (random values, same keys and shapes)."""
    import metrics
    path = tmp_path_factory.mktemp("inception") / metrics.FID_WEIGHTS_FILE
    torch.manual_seed(0)
    torch.save(metrics.FIDInceptionV3().state_dict(), path)
    return path
