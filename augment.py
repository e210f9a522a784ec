"""Augmentation. The adaptive discriminator augmentation of StyleGAN2-ADA (every image D sees, real
or generated, goes through AugmentPipe with probability p, and ADA's heuristic moves p), and seed
004's augmentations of the real images themselves (flips, rotation, brightness/contrast jitter)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------
# Adaptive discriminator augmentation
# ---------------------------------------------------------------------------------------
def rotation(theta):  # (N,) angles -> (N, 3, 3)
    c, s, z, o = theta.cos(), theta.sin(), torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([c, -s, z, s, c, z, z, z, o], 1).reshape(-1, 3, 3)


def translation(t):  # (N, 2) shifts in normalised coordinates -> (N, 3, 3)
    z, o = torch.zeros_like(t[:, 0]), torch.ones_like(t[:, 0])
    return torch.stack([o, z, t[:, 0], z, o, t[:, 1], z, z, o], 1).reshape(-1, 3, 3)


def scaling(sx, sy):  # (N,), (N,) -> (N, 3, 3)
    return torch.diag_embed(torch.stack([sx, sy, torch.ones_like(sx)], 1))


class AugmentPipe(nn.Module):
    """Differentiable augmentation of every image D sees (StyleGAN2-ADA), for any number of channels.

    Each transform is applied to each image with probability p: x flip, 90-degree rotation,
    integer translation, isotropic scaling, arbitrary rotation, anisotropic scaling (one affine
    warp with reflection padding), then brightness, contrast and cutout. Gradients flow to the
    input, so G learns through it; p = 0 returns the input untouched."""

    TRANSLATE, SCALE_STD, ANISO_STD = 0.125, 0.2, 0.2  # translation as a fraction of the size; log2 stds
    BRIGHTNESS_STD, CONTRAST_STD, CUTOUT = 0.2, 0.5, 0.5  # brightness in [-1, 1] units; log2 std; cutout size

    def forward(self, x, p):  # (N, C, H, W) -> (N, C, H, W)
        if p <= 0:
            return x
        x = self._geometric(x, p)
        return self._cutout(self._color(x, p), p)

    @staticmethod
    def _chance(n, p, device):
        """(N,) float mask: 1 where a transform is applied."""
        return (torch.rand(n, device=device) < p).float()

    def _geometric(self, x, p):
        n, _, h, w = x.shape
        dev = x.device
        eye = torch.eye(3, device=dev).expand(n, 3, 3)
        mats = []
        flip = 1 - 2 * self._chance(n, p, dev)  # x flip
        mats.append(scaling(flip, torch.ones_like(flip)))
        quarter = torch.randint(0, 4, (n,), device=dev) * self._chance(n, p, dev)  # 90-degree rotations
        mats.append(rotation(quarter * math.pi / 2))
        shift = (torch.rand(n, 2, device=dev) * 2 - 1) * self.TRANSLATE * self._chance(n, p, dev)[:, None]
        shift = torch.round(shift * torch.tensor([w, h], device=dev)) * 2 / torch.tensor([w, h], device=dev)
        mats.append(translation(shift))  # whole pixels (normalised coordinates span 2)
        s = 2 ** (torch.randn(n, device=dev) * self.SCALE_STD * self._chance(n, p, dev))
        mats.append(scaling(s, s))
        p_rot = 1 - math.sqrt(1 - min(p, 1))  # rotate, stretch, rotate: the chance of any rotation is p
        turn = lambda: rotation((torch.rand(n, device=dev) * 2 - 1) * math.pi * self._chance(n, p_rot, dev))  # noqa: E731
        a = 2 ** (torch.randn(n, device=dev) * self.ANISO_STD * self._chance(n, p, dev))
        mats += [turn(), scaling(a, 1 / a), turn()]
        m = eye
        for t in mats:
            m = m @ t
        warped = (m != eye).any(2).any(1)  # (N,) images with any geometric transform
        if not warped.any():
            return x
        grid = F.affine_grid(m[:, :2].to(x.dtype), list(x.shape), align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return torch.where(warped[:, None, None, None], y, x)  # the others stay exactly as they were

    def _color(self, x, p):
        n, dev = x.shape[0], x.device
        draw = lambda std: (torch.randn(n, device=dev) * std * self._chance(n, p, dev))[:, None, None, None]  # noqa: E731
        brightness, contrast = draw(self.BRIGHTNESS_STD), 2 ** draw(self.CONTRAST_STD)
        mean = x.mean(dim=[1, 2, 3], keepdim=True)  # contrast around each image's mean
        return x + (x - mean) * (contrast - 1) + brightness  # exactly x where neither applies

    def _cutout(self, x, p):
        n, _, h, w = x.shape
        dev = x.device
        keep = self._chance(n, p, dev)[:, None, None, None]
        center = torch.rand(n, 2, 1, 1, device=dev)
        ys = (torch.arange(h, device=dev) + 0.5)[None, :, None] / h
        xs = (torch.arange(w, device=dev) + 0.5)[None, None, :] / w
        inside = ((xs - center[:, 0]).abs() < self.CUTOUT / 2) & ((ys - center[:, 1]).abs() < self.CUTOUT / 2)
        mask = 1 - inside[:, None].float() * keep  # (N, 1, H, W)
        return x * mask


def ada_update(p, rt, target, nimg, ada_kimg):
    """StyleGAN2-ADA's overfitting heuristic: while r_t = E[sign(D(real))] is above the target, D is
    too sure of the reals and p rises; below it p falls; by nimg / (ada_kimg * 1000), within [0, 1]."""
    step = nimg / (ada_kimg * 1000)
    return min(max(p + step * ((rt > target) - (rt < target)), 0.0), 1.0)


class AugmentProbability:
    """The probability p of the augmentation D sees: 0 (--augment none), fixed (fixed), or, with
    --augment ada, moved every `interval` iterations by ADA's overfitting heuristic r_t, the mean
    of E[sign(D(real))] over those iterations. Its state (p and the r_t terms since the last move)
    goes into checkpoints as augment_p and ada_signs."""

    def __init__(self, mode, p=0.0, target=0.6, interval=4, batch_size=1, ada_kimg=100.0):
        self.mode, self.p = mode, p if mode != "none" else 0.0
        self.target, self.interval, self.batch_size, self.ada_kimg = target, interval, batch_size, ada_kimg
        self.signs = []

    @staticmethod
    def from_settings(cfg):
        return AugmentProbability(cfg.augment, cfg.augment_p, cfg.ada_target, cfg.ada_interval, cfg.batch_size,
                                  cfg.ada_kimg)

    def update(self, real_sign):
        """Record one iteration's r_t term; every `interval` of them, move p (ada only)."""
        if self.mode != "ada":
            return
        self.signs.append(real_sign)
        if len(self.signs) == self.interval:
            rt = sum(self.signs) / len(self.signs)
            self.p = ada_update(self.p, rt, self.target, self.interval * self.batch_size, self.ada_kimg)
            self.signs = []

    def state_dict(self):
        return dict(augment_p=self.p, ada_signs=list(self.signs))

    def load_state_dict(self, state):
        """An ada run continues with its p (a fixed p is the setting's)."""
        if self.mode == "ada":
            self.p, self.signs = state.get("augment_p", self.p), list(state.get("ada_signs", []))


# ---------------------------------------------------------------------------------------
# Augmentation of the real images (the generator learns to reproduce these)
# ---------------------------------------------------------------------------------------
def random_flips(x, hflip, vflip):
    """Flip each image of a (N, C, H, W) batch left-right and/or up-down with probability 0.5."""
    for enabled, dim in ((hflip, 3), (vflip, 2)):
        if enabled:
            mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
            x = torch.where(mask, x.flip(dim), x)
    return x


def random_rotation_and_jitter(x, degrees, jitter):
    """Rotation and jitter of real images (--rotate, --jitter), which the generator learns to reproduce,
    on a (N, C, H, W) batch in [-1, 1]: a rotation by an angle within +-degrees (black outside the
    slice), then brightness and contrast factors drawn from [1 - jitter, 1 + jitter] (as
    torchvision's ColorJitter). Zero settings return the batch itself."""
    n, device = x.shape[0], x.device
    if degrees > 0:
        theta = (torch.rand(n, device=device) * 2 - 1) * math.radians(degrees)
        grid = F.affine_grid(rotation(theta)[:, :2], list(x.shape), align_corners=False)
        x = F.grid_sample(x + 1, grid, align_corners=False) - 1  # zero padding of x + 1: black
    if jitter > 0:
        factor = lambda: 1 + (torch.rand(n, 1, 1, 1, device=device) * 2 - 1) * jitter  # noqa: E731
        y = (x + 1) / 2 * factor()  # brightness, on [0, 1]
        mean = y.mean(dim=[1, 2, 3], keepdim=True)
        x = ((y - mean) * factor() + mean).clamp(0, 1) * 2 - 1  # contrast around each image's mean
    return x
