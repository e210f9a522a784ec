"""Adaptive discriminator augmentation: the differentiable pipeline, the overfitting heuristic and
the adaptation of p, and p through checkpoints."""
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_user_error, smoke

import checkpoints
import losses
import settings
import train
import training
from augment import AugmentPipe, AugmentProbability, ada_update


def images(n=8, size=16, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def test_p_zero_is_the_identity():
    x = images()
    assert AugmentPipe()(x, 0.0) is x


@pytest.mark.parametrize("channels", [1, 3])
def test_p_one_changes_every_image_and_keeps_the_shape(channels):
    torch.manual_seed(0)
    x = images(channels=channels)
    y = AugmentPipe()(x, 1.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert all(not torch.allclose(a, b) for a, b in zip(x, y))


def test_more_p_leaves_fewer_images_untouched():
    torch.manual_seed(0)
    x = images(n=400, size=8)
    untouched = {p: sum(torch.equal(a, b) for a, b in zip(x, AugmentPipe()(x, p))) for p in (0.02, 0.2)}
    # 7 independent chances of a change per image (the rotations share one): (1 - p)^7 of them untouched
    assert untouched[0.02] / 400 == pytest.approx(0.98 ** 7, abs=0.08)
    assert untouched[0.2] / 400 == pytest.approx(0.8 ** 7, abs=0.06)


def test_augmentation_is_differentiable():
    pipe = AugmentPipe()

    def f(x):
        torch.manual_seed(1)  # the same random transforms on every call
        return pipe(x, 0.9)

    x = images(n=3, size=8).double().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,))
    f(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ada_update_moves_p_toward_less_overfitting():
    step = 32 / (100 * 1000)
    assert ada_update(0.5, 0.9, 0.6, 32, 100) == pytest.approx(0.5 + step)  # D too sure of reals
    assert ada_update(0.5, 0.3, 0.6, 32, 100) == pytest.approx(0.5 - step)
    assert ada_update(0.5, 0.6, 0.6, 32, 100) == 0.5
    assert ada_update(0.0, -1.0, 0.6, 32, 100) == 0.0 and ada_update(1.0, 1.0, 0.6, 32, 100) == 1.0


def test_overfitting_sign():
    real, fake = torch.tensor([2.5, 1.0, -1.0, 3.0]), torch.tensor([1.5, 2.5])
    assert losses.Objective("logistic").real_sign(real, fake).item() == 0.5  # sign(D(real)): 3 of 4 positive
    assert losses.Objective("wgan-gp").real_sign(real, fake).item() == 0.0  # vs the mean fake score 2: 2 above, 2 below


def test_p_rises_when_d_is_overconfident_on_reals():
    aug = AugmentProbability("ada", 0.0, target=0.6, interval=4, batch_size=16, ada_kimg=1.0)
    for _ in range(3):
        aug.update(0.95)
    assert aug.p == 0.0 and len(aug.signs) == 3  # adjusted every ADA_INTERVAL iterations
    aug.update(0.95)
    assert aug.p == pytest.approx(4 * 16 / 1000) and aug.signs == []
    for _ in range(8):
        aug.update(0.1)  # D no longer overfits: p falls back
    assert aug.p == 0.0
    fixed = AugmentProbability("fixed", 0.3, interval=1)
    fixed.update(1.0)
    fixed.load_state_dict({"augment_p": 0.9, "ada_signs": []})
    assert fixed.p == 0.3  # a fixed p is the setting's, before and after a resume
    aug.update(0.95)
    resumed = AugmentProbability("ada", 0.0, interval=4)
    resumed.load_state_dict(aug.state_dict())
    assert (resumed.p, resumed.signs) == (aug.p, aug.signs) and AugmentProbability("none", 0.5).p == 0.0


def test_ada_training_logs_p_and_resumes_with_it(data, tmp_path):
    """p adapts during training, is logged, and a resumed run continues it bit for bit (CPU)."""
    flags = ["--augment", "ada", "--ada-kimg", "0.2", "--ada-target", "0.0", "--loss", "logistic", "--device", "cpu"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(smoke(data, straight, "--max-steps", "10", *flags)) == 0
    assert train.main(smoke(data, split, "--max-steps", "6", *flags)) == 0
    assert train.main(["--resume", "--out-dir", str(split), "--max-steps", "10"]) == 0
    a, _ = checkpoints.load_checkpoint(straight / "Models")
    b, _ = checkpoints.load_checkpoint(split / "Models")
    p = a["history"]["aug_p"]
    assert p[0] == 0 and p.max() > 0 and a["augment_p"] == pytest.approx(p[-1].item())  # it moved, and is saved
    assert a["augment_p"] == b["augment_p"] and a["ada_signs"] == b["ada_signs"]
    assert torch.equal(a["history"]["aug_p"], b["history"]["aug_p"])
    assert all(torch.equal(a["G"][k], b["G"][k]) for k in a["G"])


def test_fixed_augmentation_keeps_p(data, tmp_path):
    assert train.main(smoke(data, tmp_path, "--max-steps", "3", "--augment", "fixed", "--augment-p", "0.3",
                            "--eval-every", "0")) == 0
    state, _ = checkpoints.load_checkpoint(tmp_path / "Models")
    assert state["history"]["aug_p"].tolist() == pytest.approx([0.3] * 3)
    assert (tmp_path / "saved_examples" / "32x32" / "losses.png").is_file()


@pytest.mark.parametrize("flag,value", [("--augment", "always"), ("--augment-p", "1.5"), ("--ada-target", "-0.1")])
def test_bad_augmentation_settings(data, tmp_path, capsys, flag, value):
    code = train.main(smoke(data, tmp_path, flag, value))
    assert_user_error(capsys, code, flag)


def test_every_image_d_sees_is_augmented():
    """Reals and fakes in the D step (one pass), the penalty's inputs, and G's fakes (with their gradients)."""
    cfg = settings.resolve_settings({"AUGMENT": "fixed", "AUGMENT_P": 0.5, "D_REG_INTERVAL": 1, "PL_INTERVAL": 1,
                                  "BATCH_SIZE": 8, "DEVICE": "cpu"}, "", "smoke")
    data = SimpleNamespace(images=torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8),
                           labels=torch.zeros(16, dtype=torch.long), class_names=["AD", "NC"], channels=1)
    run = training.build_run(cfg, data, torch.device("cpu"))
    calls, pipe = [], run.augment
    run.augment = lambda x, p: calls.append((len(x), p, x.requires_grad)) or pipe(x, p)
    training.train_step(run, cfg, data, torch.arange(8))
    assert [(n, p) for n, p, _ in calls] == [(16, 0.5), (8, 0.5), (8, 0.5)]  # real + fake, GP interpolates, G's fakes
    assert [g for _, _, g in calls] == [False, True, True]
