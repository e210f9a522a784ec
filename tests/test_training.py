"""The wiring of one training iteration (training.d_step, g_step, train_step): which batch each
penalty sees, the lazy-regularisation gains, the path-length mean stored back, and the gradient
penalty's interpolation between real and fake images."""
from types import SimpleNamespace

import pytest
import torch

import losses
import training
import utils

DATA = SimpleNamespace(class_names=["AD", "NC"], channels=1)


def setup(**settings):
    cfg = utils.resolve_settings({k.upper(): v for k, v in settings.items()}, "", "smoke")
    torch.manual_seed(0)
    run = training.build_run(cfg, DATA, torch.device("cpu"))
    real = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return cfg, run, real


class Recorder:
    """Wraps a function, keeping each call's arguments and result."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        result = self.fn(*args, **kwargs)
        self.calls.append((args, result))
        return result


def test_r1_is_taken_on_the_real_batch(monkeypatch):
    cfg, run, real = setup(loss="logistic", r1_gamma=1.0)
    spy = Recorder(losses.r1_penalty)
    monkeypatch.setattr(losses, "r1_penalty", spy)
    training.d_step(run, cfg, real, None, regularize=True)
    (args, _), = spy.calls
    assert torch.equal(args[1], real)


def test_the_gradient_penalty_sees_the_real_and_the_generated_batch(monkeypatch):
    cfg, run, real = setup(loss="wgan-gp")
    spy = Recorder(losses.gradient_penalty)
    monkeypatch.setattr(losses, "gradient_penalty", spy)
    training.d_step(run, cfg, real, None, regularize=True)
    (args, _), = spy.calls
    assert torch.equal(args[1], real) and args[2].shape == real.shape and not torch.allclose(args[2], real)


def test_d_scores_the_real_and_the_generated_batch_apart(monkeypatch):
    """D's main step scores both batches in one pass, with each batch's own minibatch-std groups:
    a real batch of one repeated slice must look as uniform to D as it does alone."""
    cfg, run, real = setup(loss="logistic")
    real = real[:1].repeat(8, 1, 1, 1)
    spy = Recorder(run.D.mbstd.forward)
    monkeypatch.setattr(run.D.mbstd, "forward", spy)
    training.d_step(run, cfg, real, None, regularize=False)
    out = spy.calls[-1][1]  # the outer call (its halves call forward too)
    assert out.shape[0] == 16 and (out[:8, -1] < 1e-3).all() and (out[8:, -1] > 1e-2).all()


def test_gradient_penalty_interpolates_between_real_and_fake():
    """A quadratic critic sum(x^2)/2 has gradient x: the penalty is (|x_hat| - 1)^2 at x_hat =
    alpha real + (1 - alpha) fake, with the alpha drawn first from the generator's state."""
    real, fake = torch.full((3, 1, 2, 2), 0.9), torch.full((3, 1, 2, 2), -0.2)
    torch.manual_seed(5)
    alpha = torch.rand(3, 1, 1, 1)
    torch.manual_seed(5)
    gp = losses.gradient_penalty(lambda x: x.square().sum((1, 2, 3)) / 2, real, fake)
    x_hat = alpha * real + (1 - alpha) * fake
    expected = (x_hat.flatten(1).norm(dim=1) - 1).square().mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss,weight", [("wgan-gp", "gp_lambda"), ("logistic", "r1_gamma")])
def test_the_d_penalty_gain_is_its_interval(monkeypatch, loss, weight):
    cfg, run, real = setup(loss=loss, r1_gamma=2.0, d_reg_interval=4)
    steps = Recorder(training.optimizer_step)
    monkeypatch.setattr(training, "optimizer_step", steps)
    stats = training.d_step(run, cfg, real, None, regularize=True)
    reg_loss = steps.calls[1][0][1]  # (optimiser, loss) of the penalty step
    scale = getattr(cfg, weight) / (2 if weight == "r1_gamma" else 1)  # R1 is gamma / 2 * |grad|^2
    assert reg_loss.item() == pytest.approx(stats["gp"].item() * scale * 4, rel=1e-5)


def test_the_path_length_gain_is_its_interval_and_its_mean_is_stored_back(monkeypatch):
    cfg, run, real = setup(pl_interval=4, pl_weight=2.0, pl_decay=0.01)
    steps, penalties = Recorder(training.optimizer_step), Recorder(losses.path_length_penalty)
    monkeypatch.setattr(training, "optimizer_step", steps)
    monkeypatch.setattr(training, "path_length_penalty", penalties)
    assert run.pl_mean.item() == 0
    stats = training.g_step(run, cfg, None, len(real), regularize=True)
    reg_loss = steps.calls[1][0][1]
    assert reg_loss.item() == pytest.approx(stats["plp"].item() * 2.0 * 4, rel=1e-5)
    (_, (_, new_mean)), = penalties.calls
    assert run.pl_mean.item() == new_mean.item() > 0  # moved from 0 by the decay, and kept
    training.g_step(run, cfg, None, len(real), regularize=True)
    assert penalties.calls[1][0][2].item() == new_mean.item()  # the next penalty starts from it


def test_lazy_regularisation_adam_settings():
    cfg, run, _ = setup(loss="logistic", d_reg_interval=16, pl_interval=4)
    c_d, c_g = 16 / 17, 4 / 5
    assert run.opt_D.param_groups[0]["betas"] == pytest.approx((0.0, 0.99 ** c_d))
    assert run.opt_G.param_groups[0]["betas"] == pytest.approx((0.0, 0.99 ** c_g))
    training.set_learning_rates(run, cfg)
    assert run.opt_D.param_groups[0]["lr"] == pytest.approx(cfg.d_lr * c_d)
    assert run.opt_G.param_groups[0]["lr"] == pytest.approx(cfg.g_lr * c_g)


def test_mode_seeking_pays_for_alike_pairs_and_ignores_fine_noise():
    """1 / (thumbnail distance per latent distance) over the batch's halves: pairs twice as far
    apart cost half, and noise that averages out in 16x16 thumbnails buys nothing."""
    z = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, -1.0], [2.0, 2.0]])  # pairs (0, 2) and (1, 3)
    images = torch.zeros(4, 1, 32, 32)
    images[2], images[3] = 0.5, -0.25  # |a - b| of 0.5 and 0.25, |za - zb| of 1 and 2
    expected = (1 / (0.5 / 1) + 1 / (0.25 / 2)) / 2
    assert losses.mode_seeking_penalty(images, z).item() == pytest.approx(expected, rel=1e-4)
    checker = torch.ones(32, 32)
    checker[::2, ::2] = checker[1::2, 1::2] = -1  # averages to 0 over every 2x2 block
    noisy = images + 0.3 * checker
    assert losses.mode_seeking_penalty(noisy, z).item() == pytest.approx(expected, rel=1e-4)
    assert losses.mode_seeking_penalty(images * 2, z).item() == pytest.approx(expected / 2, rel=1e-4)
    odd = torch.cat([images, images[:1] + 1]), torch.cat([z, z[:1]])  # a fifth image is left out
    assert losses.mode_seeking_penalty(*odd).item() == pytest.approx(expected, rel=1e-4)
    assert losses.mode_seeking_penalty(images[:1], z[:1]).item() == 0


def test_mode_seeking_joins_g_s_loss_with_its_weight(monkeypatch):
    """G's one optimiser step takes its loss plus weight x the penalty of that step's own batch."""
    cfg, run, real = setup(mode_seeking=0.5)
    steps, penalties = Recorder(training.optimizer_step), Recorder(losses.mode_seeking_penalty)
    scored = Recorder(training.discriminate)
    monkeypatch.setattr(training, "optimizer_step", steps)
    monkeypatch.setattr(training, "mode_seeking_penalty", penalties)
    monkeypatch.setattr(training, "discriminate", scored)
    stats = training.g_step(run, cfg, None, len(real), regularize=False)
    (args, penalty), = penalties.calls
    assert args[0].shape == real.shape and args[0].requires_grad  # the batch G is trained on
    assert args[0] is scored.calls[0][0][1]  # the very images D scored for G's loss
    (_, loss), = [call[0] for call in steps.calls]
    assert loss.item() == pytest.approx(stats["loss_gen"].item() + 0.5 * penalty.item(), rel=1e-5)
    assert stats["mode_seeking"].item() == penalty.item()
    cfg, run, real = setup()
    assert "mode_seeking" not in training.g_step(run, cfg, None, len(real), regularize=False)
