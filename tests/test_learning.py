"""The GAN learns: a short run on a tiny synthetic distribution (one bright square at a random
position on a black 32x32 image) must move the generated images much closer to that
distribution than they were at step 0, by two measured statistics."""
import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import losses
import sampling
import train

STEPS = 200
SIDE = 10


def make_squares(folder, n=256, res=32, side=SIDE, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        a = np.zeros((res, res), np.uint8)
        x, y = rng.integers(0, res - side, 2)
        a[y:y + side, x:x + side] = 255
        Image.fromarray(a).save(folder / f"{i:04d}.png")


def pixel_w1(fake, real):
    """1-D Wasserstein distance between the pixel-value distributions."""
    q = np.linspace(0, 1, 4096)
    return float(np.abs(np.quantile(fake.numpy(), q) - np.quantile(real.numpy(), q)).mean())


def mean_image_l1(fake, real):
    """Mean absolute difference of the average images (where the squares can be)."""
    return float((fake.mean(0) - real.mean(0)).abs().mean())


def distances(checkpoint_dir, real):
    state, _ = checkpoints.load_checkpoint(checkpoint_dir)
    G = checkpoints.load_generator(state, torch.device("cpu"))
    z = torch.randn(512, G.z_dim, generator=torch.Generator().manual_seed(123))
    fake = sampling.images_from_latents(G, z, None, 1.0, "random", 256, torch.device("cpu"))
    return pixel_w1(fake, real), mean_image_l1(fake, real)


def train_squares(tmp_path, steps):
    """(pixel W1, mean-image L1) of the newest checkpoint after `steps` iterations (one is written every
    epoch), and whether the run stopped on a non-finite loss first."""
    data = tmp_path / "squares"
    if not data.exists():
        make_squares(data)
    out = tmp_path / f"run{steps}"
    argv = ["--preset", "smoke", "--data-root", str(data), "--out-dir", str(out), "--epochs", "1000",
            "--sample-every", "1000", "--checkpoint-every", "1", "--keep-checkpoints", "1", "--eval-every", "0",
            "--seed", "1"]
    # --max-steps 0 means no limit, so step 0 is a 1-step run with zero learning rate
    extra = ["--max-steps", str(steps)] if steps else ["--max-steps", "1", "--g-lr", "0", "--d-lr", "0"]
    code = train.main(argv + extra)
    assert code in (0, 1)  # 1: stopped on a non-finite loss, the last epoch's checkpoint kept
    real = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in sorted(data.glob("*.png"))]))
    return distances(out / "Models", real.float()[:, None] / 127.5 - 1), code == 1


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return train_squares(tmp_path_factory.mktemp("learn"), 0)[0]


def test_generator_learns_the_distribution(tmp_path, start):
    w1_0, l1_0 = start
    (w1, l1), diverged = train_squares(tmp_path, STEPS)
    assert not diverged
    print(f"pixel W1 {w1_0:.3f} -> {w1:.3f}; mean-image L1 {l1_0:.3f} -> {l1:.3f}")
    assert w1 < 0.6 * w1_0
    assert l1 < 0.6 * l1_0


def test_wrong_generator_loss_sign_does_not_learn(tmp_path, start, monkeypatch):
    """The statistics above must catch a broken loss: with the generator loss sign flipped the
    generator is pushed away from the data. The run may stop on a non-finite loss; its last
    checkpoint (the last full epoch) is measured all the same."""
    monkeypatch.setattr(losses, "g_wgan_loss", lambda fake_pred: fake_pred.mean())
    w1_0, l1_0 = start
    (w1, l1), diverged = train_squares(tmp_path, STEPS)
    print(f"flipped sign{' (diverged)' if diverged else ''}: pixel W1 {w1_0:.3f} -> {w1:.3f}; "
          f"mean-image L1 {l1_0:.3f} -> {l1:.3f}")
    assert not (w1 < 0.6 * w1_0 and l1 < 0.6 * l1_0)
