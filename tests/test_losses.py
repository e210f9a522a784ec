"""losses.py: the losses and penalties against hand-computed values (WGAN with drift, logistic,
gradient penalty between real and fake, R1, path length, mode seeking)."""
import math

import pytest
import torch

import losses


def softplus(x):
    return math.log1p(math.exp(x))


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
