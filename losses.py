"""Losses and penalties, as pure functions of scores, images and latents: WGAN-GP's critic loss
with drift and gradient penalty, the non-saturating logistic loss with R1, and the path-length
penalty. training.py applies them (d_step, g_step) with lazy regularisation."""
import math

import torch
import torch.nn.functional as F


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
