"""StyleGAN2 for brain slices: mapping network, modulated-convolution skip generator, residual
discriminator with minibatch standard deviation and projection conditioning. Every layer uses
the equalised learning rate (weights drawn from N(0, 1) and scaled at run time by He's constant)."""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops import LAYOUT, activations, conv2d, conv2d_bias_lrelu, pointwise_conv_per_sample

SQRT2 = math.sqrt(2)  # StyleGAN2's gain after leaky ReLU (slope 0.2), which keeps unit variance; the
# layers carry it in their weights and biases (lrelu(g x) = g lrelu(x) for g > 0): one pass fewer over x


def pixel_norm(x, eps=1e-8):
    """Normalise each vector to unit root-mean-square."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def _made_once(make):
    """`make(*args)`, a small constant tensor, made once per argument set rather than at every call (a
    compiled graph folds it in itself); never an inference tensor, so that autograd may save it
    whatever mode its first call ran in. The cache is the result's `cache`."""
    @functools.lru_cache(maxsize=256)
    def cache(*args):
        with torch.inference_mode(False), torch.no_grad():
            return make(*args)

    @functools.wraps(make)
    def constant(*args):
        return make(*args) if torch.compiler.is_compiling() else cache(*args)
    constant.cache = cache
    return constant


@_made_once
def _taps(device, dtype, gain):  # -> (4, 4)
    tap = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device, dtype=dtype)
    return torch.outer(tap, tap) * (gain / 64)


def _filter(x, gain=1.0):  # -> (C, 1, 4, 4)
    """StyleGAN2's [1, 3, 3, 1] low-pass filter, normalised to sum `gain`, one copy per channel of x."""
    return _taps(x.device, x.dtype, gain).expand(x.shape[1], 1, 4, 4)


def upsample2x(x, resample="bilinear"):  # (N, C, H, W) -> (N, C, 2H, 2W)
    """2x up-sampling with the [1, 3, 3, 1] filter. bilinear: bilinear interpolation, which repeats
    the border pixels; upfirdn: StyleGAN2's upfirdn2d, which takes the image as zero outside."""
    if resample == "upfirdn":
        return conv2d(x, _filter(x, 4.0), stride=2, padding=1, groups=x.shape[1], transpose=True)
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def downsample2x(x, resample="bilinear"):  # (N, C, H, W) -> (N, C, H/2, W/2)
    """Anti-aliased 2x down-sampling with the [1, 3, 3, 1] filter, as one depthwise strided
    convolution. bilinear: the same as antialiased bilinear interpolation to half size (the filter
    renormalised at the borders), faster than F.interpolate's antialias path and its backward;
    upfirdn: StyleGAN2's upfirdn2d, zero outside the image."""
    out = conv2d(x, _filter(x), stride=2, padding=1, groups=x.shape[1])
    if resample == "upfirdn":
        return out
    return out * _border_weights(*x.shape[2:], x.device, x.dtype)


def blur(x, padding):  # (N, C, H, W) -> (N, C, H + 2 * padding - 3, W + 2 * padding - 3)
    """The [1, 3, 3, 1] filter at full resolution, zero outside the image (before a strided convolution)."""
    return conv2d(x, _filter(x), padding=padding, groups=x.shape[1])


def clamp(x, limit):
    """x limited to [-limit, limit] (StyleGAN2-ADA's conv_clamp, a guard against float16 overflow); 0: as it is."""
    return x.clamp(-limit, limit) if limit else x


def _border_norm(size, device, dtype):
    """1 / (the filter's weight inside the image) at each output position along one axis: the taps at
    input -1 and at input `size` fall outside (8/7 at each border, 8/6 for a single output)."""
    inside = torch.full((size // 2,), 8.0, device=device, dtype=dtype)
    inside[0] -= 1
    inside[-1] -= 1
    return 8 / inside


@_made_once
def _border_weights(h, w, device, dtype):  # -> (H/2, W/2)
    return _border_norm(h, device, dtype)[:, None] * _border_norm(w, device, dtype)[None, :]


def channels_at(res, channel_base, channel_max, channel_min=0):
    """Feature maps at resolution `res`: channel_base // res, at most channel_max, at least channel_min."""
    return max(min(channel_base // res, channel_max), channel_min)


class EqualLinear(nn.Module):
    """Fully connected layer with equalised learning rate and an optional learning-rate multiplier."""

    def __init__(self, in_features, out_features, bias=True, bias_init=0.0, lr_mult=1.0, activation=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init) / lr_mult)) if bias else None
        self.scale = lr_mult / math.sqrt(in_features)
        self.lr_mult = lr_mult
        self.activation = activation

    def forward(self, x):
        gain = SQRT2 if self.activation else 1.0  # lrelu's gain, carried by the weights
        bias = self.bias * (self.lr_mult * gain) if self.bias is not None else None
        x = F.linear(x, self.weight * (self.scale * gain), bias)
        return F.leaky_relu(x, 0.2) if self.activation else x


class EqualConv2d(nn.Module):
    """Convolution with equalised learning rate; `down` halves the resolution. resample bilinear:
    down-sample, then convolve at the lower resolution; upfirdn (StyleGAN2's own): a 3x3 kernel
    strides over the blurred image, a 1x1 one convolves the down-sampled image. `clamp` limits the
    activated output."""

    def __init__(self, in_channels, out_channels, kernel_size, bias=True, activation=True, down=False,
                 resample="bilinear", clamp=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.activation, self.down, self.resample, self.clamp = activation, down, resample, clamp

    def forward(self, x):
        gain = SQRT2 if self.activation else 1.0  # lrelu's gain, carried by the weights
        weight, k = self.weight * (self.scale * gain), self.weight.shape[-1]
        if self.down and self.resample == "upfirdn" and k > 1:
            x, stride, padding = blur(x, padding=2), 2, 0
        else:
            x, stride, padding = downsample2x(x, self.resample) if self.down else x, 1, k // 2
        if self.activation and self.bias is not None:  # (N, C, H, W) -> (N, C', H / stride, W / stride)
            return clamp(conv2d_bias_lrelu(x, weight, self.bias * gain, stride, padding), self.clamp)
        x = conv2d(x, weight, stride, padding)
        if self.bias is not None:
            x = x + self.bias.view(1, -1, 1, 1) * gain
        return clamp(F.leaky_relu(x, 0.2), self.clamp) if self.activation else x


class Blur(nn.Module):
    """[1, 3, 3, 1] low-pass filter applied per channel (after a strided transposed convolution)."""

    def __init__(self, gain=4.0):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = torch.outer(k, k)
        self.register_buffer("kernel", (k / k.sum() * gain)[None, None], persistent=False)

    def forward(self, x):  # (N, C, 2H+1, 2W+1) -> (N, C, 2H, 2W)
        c = x.shape[1]
        return conv2d(x, self.kernel.expand(c, 1, 4, 4), padding=1, groups=c)


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019): every position attends to every other one, and the result is
    added through a learned gain that starts at zero, so a new block begins as the identity."""

    def __init__(self, channels):
        super().__init__()
        self.query = EqualConv2d(channels, max(channels // 8, 1), 1, bias=False, activation=False)
        self.key = EqualConv2d(channels, max(channels // 8, 1), 1, bias=False, activation=False)
        self.value = EqualConv2d(channels, channels, 1, bias=False, activation=False)
        self.gain = nn.Parameter(torch.zeros([]))

    def forward(self, x):  # (N, C, H, W) -> (N, C, H, W)
        n, c, h, w = x.shape
        q, k, v = self.query(x).flatten(2), self.key(x).flatten(2), self.value(x).flatten(2)  # (N, C', HW)
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (N, HW, HW); plain ops: twice differentiable
        return x + self.gain * (v @ attention.transpose(1, 2)).reshape(n, c, h, w)


class MappingNetwork(nn.Module):
    """z (and a class label) -> w: pixel norm, then equalised FC layers at a reduced learning rate.

    Tracks the mean w (per class) for the truncation trick."""

    def __init__(self, z_dim, w_dim, num_layers, num_classes=0, lr_mult=0.01, w_avg_beta=0.995):
        super().__init__()
        self.num_classes, self.w_avg_beta = num_classes, w_avg_beta
        self.embed = EqualLinear(num_classes, z_dim) if num_classes else None
        dims = [z_dim * (2 if num_classes else 1)] + [w_dim] * num_layers
        self.layers = nn.Sequential(*[EqualLinear(a, b, lr_mult=lr_mult, activation=True)
                                      for a, b in zip(dims[:-1], dims[1:])])
        self.register_buffer("w_avg", torch.zeros(max(num_classes, 1), w_dim))

    def forward(self, z, labels=None, truncation=1.0, update_w_avg=False):  # (N, z_dim) -> (N, w_dim)
        """`labels` are class indices (N,), or class weights (N, num_classes) for a mixture of classes."""
        x = pixel_norm(z)
        mixture = labels is not None and labels.is_floating_point()
        if self.num_classes:
            weights = labels.to(z.dtype) if mixture else F.one_hot(labels, self.num_classes).to(z.dtype)
            x = torch.cat([x, pixel_norm(self.embed(weights))], dim=1)
        w = self.layers(x)
        group = labels if self.num_classes else torch.zeros(len(w), dtype=torch.long, device=w.device)
        if update_w_avg:
            self._track_w_avg(w.detach(), group)
        if truncation != 1:
            center = weights @ self.w_avg if mixture else self.w_avg[group]  # (N, w_dim)
            w = center.lerp(w, truncation)
        return w

    @torch.no_grad()
    def _track_w_avg(self, w, group):
        onehot = F.one_hot(group, len(self.w_avg)).to(w.dtype)  # (N, K)
        counts = onehot.sum(0)[:, None]
        means = onehot.T @ w / counts.clamp(min=1)  # (K, w_dim)
        updated = self.w_avg.lerp(means, 1 - self.w_avg_beta)
        self.w_avg.copy_(torch.where(counts > 0, updated, self.w_avg))


class ModulatedConv2d(nn.Module):
    """Convolution whose input channels are scaled per sample by a style from w, then demodulated
    so that each output map has unit expected variance (StyleGAN2's weight demodulation).

    The default is the cheap form: scale the activations, run an ordinary convolution, scale the
    output; a 1x1 layer on the CPU is one batched matrix product with the styles in per-sample weights.
    The per-sample grouped-convolution form (fused=True) gives the same result but generates
    more slowly (docs/speed.md)."""

    def __init__(self, in_channels, out_channels, kernel_size, w_dim, demodulate=True, up=False, modulate=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0) if modulate else None  # None: a plain conv
        self.demodulate, self.up = demodulate and modulate, up
        self.blur = Blur() if up else None

    def forward(self, x, w, fused=False, noise=None, gain=1.0):  # (N, Cin, H, W), (N, w_dim) -> (N, Cout, H', W')
        """gain * (the modulated convolution of x + `noise`), where noise (N | 1, 1, H', W') may be None.
        Demodulation, noise and gain take one pass over the output (the demodulation's per-sample
        scale commutes with the per-channel blur of an up-sampling layer)."""
        styles = self.affine(w) if self.affine is not None else torch.ones_like(x[:, :, 0, 0])  # (N, Cin)
        weight = self.weight * self.scale  # (Cout, Cin, k, k)
        dcoefs = None
        if self.demodulate:  # 1/sqrt(sum_{i,k} (w_oik s_i)^2) = 1/sqrt(s^2 @ sum_k w_oik^2)
            dcoefs = (styles.square() @ weight.square().sum([2, 3]).T + 1e-8).rsqrt()  # (N, Cout)
        if fused:
            x, dcoefs = self._grouped(x, weight, styles, dcoefs), None
        else:
            x = self._scaled(x, weight, styles)
        x = self.blur(x) if self.up else x
        noise = noise * gain if noise is not None and gain != 1 else noise
        if dcoefs is not None:
            scale = dcoefs.view(*dcoefs.shape, 1, 1) * gain  # (N, Cout, 1, 1)
            return torch.addcmul(noise, x, scale) if noise is not None else x * scale
        x = x * gain if gain != 1 else x
        return x + noise if noise is not None else x

    def _scaled(self, x, weight, styles):
        if weight.shape[-1] == 1 and not self.up and LAYOUT["channels_last"]:  # to-image on the CPU
            return pointwise_conv_per_sample(x, weight.flatten(1).t() * styles.unsqueeze(2))  # (N, Cin, Cout)
        x = x * styles.view(*styles.shape, 1, 1)
        if self.up:
            return conv2d(x, weight.transpose(0, 1), stride=2, transpose=True)
        return conv2d(x, weight, padding=weight.shape[-1] // 2)

    def _grouped(self, x, weight, styles, dcoefs):
        n, cin, h, w = x.shape
        wt = weight[None] * styles[:, None, :, None, None]  # (N, Cout, Cin, k, k)
        if dcoefs is not None:
            wt = wt * dcoefs[:, :, None, None, None]
        cout, k = wt.shape[1], wt.shape[-1]
        x = x.reshape(1, n * cin, h, w)
        if self.up:
            x = F.conv_transpose2d(x, wt.transpose(1, 2).reshape(n * cin, cout, k, k), stride=2, groups=n)
        else:
            x = F.conv2d(x, wt.reshape(n * cout, cin, k, k), padding=k // 2, groups=n)
        return x.reshape(n, cout, *x.shape[2:])


class NoiseInjection(nn.Module):
    """Per-pixel Gaussian noise scaled by a learned per-layer strength (starts at zero); the layer's
    modulated convolution adds it."""

    def __init__(self, resolution):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("const_noise", torch.randn(1, 1, resolution, resolution))

    def forward(self, x, noise_mode="random"):  # -> (N | 1, 1, R, R), or None
        """The noise for the batch of x (any tensor of N samples): strength times fresh noise (random),
        times the fixed maps (const), or None (none)."""
        if noise_mode == "none":
            return None
        if noise_mode == "const":
            return (self.const_noise * self.strength).to(x.dtype)
        size = self.const_noise.shape[2:]
        return torch.randn(x.shape[0], 1, *size, device=x.device, dtype=x.dtype) * self.strength


class ScannerNoise(nn.Module):
    """The noise of an MR magnitude image, drawn after the network: Rician noise on the foreground's
    pixels (0..1 intensity units; pixels below FLOOR, the skull-stripped background, stay as they
    are), each sample's strength one of the levels `measure` read off the training slices. Fixed,
    not learned: a discriminator kept smooth by R1 gives pixel noise no gradient worth following."""

    FLOOR = 0.02  # 0..1 intensity; the mask ramps from 0 here to 1 at twice this
    LEVELS = 64  # quantiles of the training slices' noise levels kept

    def __init__(self, resolution, img_channels):
        super().__init__()
        self.register_buffer("levels", torch.zeros(self.LEVELS))
        self.register_buffer("const_noise", torch.randn(2, 1, img_channels, resolution, resolution))

    @torch.no_grad()
    def measure(self, images, chunk=256):
        """Set the levels from uint8 slices (N, C, H, W): per slice, the median absolute diagonal Haar
        detail over 2x2 blocks of foreground / 0.6745 (Donoho's estimate of Gaussian noise). A dither
        of one grey level smooths the median's steps; its variance and the rounding's are taken off."""
        found, dither = [], torch.Generator().manual_seed(0)
        for start in range(0, len(images), chunk):
            x = images[start:start + chunk, :, : images.shape[2] // 2 * 2, : images.shape[3] // 2 * 2].cpu().float()
            x = (x + torch.rand(x.shape, generator=dither) - 0.5) / 255
            corners = torch.stack([x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]])
            detail = (corners[0] - corners[1] - corners[2] + corners[3]).abs().div(2).flatten(1)  # (n, pixels)
            inside = corners.amin(0).flatten(1) > 2 * self.FLOOR
            found += [d[m].median() / 0.6745 for d, m in zip(detail, inside) if m.sum() >= 64]
        if found:
            q = torch.linspace(0, 1, self.LEVELS, dtype=torch.float64)
            # less the variances of the dither and of the rounding (1/12 grey level squared each)
            sd = (torch.stack(found).double().square() - 2 / 12 / 255**2).clamp(min=0).sqrt()
            self.levels.copy_(torch.quantile(sd, q).float())
        return self.levels

    def forward(self, img, noise_mode="random", weight=1.0):  # (N, C, R, R) -> (N, C, R, R)
        """img with the noise; `weight` scales its strength (a fading-in top resolution)."""
        if noise_mode == "none":
            return img
        if noise_mode == "const":  # the median level and the fixed maps
            sd, n = self.levels[self.LEVELS // 2].expand(1), self.const_noise
        else:
            sd = self.levels[torch.randint(self.LEVELS, (img.shape[0],), device=img.device)]
            n = torch.randn((2, *img.shape), device=img.device)
        n = n * (weight * sd)[:, None, None, None]
        x = (img.float() + 1) / 2  # float32: the square root's gradient near zero
        noisy = ((x + n[0]).square() + n[1].square() + 1e-12).sqrt()
        mask = (x / self.FLOOR - 1).clamp(0, 1)
        return (img + 2 * mask * (noisy - x)).to(img.dtype)


class AdaIN(nn.Module):
    """Adaptive instance normalisation (StyleGAN): each feature map normalised per sample to zero
    mean and unit variance, then scaled and shifted by a style from w."""

    def __init__(self, channels, w_dim):
        super().__init__()
        self.affine = EqualLinear(w_dim, 2 * channels, bias_init=1.0)
        with torch.no_grad():
            self.affine.bias[channels:] = 0  # scales start at 1, shifts at 0

    def forward(self, x, w):  # (N, C, H, W), (N, w_dim) -> (N, C, H, W)
        scale, shift = self.affine(w)[:, :, None, None].chunk(2, dim=1)
        x = x - x.mean(dim=(2, 3), keepdim=True)
        x = x * (x.square().mean(dim=(2, 3), keepdim=True) + 1e-8).rsqrt()
        return x * scale + shift


class StyledLayer(nn.Module):
    """One synthesis layer. style_op modconv (StyleGAN2): modulated 3x3 convolution, noise, bias,
    leaky ReLU. adain (StyleGAN): plain 3x3 convolution, noise, bias, leaky ReLU, then AdaIN.
    `clamp` limits the activated output."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, up=False, style_op="modconv", clamp=0.0):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up, modulate=style_op == "modconv")
        self.noise = NoiseInjection(resolution)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.adain = AdaIN(out_channels, w_dim) if style_op == "adain" else None
        self.clamp = clamp

    def forward(self, x, w, noise_mode="random"):
        x = self.conv(x, w, noise=self.noise(x, noise_mode), gain=SQRT2)  # lrelu's gain, carried here
        x = clamp(F.leaky_relu(x + self.bias.view(1, -1, 1, 1) * SQRT2, 0.2), self.clamp)
        return self.adain(x, w) if self.adain is not None else x


class ToImage(nn.Module):
    """1x1 modulated convolution (no demodulation) from features to the image channels."""

    def __init__(self, in_channels, img_channels, w_dim, clamp=0.0):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, img_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.clamp = clamp

    def forward(self, x, w):
        return clamp(self.conv(x, w) + self.bias.view(1, -1, 1, 1), self.clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: up-sampling conv, conv, and an image output that is
    added to the up-sampled image of the previous resolution. Uses three w's."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels, style_op="modconv",
                 resample="bilinear", clamp=0.0):
        super().__init__()
        self.conv0 = StyledLayer(in_channels, out_channels, w_dim, resolution, up=True, style_op=style_op, clamp=clamp)
        self.conv1 = StyledLayer(out_channels, out_channels, w_dim, resolution, style_op=style_op, clamp=clamp)
        self.to_img = ToImage(out_channels, img_channels, w_dim, clamp)
        self.resample = resample

    def forward(self, x, img, ws, noise_mode="random", weight=1.0):  # x (N, Cin, R/2, R/2) -> (N, Cout, R, R)
        x = self.conv0(x, ws[:, 0], noise_mode)
        x = self.conv1(x, ws[:, 1], noise_mode)
        out = self.to_img(x, ws[:, 2])
        return x, upsample2x(img, self.resample) + (out if weight == 1 else out * weight)  # weight < 1: fading in


class SynthesisNetwork(nn.Module):
    """Learned 4x4 constant, then one SynthesisBlock per resolution up to the output resolution.

    `level` is progressive training's growth level (None: every resolution): the image output of
    the block at 4 * 2^k has weight clamp(level - k + 1, 0, 1), blocks with weight 0 are skipped,
    and the image is up-sampled to the output resolution. `resample` and `clamp`: see
    SynthesisBlock and StyledLayer."""

    def __init__(self, w_dim, resolution, img_channels, channel_base, channel_max, attention_res=0,
                 style_op="modconv", resample="bilinear", clamp=0.0, channel_min=0, scanner_noise=False):
        super().__init__()
        ch = lambda r: channels_at(r, channel_base, channel_max, channel_min)  # noqa: E731
        self.const = nn.Parameter(torch.randn(ch(4), 4, 4))
        self.conv = StyledLayer(ch(4), ch(4), w_dim, 4, style_op=style_op, clamp=clamp)
        self.to_img = ToImage(ch(4), img_channels, w_dim, clamp)
        self.resolutions = [2**i for i in range(3, int(math.log2(resolution)) + 1)]
        self.blocks = nn.ModuleList(SynthesisBlock(ch(r // 2), ch(r), w_dim, r, img_channels, style_op, resample, clamp)
                                    for r in self.resolutions)
        self.resample = resample
        self.attention_res = attention_res
        self.attention = SelfAttention(ch(attention_res)) if attention_res else None  # after that block
        self.num_ws = 2 + 2 * len(self.blocks)
        self.scanner_noise = ScannerNoise(resolution, img_channels) if scanner_noise else None
        self.level = None

    def forward(self, ws, noise_mode="random", full_size=True):  # ws (N, num_ws, w_dim) -> (N, C, R, R)
        """`full_size` False: a growing generator's image at the resolution its level has reached."""
        x = activations(self.const[None].expand(ws.shape[0], -1, -1, -1))
        x = self.conv(x, ws[:, 0], noise_mode)
        img = self.to_img(x, ws[:, 1])
        for i, (block, res) in enumerate(zip(self.blocks, self.resolutions)):
            weight = 1.0 if self.level is None else min(max(self.level - i, 0.0), 1.0)
            if weight == 0:
                break
            x, img = block(x, img, ws[:, 1 + 2 * i:4 + 2 * i], noise_mode, weight)
            if res == self.attention_res:
                x = self.attention(x)
        if self.scanner_noise is not None and img.shape[-1] == self.resolutions[-1]:  # the top resolution is in
            img = self.scanner_noise(img, noise_mode, weight)
        while full_size and img.shape[-1] < self.resolutions[-1]:  # a growing generator: up to the output size
            img = upsample2x(img, self.resample)
        return img


class Generator(nn.Module):
    """Mapping network + synthesis network, with style mixing in training and truncation at inference."""

    def __init__(self, z_dim, w_dim, mapping_layers, resolution, img_channels, num_classes=0,
                 channel_base=16384, channel_max=256, mapping_lr_mult=0.01, w_avg_beta=0.995, attention_res=0,
                 style_op="modconv", resample="bilinear", conv_clamp=0.0, channel_min=0, scanner_noise=False):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, num_classes, mapping_lr_mult, w_avg_beta)
        self.synthesis = SynthesisNetwork(w_dim, resolution, img_channels, channel_base, channel_max, attention_res,
                                          style_op, resample, conv_clamp, channel_min, scanner_noise)
        self.num_ws = self.synthesis.num_ws

    def make_ws(self, z, labels=None, truncation=1.0, mixing_prob=0.0, update_w_avg=False):
        """z -> per-layer styles (N, num_ws, w_dim); with probability `mixing_prob` the layers from a
        random crossover point on take the w of a second random z (style mixing regularisation)."""
        w = self.mapping(z, labels, truncation, update_w_avg)
        ws = w[:, None].repeat(1, self.num_ws, 1)
        if mixing_prob > 0 and torch.rand([]).item() < mixing_prob:
            cut = int(torch.randint(1, self.num_ws, []).item())
            w2 = self.mapping(torch.randn_like(z), labels, truncation)
            ws[:, cut:] = w2[:, None]
        return ws

    def forward(self, z, labels=None, truncation=1.0, mixing_prob=0.0, noise_mode="random", update_w_avg=False):
        ws = self.make_ws(z, labels, truncation, mixing_prob, update_w_avg)  # (N, num_ws, w_dim)
        return self.synthesis(ws, noise_mode)  # (N, C, R, R)


def growth_level(nimg, kimg, resolution, start=4, hold_kimg=0.0):
    """Progressive training's level after `nimg` images (None once every resolution is in); level k
    shows resolutions up to 4 * 2^k. Growth starts at resolution `start`, stays there for
    `hold_kimg` thousand images, then each higher resolution takes `kimg` thousand images: the
    first half at the level below, the second half fading in (level k-1 -> k)."""
    top, first = int(math.log2(resolution)) - 2, int(math.log2(start)) - 2
    t = max(nimg - hold_kimg * 1000, 0) / (kimg * 1000)
    stage = math.floor(t)
    level = first + stage + min(max(2 * (t - stage) - 1, 0.0), 1.0)
    return None if level >= top else level


def at_growth_level(img, level, full_size=True):  # (N, C, R, R) -> (N, C, R, R) or (N, C, r, r)
    """Real images as a growing generator at `level` draws them: down-sampled to 4 * 2^floor(level)
    and blended toward the next resolution by the fraction of level; up-sampled back to R when
    `full_size`, else at the level's own resolution (4 * 2^ceil(level))."""
    top = int(math.log2(img.shape[-1])) - 2
    if level is None or level >= top:
        return img
    low, fade = math.floor(level), level - math.floor(level)
    own = low + (fade > 0)
    x = img
    for _ in range(top - own):
        x = downsample2x(x)
    if fade > 0:
        x = torch.lerp(upsample2x(downsample2x(x)), x, fade)
    for _ in range(top - own if full_size else 0):
        x = upsample2x(x)
    return x


class MinibatchStdDev(nn.Module):
    """Appends the standard deviation of the features across groups of samples as one extra
    channel, so the discriminator can see a lack of variety (mode collapse)."""

    def __init__(self, group_size=4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x, batches=1):  # (N, C, H, W) -> (N, C + 1, H, W)
        """`batches` > 1: x is that many batches one after the other (D's real and generated images in
        one pass), and no group mixes two of them."""
        if batches > 1:
            return torch.cat([self(part) for part in x.chunk(batches)])
        n, c, h, w = x.shape
        g = max(d for d in range(1, min(self.group_size, n) + 1) if n % d == 0)
        y = x.reshape(g, -1, c, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()  # (N/g, C, H, W)
        y = y.mean([1, 2, 3]).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)  # (N, 1, H, W)
        return activations(torch.cat([x, y], dim=1))  # a 1-channel y makes cat choose the default order


class DiscriminatorBlock(nn.Module):
    """Residual block: 3x3 conv, down-sampling 3x3 conv, plus a down-sampled 1x1 skip; sum / sqrt(2)."""

    def __init__(self, in_channels, out_channels, resample="bilinear", clamp=0.0):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, clamp=clamp)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, down=True, resample=resample, clamp=clamp)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, activation=False, down=True,
                                resample=resample)

    def forward(self, x):  # (N, Cin, R, R) -> (N, Cout, R/2, R/2)
        return (self.skip(x) + self.conv1(self.conv0(x))) / SQRT2


def apply_spectral_norm(module):
    """Spectral normalisation (Miyato et al. 2018) of every convolution and fully connected layer in `module`:
    each weight is divided by its largest singular value (one power iteration per forward pass).
    The equalised learning rate's constant is dropped there: it would shrink every layer again."""
    for layer in module.modules():
        if isinstance(layer, (EqualConv2d, EqualLinear)):
            nn.utils.parametrizations.spectral_norm(layer, "weight")
            layer.scale = layer.lr_mult if isinstance(layer, EqualLinear) else 1.0


class Discriminator(nn.Module):
    """Image -> score: from-image 1x1 conv, residual blocks down to 4x4, minibatch std, conv, FC;
    conditional models add a projection of the class embedding onto the final features.

    A growing discriminator (`grow`, progressive training) also has a from-image conv at every lower
    resolution: at growth level `level` it takes images at that level's resolution, and while a
    resolution fades in, blends its block's output with the from-image features of the image
    down-sampled (ProGAN)."""

    def __init__(self, resolution, img_channels, num_classes=0, channel_base=16384, channel_max=256, mbstd_group=4,
                 spectral_norm=False, attention_res=0, resample="bilinear", conv_clamp=0.0, channel_min=0,
                 grow=False):
        super().__init__()
        ch = lambda r: channels_at(r, channel_base, channel_max, channel_min)  # noqa: E731
        self.num_classes, self.resolution = num_classes, resolution
        self.from_img = EqualConv2d(img_channels, ch(resolution), 1, clamp=conv_clamp)
        resolutions = [2**i for i in range(int(math.log2(resolution)), 2, -1)]
        self.blocks = nn.Sequential(*[layer for r in resolutions for layer in  # attention before that block
                                      ([SelfAttention(ch(r))] if r == attention_res else []) +
                                      [DiscriminatorBlock(ch(r), ch(r // 2), resample, conv_clamp)]])
        starts = [i for i, m in enumerate(self.blocks)
                  if i == 0 or isinstance(self.blocks[i - 1], DiscriminatorBlock)]
        self.starts = dict(zip(resolutions + [4], starts + [len(self.blocks)]))  # res -> its first layer
        self.from_img_low = nn.ModuleDict({str(r): EqualConv2d(img_channels, ch(r), 1, clamp=conv_clamp)
                                           for r in resolutions[1:] + [4]}) if grow else None
        self.level = None
        self.mbstd = MinibatchStdDev(mbstd_group)
        self.conv = EqualConv2d(ch(4) + 1, ch(4), 3, clamp=conv_clamp)
        self.fc = EqualLinear(ch(4) * 16, ch(4), activation=True)
        self.out = EqualLinear(ch(4), 1)
        self.embed = EqualLinear(num_classes, ch(4), bias=False) if num_classes else None
        if spectral_norm:
            apply_spectral_norm(self)

    def from_image(self, img):  # (N, C, r, r) -> (N, ch(r), r, r)
        r = img.shape[-1]
        return self.from_img(img) if r == self.resolution else self.from_img_low[str(r)](img)

    def features(self, img):  # (N, C, r, r) -> (N, ch(4), 4, 4)
        """Each image's own features: the blocks' output, before the minibatch standard deviation.
        Images below the full resolution (a growing D) enter at their resolution's block."""
        img = activations(img)
        if self.level is not None:  # larger images (full-size ones) are taken down to the level's resolution
            while img.shape[-1] > 4 * 2 ** math.ceil(self.level):
                img = downsample2x(img)
        r = img.shape[-1]
        x, first = self.from_image(img), self.starts[r]
        fade = 1.0 if self.level is None else min(max(self.level - math.log2(r) + 3, 0.0), 1.0)
        if fade < 1:  # the resolution fading in: blend with the image at half the resolution
            first = self.starts[r // 2]
            x = torch.lerp(self.from_image(downsample2x(img)), self.blocks[self.starts[r]:first](x), fade)
        return self.blocks[first:](x)

    def forward(self, img, labels=None, batches=1):  # (N, C, R, R) -> (N,)
        """`batches`: img holds that many equal batches, scored as if one at a time (minibatch std)."""
        x = self.features(img)  # (N, ch(4), 4, 4)
        h = self.fc(self.conv(self.mbstd(x, batches)).flatten(1))  # (N, ch(4))
        score = self.out(h).squeeze(1)
        if self.num_classes:
            e = self.embed(F.one_hot(labels, self.num_classes).to(h.dtype))
            score = score + (e * h).sum(1) / math.sqrt(h.shape[1])
        return score
