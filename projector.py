"""Projection of real slices into the latent space (StyleGAN2's projector): the w (or one w per
layer, W+) and noise maps whose image best matches a target, with the discriminator's features as
the perceptual distance."""
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

import constants
from metrics import ssim
from modules import NoiseInjection
from utils import quantize_uint8

P = constants.PROJECTOR


def discriminator_features(D, images):
    """The discriminator's activations at every resolution, each unit-normalised across channels per pixel."""
    x = D.from_img(images)
    features = [x]
    for block in D.blocks:
        x = block(x)
        features.append(x)
    return [f * (f.square().sum(1, keepdim=True) + 1e-8).rsqrt() for f in features]


def feature_distance(features_a, features_b):
    """Per-image mean squared distance of normalised features, summed over resolutions (LPIPS-like) -> (N,)."""
    return sum((a - b).square().sum(1).mean((1, 2)) for a, b in zip(features_a, features_b))


def noise_regularizer(maps):
    """Squared autocorrelation of each noise map with its 1-pixel shifts, over a pyramid of scales -> (N,)."""
    loss = 0
    for noise in maps:
        while True:
            loss = loss + (noise * noise.roll(1, 3)).mean((1, 2, 3)).square()
            loss = loss + (noise * noise.roll(1, 2)).mean((1, 2, 3)).square()
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, 2)
    return loss


def projection_lr(t, peak):
    """Learning rate at fraction t of the optimisation: linear ramp-up, cosine ramp-down."""
    ramp = min(1.0, (1 - t) / P["lr_rampdown"])
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return peak * ramp * min(1.0, t / P["lr_rampup"])


@torch.no_grad()
def w_statistics(G, weights, device, generator):
    """Mean w of each target's class (weights (N, K), or None) -> (N, w_dim), and the spread of w."""
    z = torch.randn(P["w_samples"], G.z_dim, generator=generator).to(device)
    if weights is None:
        w = G.mapping(z)
        return w.mean(0, keepdim=True), float(w.var(0).sum().sqrt())
    rows, index = weights.unique(dim=0, return_inverse=True)  # the distinct classes (or mixtures)
    means, spread = [], []
    for row in rows.to(device):
        w = G.mapping(z, row.expand(len(z), -1))
        means.append(w.mean(0))
        spread.append(float(w.var(0).sum().sqrt()))
    return torch.stack(means)[index.to(device)], float(np.mean(spread))


def project(G, D, targets, weights, cfg, device, snapshots=0, progress=None):
    """Optimise w (or W+) and per-image noise maps so that G's images match `targets` (N, C, R, R) in
    [-1, 1]: pixel MSE + the discriminator-feature distance + the noise regulariser, with the w
    noise and learning-rate schedule of the StyleGAN2 projector. `weights` (N, K) pick each target's
    class mean as the start (None: unconditional). Returns a dict of ws (N, num_ws, w_dim), noise
    maps, images, the pixel MSE before and after (N,), and `snapshots` image sets along the way;
    `progress` (if given) is called with (steps done, steps) after each step."""
    G = copy.deepcopy(G)
    generator = torch.Generator().manual_seed(P["seed"])
    w_mean, w_spread = w_statistics(G, weights, device, generator)
    n = len(targets)
    w_opt = w_mean.expand(n, -1)[:, None].repeat(1, G.num_ws if cfg.project_space == "w+" else 1, 1)
    w_opt.requires_grad_(True)
    maps = []
    for layer in G.modules():
        if isinstance(layer, NoiseInjection):
            size = layer.const_noise.shape[-1]
            layer.const_noise = torch.randn(n, 1, size, size, generator=generator).to(device).requires_grad_(True)
            maps.append(layer.const_noise)
    targets = targets.to(device)
    with torch.no_grad():
        target_features = discriminator_features(D, targets)
    optimizer = torch.optim.Adam([w_opt] + maps, betas=(0.9, 0.999), lr=cfg.project_lr)
    keep = set(np.linspace(0, cfg.project_steps - 1, snapshots).round().astype(int)) if snapshots else set()

    @torch.no_grad()
    def render():  # the image of the current w (no w noise) and its pixel MSE
        images = G.synthesis(w_opt.expand(-1, G.num_ws, -1), noise_mode="const")
        return images, (images - targets).square().mean((1, 2, 3))

    start, pictures = render()[1], []
    for step in range(cfg.project_steps):
        t = step / cfg.project_steps
        for group in optimizer.param_groups:
            group["lr"] = projection_lr(t, cfg.project_lr)
        scale = w_spread * P["w_noise"] * max(0.0, 1 - t / P["w_noise_ramp"]) ** 2
        jitter = torch.randn(w_opt.shape, generator=generator).to(device) * scale
        images = G.synthesis((w_opt + jitter).expand(-1, G.num_ws, -1), noise_mode="const")
        pixel = (images - targets).square().mean((1, 2, 3))
        loss = pixel + cfg.project_features * feature_distance(discriminator_features(D, images), target_features)
        loss = loss + cfg.project_noise_reg * noise_regularizer(maps)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            for m in maps:  # keep each noise map zero-mean and unit-variance
                m.sub_(m.mean((1, 2, 3), keepdim=True)).mul_(m.square().mean((1, 2, 3), keepdim=True).rsqrt())
        if step in keep:
            pictures.append(render()[0].cpu())
        if progress is not None:
            progress(step + 1, cfg.project_steps)
    images, end = render()
    return dict(ws=w_opt.detach().expand(-1, G.num_ws, -1).cpu(), noise=[m.detach().cpu() for m in maps],
                images=images.cpu(), pixel_start=start.cpu(), pixel_end=end.cpu(), snapshots=pictures)


def reconstruction_scores(images, targets):
    """PSNR (dB) and SSIM of the saved (8-bit) images against the targets, per image."""
    a, b = quantize_uint8(images).float(), quantize_uint8(targets).float()
    mse = (a - b).square().mean((1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(255**2 / mse), ssim(a, b, data_range=255.0)
