"""Losses and penalties, as pure functions of scores, images and latents: WGAN-GP's critic loss
with drift and gradient penalty, the non-saturating logistic loss with R1, the path-length
penalty and mode seeking. training.py applies them (d_step, g_step) with lazy regularisation."""
import math

import torch
import torch.nn.functional as F

from ops import thumbnails


def d_wgan_loss(real_pred, fake_pred, drift):
    """WGAN critic loss with a drift term that keeps real scores near zero."""
    return fake_pred.mean() - real_pred.mean() + drift * real_pred.square().mean()


def g_wgan_loss(fake_pred):
    """WGAN generator loss: -D(G(z))."""
    return -fake_pred.mean()


def d_logistic_loss(real_pred, fake_pred):
    """Non-saturating logistic discriminator loss (StyleGAN2's default)."""
    return F.softplus(fake_pred).mean() + F.softplus(-real_pred).mean()


def g_nonsaturating_loss(fake_pred):
    """Non-saturating logistic generator loss."""
    return F.softplus(-fake_pred).mean()


def gradient_penalty(critic, real, fake):
    """WGAN-GP: E[(||grad critic(x_hat)|| - 1)^2] at random points between real and fake images."""
    alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = alpha * real.detach() + (1 - alpha) * fake.detach()
    x_hat.requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def r1_penalty(real_pred, real_img):
    """R1: E[||grad D(x)||^2] on real images (`real_img` must require grad)."""
    (grad,) = torch.autograd.grad(real_pred.sum(), real_img, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def path_length_penalty(fake_img, ws, pl_mean, decay):
    """Path-length penalty: (|J^T y| - a)^2 with y random image-space noise and `a` its running mean.

    Returns (penalty, new running mean)."""
    noise = torch.randn_like(fake_img) / math.sqrt(fake_img.shape[2] * fake_img.shape[3])
    (grad,) = torch.autograd.grad((fake_img * noise).sum(), ws, create_graph=True)
    lengths = grad.square().sum(2).mean(1).sqrt()  # (N, num_ws, w_dim) -> (N,)
    new_mean = pl_mean.lerp(lengths.mean().detach(), decay)
    return (lengths - new_mean).square().mean(), new_mean


def mode_seeking_penalty(fake_img, z, size=16, eps=1e-5):
    """Mode seeking (Mao et al. 2019): the inverse of how far apart the images of two latents are
    per unit of latent distance, the batch's first half paired with its second (an odd last image
    left out; 0 for a batch of one). Images are compared as size x size thumbnails, so that
    per-pixel noise cannot buy distance."""
    n = len(z) // 2
    if n == 0:
        return fake_img.new_zeros(())
    thumbs = thumbnails(fake_img[:2 * n], size)  # (2n, C, R, R) -> (2n, C*size*size)
    ratio = (thumbs[:n] - thumbs[n:]).abs().mean(1) / (z[:n] - z[n:2 * n]).abs().mean(1)
    return (1 / (ratio + eps)).mean()


# ---------------------------------------------------------------------------------------
# The chosen objective: the loss is picked once, here
# ---------------------------------------------------------------------------------------
class Objective:
    """D's and G's losses and D's lazy penalty for one choice of loss: WGAN-GP (critic loss with
    drift, gradient penalty, optionally R1 beside it) or the non-saturating logistic loss with R1."""

    def __init__(self, loss, drift=0.0, gp_lambda=0.0, r1_gamma=0.0):
        self.wgan = loss == "wgan-gp"
        self.drift = drift
        self.gp_lambda = gp_lambda if self.wgan else 0.0
        self.r1_gamma = r1_gamma

    @staticmethod
    def from_settings(cfg):
        """The objective of a run's settings (LOSS; GP_LAMBDA, DRIFT and WGAN_R1_GAMMA, or R1_GAMMA)."""
        wgan = cfg.loss == "wgan-gp"
        return Objective(cfg.loss, cfg.drift, cfg.gp_lambda, cfg.wgan_r1_gamma if wgan else cfg.r1_gamma)

    @property
    def has_d_penalty(self):
        return self.gp_lambda > 0 or self.r1_gamma > 0

    def d_loss(self, real_pred, fake_pred):
        return d_wgan_loss(real_pred, fake_pred, self.drift) if self.wgan else d_logistic_loss(real_pred, fake_pred)

    def g_loss(self, fake_pred):
        return g_wgan_loss(fake_pred) if self.wgan else g_nonsaturating_loss(fake_pred)

    def real_sign(self, real_pred, fake_pred):
        """ADA's r_t term, E[sign(D(real))]; a WGAN critic has no fixed zero, so there the reals' scores
        are taken relative to the mean fake score."""
        zero = fake_pred.mean() if self.wgan else 0.0
        return (real_pred - zero).sign().mean().detach()

    def d_penalty(self, critic, real, fake, r1_scale=1.0):
        """D's penalty (before the lazy-regularisation gain) and what to log: the gradient penalty as
        `gp`, R1 as `r1` (its weight times `r1_scale`)."""
        total, logged = 0.0, {}
        if self.gp_lambda > 0:
            gp = gradient_penalty(critic, real, fake)
            total, logged["gp"] = gp * self.gp_lambda, gp
        if self.r1_gamma > 0:
            real = real.detach().requires_grad_(True)
            r1 = r1_penalty(critic(real), real)
            total = total + r1 * (self.r1_gamma * r1_scale / 2)
            logged["r1"] = r1
        return total, {k: v.detach() for k, v in logged.items()}
