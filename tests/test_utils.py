"""Unit tests of utils.py: losses and penalties against hand-computed values, EMA, learning-rate
schedules, checkpoints (round trip, atomic write, pruning, safe loading), grids and plots."""
import math
import resource
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import losses
import ops
import utils
from utils import UserError


def softplus(x):
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------------------
def linear_critic(a):
    return lambda x: (a * x).sum(dim=(1, 2, 3))


@pytest.mark.parametrize("scale", [0.3, 2.5])
def test_gradient_penalty_linear_critic(scale):
    torch.manual_seed(0)
    a = torch.randn(1, 2, 3, 3)
    a = a / a.norm() * scale  # ||a|| == scale exactly
    real, fake = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    gp = losses.gradient_penalty(linear_critic(a), real, fake)
    assert gp.item() == pytest.approx((scale - 1) ** 2, rel=1e-5, abs=1e-7)


def test_gradient_penalty_hand_computed_and_differentiable():
    a = torch.tensor([3.0, 4.0]).reshape(1, 1, 1, 2).requires_grad_(True)  # ||a|| = 5
    real, fake = torch.zeros(3, 1, 1, 2), torch.ones(3, 1, 1, 2)
    gp = losses.gradient_penalty(linear_critic(a), real, fake)
    assert gp.item() == pytest.approx(16.0, rel=1e-6)
    gp.backward()  # d/da (||a|| - 1)^2 = 2 (||a|| - 1) a / ||a||
    assert torch.allclose(a.grad.flatten(), 2 * 4 * torch.tensor([3.0, 4.0]) / 5, atol=1e-5)


def test_gradient_penalty_evaluated_between_real_and_fake():
    """A critic whose gradient depends on x: f(x) = 0.5 * sum(x^2) -> grad = x_hat; with real == fake
    the interpolation is exactly that point whatever alpha is."""
    x = torch.full((4, 1, 2, 2), 0.25)  # ||x_hat|| = 0.5
    gp = losses.gradient_penalty(lambda v: 0.5 * v.square().sum(dim=(1, 2, 3)), x, x.clone())
    assert gp.item() == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_r1_penalty_linear_critic(scale):
    torch.manual_seed(1)
    a = torch.randn(1, 1, 4, 4)
    a = a / a.norm() * scale
    real = torch.randn(6, 1, 4, 4, requires_grad=True)
    r1 = losses.r1_penalty(linear_critic(a)(real), real)
    assert r1.item() == pytest.approx(scale**2, rel=1e-5)


def _linear_synthesis(n, num_ws=3, w_dim=4, c=1, h=4, w=4, seed=0, trainable=False):
    """img = ws @ M summed over layers: the synthesis' Jacobian is M, known exactly."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(w_dim, c, h, w, generator=g).requires_grad_(trainable)
    ws = torch.randn(n, num_ws, w_dim, generator=g).requires_grad_(True)
    img = torch.einsum("nkd,dchw->nchw", ws, M)
    return img, ws, M


def test_path_length_penalty_linear_synthesis():
    img, ws, M = _linear_synthesis(4, trainable=True)
    pl_mean, decay = torch.tensor(0.7), 0.3
    torch.manual_seed(123)
    penalty, new_mean = losses.path_length_penalty(img, ws, pl_mean, decay)
    # reproduce the noise the function drew, then the Jacobian-vector product by hand
    torch.manual_seed(123)
    noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    grad = torch.einsum("nchw,dchw->nd", noise, M.detach())  # the same for every one of the num_ws layers
    lengths = grad.norm(dim=1)
    expected_mean = 0.7 + decay * (lengths.mean() - 0.7)
    assert new_mean.item() == pytest.approx(expected_mean.item(), rel=1e-5)
    assert penalty.item() == pytest.approx((lengths - expected_mean).square().mean().item(), rel=1e-4)
    assert not new_mean.requires_grad  # the running mean must not carry the graph
    assert penalty.requires_grad  # but the penalty must reach the synthesis weights
    penalty.backward()
    assert M.grad is not None and M.grad.abs().sum() > 0


def test_path_length_penalty_zero_when_lengths_equal_new_mean():
    img, ws, _ = _linear_synthesis(1, seed=4)
    torch.manual_seed(7)
    _, length = losses.path_length_penalty(img, ws, torch.tensor(0.0), 1.0)  # decay 1: new mean = length
    assert length.item() > 0
    torch.manual_seed(7)  # the same noise, running mean already at that length
    penalty, new_mean = losses.path_length_penalty(img, ws, length.clone(), 0.25)
    assert new_mean.item() == pytest.approx(length.item(), rel=1e-6)
    assert penalty.item() == pytest.approx(0.0, abs=1e-10)
    torch.manual_seed(7)  # and a running mean away from it gives a positive penalty
    penalty2, _ = losses.path_length_penalty(img, ws, length * 2, 0.25)
    assert penalty2.item() == pytest.approx((0.75 * length.item()) ** 2, rel=1e-4)


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------
REAL = torch.tensor([1.0, 2.0, 3.0])
FAKE = torch.tensor([-1.0, 0.5])


def test_d_wgan_loss_with_drift():
    expected = (-0.25) - 2.0 + 0.01 * (1 + 4 + 9) / 3
    assert losses.d_wgan_loss(REAL, FAKE, 0.01).item() == pytest.approx(expected, rel=1e-6)
    assert losses.d_wgan_loss(REAL, FAKE, 0.0).item() == pytest.approx(-2.25, rel=1e-6)


def test_g_wgan_loss():
    assert losses.g_wgan_loss(FAKE).item() == pytest.approx(0.25, rel=1e-6)


def test_d_logistic_loss():
    expected = (softplus(-1.0) + softplus(0.5)) / 2 + (softplus(-1.0) + softplus(-2.0) + softplus(-3.0)) / 3
    assert losses.d_logistic_loss(REAL, FAKE).item() == pytest.approx(expected, rel=1e-6)


def test_g_nonsaturating_loss():
    expected = (softplus(1.0) + softplus(-0.5)) / 2
    assert losses.g_nonsaturating_loss(FAKE).item() == pytest.approx(expected, rel=1e-6)


def test_logistic_losses_are_stable_for_large_scores():
    big = torch.tensor([100.0, -100.0])
    assert torch.isfinite(losses.d_logistic_loss(big, big))
    assert losses.g_nonsaturating_loss(torch.tensor([-100.0])).item() == pytest.approx(100.0, rel=1e-6)


# ---------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,kimg", [(32, 10.0), (16, 0.5), (64, 2.0)])
def test_ema_beta_half_life(batch, kimg):
    beta = utils.ema_beta(batch, kimg, 0.0, nimg=0)
    assert beta ** (kimg * 1000 / batch) == pytest.approx(0.5, rel=1e-9)


def test_ema_beta_rampup():
    full = utils.ema_beta(32, 10.0, 0.0, nimg=1000)
    early = utils.ema_beta(32, 10.0, 0.05, nimg=1000)  # half-life capped at 50 images
    assert early < full
    assert early ** (50 / 32) == pytest.approx(0.5, rel=1e-9)
    late = utils.ema_beta(32, 10.0, 0.05, nimg=10**9)  # cap no longer binds
    assert late == pytest.approx(full, rel=1e-12)
    assert utils.ema_beta(32, 10.0, 0.05, nimg=0) == pytest.approx(0.0, abs=1e-12)  # first step copies


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)


def test_ema_update_lerps_params_and_copies_buffers():
    torch.manual_seed(0)
    ema, model = _Net(), _Net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.norm.running_mean.copy_(torch.tensor([5.0, -5.0]))
        model.norm.num_batches_tracked.fill_(7)
    before = [p.detach().clone() for p in ema.parameters()]
    target = [p.detach().clone() for p in model.parameters()]
    beta = 0.75
    utils.ema_update(ema, model, beta)
    for e, b, t in zip(ema.parameters(), before, target):
        assert torch.allclose(e, beta * b + (1 - beta) * t, atol=1e-6)
    for p, t in zip(model.parameters(), target):
        assert torch.equal(p, t)  # the trained model is untouched
    assert torch.equal(ema.norm.running_mean, torch.tensor([5.0, -5.0]))
    assert ema.norm.num_batches_tracked.item() == 7


def test_ema_update_works_on_generator():
    import modules
    torch.manual_seed(0)
    kw = dict(z_dim=8, w_dim=8, mapping_layers=1, resolution=32, img_channels=1, channel_base=128, channel_max=8)
    G, G_ema = modules.Generator(**kw), modules.Generator(**kw)
    G.mapping.w_avg.fill_(3.0)
    utils.ema_update(G_ema.requires_grad_(False), G, 0.0)  # beta 0: a plain copy
    for a, b in zip(G_ema.state_dict().values(), G.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------
def lr_cfg(**kw):
    base = dict(lr_schedule="constant", lr_cycle_steps=100, lr_cycle_min=0.1, lr_step_epochs=10, lr_step_factor=0.5)
    base.update(kw)
    return SimpleNamespace(**base)


def test_lr_factor_constant():
    cfg = lr_cfg()
    assert {utils.lr_factor(cfg, s, e) for s, e in [(0, 0), (1234, 7), (10**6, 999)]} == {1.0}


def test_lr_factor_cyclic():
    cfg = lr_cfg(lr_schedule="cyclic", lr_cycle_steps=100, lr_cycle_min=0.1)
    f = lambda step: utils.lr_factor(cfg, step, 0)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(50) == pytest.approx(0.55)
    assert f(100) == pytest.approx(1.0)
    assert f(150) == pytest.approx(0.55)
    assert f(200) == pytest.approx(0.1)
    assert f(300) == pytest.approx(1.0)
    values = [f(s) for s in range(0, 401)]
    assert min(values) == pytest.approx(0.1) and max(values) == pytest.approx(1.0)


def test_lr_factor_step():
    cfg = lr_cfg(lr_schedule="step", lr_step_epochs=10, lr_step_factor=0.5)
    assert utils.lr_factor(cfg, 0, 0) == 1.0
    assert utils.lr_factor(cfg, 999, 9) == 1.0
    assert utils.lr_factor(cfg, 999, 10) == pytest.approx(0.5)
    assert utils.lr_factor(cfg, 999, 25) == pytest.approx(0.25)
    assert utils.lr_factor(cfg, 0, 30) == pytest.approx(0.125)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
class NotAllowed:
    """An arbitrary Python object: a weights_only load must refuse it."""

    def __init__(self):
        self.x = 1


def sample_state(step=0):
    return dict(model_args=dict(G=dict(z_dim=8, resolution=32), D=dict(channels=(1, 2))), G_ema={}, config={},
                class_names=[], nimg=0, history={}, step=step, weights=torch.arange(6.0).reshape(2, 3),
                nested=dict(a=dict(b=torch.tensor([1, 2, 3]), c=[1.5, "x"])), pair=(0.0, 0.99),
                name="run", flag=True)


def test_checkpoint_round_trip(tmp_path):
    state = sample_state(5)
    path = utils.save_checkpoint(state, utils.checkpoint_path(tmp_path / "Models", 5))
    assert path.name == "checkpoint_00000005.pt"
    loaded, loaded_path = utils.load_checkpoint(path)
    assert loaded_path == path
    assert torch.equal(loaded["weights"], state["weights"])
    assert torch.equal(loaded["nested"]["a"]["b"], state["nested"]["a"]["b"])
    assert loaded["nested"]["a"]["c"] == [1.5, "x"]
    assert loaded["pair"] == (0.0, 0.99) and isinstance(loaded["pair"], tuple)
    assert loaded["model_args"] == state["model_args"]
    assert loaded["name"] == "run" and loaded["flag"] is True and loaded["step"] == 5
    assert list(path.parent.glob("*.tmp")) == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint_00000005.pt"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way must leave the previous file at the same path intact."""
    path = utils.checkpoint_path(tmp_path, 1)
    utils.save_checkpoint(sample_state(1), path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(utils.torch, "save", broken_save)
    with pytest.raises(UserError, match="disk full"):
        utils.save_checkpoint(sample_state(2), path)
    monkeypatch.undo()
    loaded, _ = utils.load_checkpoint(path)
    assert loaded["step"] == 1


def test_checkpoint_keep_prunes_oldest(tmp_path):
    models, kept = tmp_path / "Models", []
    for step in (1, 20, 300):
        path = utils.save_checkpoint(sample_state(step), utils.checkpoint_path(models, step))
        kept = utils.prune_checkpoints(kept + [path], 2)
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_00000020.pt", "checkpoint_00000300.pt"]
    other = models / "notes.txt"
    other.write_text("keep me")
    path = utils.save_checkpoint(sample_state(4000), utils.checkpoint_path(models, 4000))
    utils.prune_checkpoints(kept + [path], 1)
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_00004000.pt", "notes.txt"]


def test_checkpoint_keep_zero_keeps_all(tmp_path):
    paths = [utils.save_checkpoint(sample_state(step), utils.checkpoint_path(tmp_path, step)) for step in range(4)]
    assert utils.prune_checkpoints(paths, 0) == paths
    assert len(utils.list_checkpoints(tmp_path)) == 4


def test_load_checkpoint_folder_picks_newest_by_step(tmp_path):
    for step in (9, 100, 11):  # 100 is newest although "9" sorts after "1" as text without padding
        utils.save_checkpoint(sample_state(step), utils.checkpoint_path(tmp_path, step))
    state, path = utils.load_checkpoint(tmp_path)
    assert state["step"] == 100
    assert path.name == "checkpoint_00000100.pt"


def test_load_checkpoint_errors_name_the_file(tmp_path):
    garbage = tmp_path / "checkpoint_00000001.pt"
    garbage.write_bytes(b"this is not a checkpoint \x00\x01\x02" * 10)
    with pytest.raises(UserError) as e:
        utils.load_checkpoint(garbage)
    assert str(garbage) in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError) as e:  # via the folder too
        utils.load_checkpoint(tmp_path)
    assert str(garbage) in str(e.value)
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError) as e:
        utils.load_checkpoint(missing)
    assert str(missing) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        utils.load_checkpoint(empty)
    assert str(empty) in str(e.value)


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(dict(model_args={}, payload=NotAllowed()), path)
    with pytest.raises(UserError) as e:
        utils.load_checkpoint(path)
    assert str(path) in str(e.value)


def test_load_checkpoint_refuses_foreign_state(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(UserError) as e:
        utils.load_checkpoint(path)
    assert str(path) in str(e.value)


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


def test_keep_freed_memory_reuses_a_large_freed_block_without_paging_it_in_again():
    if not ops.keep_freed_memory():
        pytest.skip("not glibc's malloc")
    torch.empty(2**24).fill_(1)  # 64 MB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24 - 2**20).fill_(1)  # 60 MB fit into it
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1000  # a fresh block: 15,360 pages
