"""StyleGAN2 for brain slices: mapping network, modulated-convolution skip generator, residual
discriminator with minibatch standard deviation and projection conditioning. Every layer uses
the equalised learning rate (weights drawn from N(0, 1) and scaled at run time by He's constant)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SQRT2 = math.sqrt(2)


def lrelu(x):
    """Leaky ReLU (slope 0.2) with gain sqrt(2), which keeps unit variance."""
    return F.leaky_relu(x, 0.2) * SQRT2


def pixel_norm(x, eps=1e-8):
    """Normalise each vector to unit root-mean-square."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def upsample2x(x):
    """Bilinear 2x up-sampling (the [1, 3, 3, 1] filter of StyleGAN2)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def downsample2x(x):
    """Anti-aliased 2x down-sampling (the [1, 3, 3, 1] filter of StyleGAN2)."""
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)


def conv2d(x, weight, stride=1, padding=0, groups=1, transpose=False, output_padding=0):
    """F.conv2d (or F.conv_transpose2d) whose gradients are again such convolutions, to any order.

    PyTorch's own second derivative of a convolution runs a convolution with an image-sized kernel;
    the lazy penalties differentiate twice, and that kernel took 57% of an H100 training step. As
    in StyleGAN2-ADA, each derivative here is an ordinary (transposed) convolution instead."""
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast here: the backward runs outside autocast
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
    if transpose and (stride, padding, groups) == (1, 1, 1) and _winograd_fits(x, weight.transpose(0, 1)):
        return conv2d(x, weight.transpose(0, 1).flip([2, 3]), padding=1)  # the same as a 3x3 conv
    return _Conv.apply(x, weight, (stride, padding, groups, transpose, output_padding))


def _input_grad(grad, weight, spec, input_shape):
    """d(conv(x, weight)) / dx applied to `grad`: the convolution the other way round."""
    stride, padding, groups, transpose, _ = spec
    if transpose:
        return conv2d(grad, weight, stride, padding, groups)
    k = weight.shape[-1]
    extra = input_shape[-1] - ((grad.shape[-1] - 1) * stride - 2 * padding + k)
    return conv2d(grad, weight, stride, padding, groups, transpose=True, output_padding=extra)


def _aten_conv(x, weight, spec):
    stride, padding, groups, transpose, output_padding = spec
    return torch.ops.aten.convolution(x, weight, None, [stride] * 2, [padding] * 2, [1, 1], transpose,
                                      [output_padding] * 2, groups)


def _aten_conv_grads(grad, x, weight, spec, mask):
    stride, padding, groups, transpose, output_padding = spec
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], transpose,
                                               [output_padding] * 2, groups, [*mask, False])[:2]


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, spec):
        ctx.save_for_backward(x, weight)
        ctx.spec = spec
        return winograd_conv(x, weight) if _winograd_fits(x, weight, spec) else _aten_conv(x, weight, spec)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if not torch.is_grad_enabled():  # a first-order backward: no graph to build
            if not _winograd_fits(x, weight, ctx.spec):  # PyTorch's fused kernel
                return *_aten_conv_grads(grad, x, weight, ctx.spec, [need_x, need_w]), None
            return *winograd_conv_grads(grad, x, weight, need_x, need_w), None
        grad_x = _input_grad(grad, weight, ctx.spec, x.shape) if need_x else None
        grad_w = _ConvWeightGrad.apply(grad, x, weight.shape, ctx.spec) if need_w else None
        return grad_x, grad_w, None


class _ConvWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x, weight_shape, spec):
        ctx.save_for_backward(grad, x)
        ctx.spec = spec
        weight = torch.zeros([], dtype=x.dtype, device=x.device).expand(weight_shape)  # only its shape is read
        if _winograd_fits(x, weight, spec):
            return winograd_conv_grads(grad, x, None, False, True)[1]
        return _aten_conv_grads(grad, x, weight, spec, [False, True])[1]

    @staticmethod
    def backward(ctx, grad_grad_w):  # <dW, G> is linear in the output gradient and in x
        grad, x = ctx.saved_tensors
        d_grad = conv2d(x, grad_grad_w, *ctx.spec) if ctx.needs_input_grad[0] else None
        d_x = _input_grad(grad, grad_grad_w, ctx.spec, x.shape) if ctx.needs_input_grad[1] else None
        return d_grad, d_x, None, None


# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016): a stride-1 3x3 convolution as 16 matrix
# products over 4x4 input tiles, one per 2x2 output tile: 16 instead of 36 multiplies per tile. Y = A^T
# [(G g G^T) * (B^T d B)] A, with the input and output transforms written out below. It is exact to float32
# rounding; on the CPU it took the 64x64, 256-channel training step from 87% to 109% of the direct
# convolution's peak. CUDA keeps cuDNN's own algorithms.
WINOGRAD = dict(
    enabled=False,  # set by use_winograd()
    min_channels=128, min_size=16,  # below these it was slower (2-core CPU, fwd+bwd, batch 16: 0.4x at 16
    # channels, 1.17x at 128, 1.55x at 256; 256 channels at 8x8: 1.08x, at 4x4: 0.71x)
    chunk=2**20,  # input values per batch chunk: each chunk's tiles stay in cache
)
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def use_winograd(setting, device):
    """Run stride-1 3x3 float32 convolutions (forward and every derivative) with Winograd's F(2x2, 3x3):
    setting 'on', 'off', or 'auto' (on for the CPU)."""
    WINOGRAD["enabled"] = setting == "on" or (setting == "auto" and device.type == "cpu")


def _winograd_fits(x, weight, spec=(1, 1, 1, False, 0)):
    h, w = x.shape[-2:]
    return (WINOGRAD["enabled"] and spec == (1, 1, 1, False, 0) and weight.shape[-2:] == (3, 3)
            and x.dtype == torch.float32 and h % 2 == 0 and w % 2 == 0 and min(h, w) >= WINOGRAD["min_size"]
            and min(weight.shape[:2]) >= WINOGRAD["min_channels"])


def _transform_in(r, out):
    """B^T d along one axis: four tile rows -> four transformed rows, into out[0..3]."""
    torch.sub(r[0], r[2], out=out[0])
    torch.add(r[1], r[2], out=out[1])
    torch.sub(r[2], r[1], out=out[2])
    torch.sub(r[1], r[3], out=out[3])


def _transform_out(m, out):
    """A^T m along one axis: four products -> two output rows, into out[0..1]."""
    torch.add(m[0], m[1], out=out[0]).add_(m[2])
    torch.sub(m[1], m[2], out=out[1]).sub_(m[3])


def _transform_out_adjoint(y, out):
    """(A^T)^T y: two output rows -> four products, into out[0..3]."""
    out[0].copy_(y[0])
    torch.add(y[0], y[1], out=out[1])
    torch.sub(y[0], y[1], out=out[2])
    torch.neg(y[1], out=out[3])


def _input_tiles(xp):  # zero-padded (n, H+2, W+2, C) -> (16, n*H/2*W/2, C)
    n, hp, wp, c = xp.shape
    th, tw = (hp - 2) // 2, (wp - 2) // 2
    rows = xp.new_empty(4, n, th, wp, c)
    _transform_in([xp[:, a:a + 2 * th:2] for a in range(4)], rows)
    tiles = xp.new_empty(4, 4, n, th, tw, c)
    for k in range(4):
        _transform_in([rows[k][:, :, b:b + 2 * tw:2] for b in range(4)], tiles[k])
    return tiles.view(16, n * th * tw, c)


def _every_other(t, dim, start):
    return t.unflatten(dim, (-1, 2)).select(dim + 1, start)


def _overlap_add(v, out, dim):
    """The transpose of B^T d along `dim`: four tile rows v[0..3] (stride-2 tiles overlapping by two,
    padding dropped) summed back into out's rows: even ones v1 - v2 + v3 - v3[-1], odd ones v1 + v2 - v0 + v0[+1]."""
    even, odd = _every_other(out, dim, 0), _every_other(out, dim, 1)
    m = v[0].shape[dim]
    torch.sub(v[1], v[2], out=even).add_(v[3])
    even.narrow(dim, 1, m - 1).sub_(v[3].narrow(dim, 0, m - 1))
    torch.add(v[1], v[2], out=odd).sub_(v[0])
    odd.narrow(dim, 0, m - 1).add_(v[0].narrow(dim, 1, m - 1))


def _input_tiles_adjoint(v, out):  # (16, n*th*tw, C) -> out (n, 2th, 2tw, C): the transpose of _input_tiles
    n, h, w, c = out.shape
    v = v.view(4, 4, n, h // 2, w // 2, c)
    cols = v.new_empty(4, n, h // 2, w, c)
    for k in range(4):
        _overlap_add(v[k], cols[k], 2)
    _overlap_add(cols, out, 1)


def _output_tiles(m, y):  # (16, n*th*tw, Co) products -> y (n, 2th, 2tw, Co)
    n, h, w, co = y.shape
    m = m.view(4, 4, n, h // 2, w // 2, co)
    half = m.new_empty(4, 2, n, h // 2, w // 2, co)
    for k in range(4):
        _transform_out(m[k], half[k])
    y = y.view(n, h // 2, 2, w // 2, 2, co)
    for b in range(2):
        _transform_out(half[:, b], [y[:, :, a, :, b] for a in range(2)])


def _output_tiles_adjoint(g):  # (n, H, W, Co) -> (16, n*H/2*W/2, Co)
    n, h, w, co = g.shape
    g = g.view(n, h // 2, 2, w // 2, 2, co)
    rows = g.new_empty(4, n, h // 2, w // 2, 2, co)
    _transform_out_adjoint([g[:, :, 0], g[:, :, 1]], rows)
    m = g.new_empty(4, 4, n, h // 2, w // 2, co)
    for k in range(4):
        _transform_out_adjoint([rows[k][..., 0, :], rows[k][..., 1, :]], m[k])
    return m.view(16, -1, co)


def _padded_chunks(x, fill=True):
    """Yield (start, (b, H+2, W+2, C) zero-padded channels-last copy) for chunks of the batch (left
    unfilled, zeros, without `fill`)."""
    n, c, h, w = x.shape
    size = max(1, WINOGRAD["chunk"] // (c * h * w))
    xp = x.new_zeros(min(size, n), h + 2, w + 2, c)
    for i in range(0, n, size):
        b = min(size, n - i)
        if fill:
            xp[:b, 1:-1, 1:-1] = x[i:i + b].permute(0, 2, 3, 1)
        yield i, xp[:b]


def _transformed_weight(weight):  # (Co, Ci, 3, 3) -> (16, Ci, Co): G g G^T
    g = weight.new_tensor(_G)
    return torch.einsum("ka,lb,oiab->klio", g, g, weight).reshape(16, weight.shape[1], weight.shape[0])


def winograd_conv(x, weight):  # (N, Ci, H, W), (Co, Ci, 3, 3) -> (N, Co, H, W), padding 1, channels-last strides
    """conv2d(x, weight, padding=1) by Winograd's F(2x2, 3x3), a batch chunk at a time."""
    n, _, h, w = x.shape
    wt = _transformed_weight(weight)
    y = x.new_empty(n, h, w, weight.shape[0])
    for i, xp in _padded_chunks(x):
        _output_tiles(torch.bmm(_input_tiles(xp), wt), y[i:i + len(xp)])
    return y.permute(0, 3, 1, 2)


def winograd_conv_grads(grad, x, weight, need_x, need_w):  # (N, Co, H, W), (N, Ci, H, W), (Co, Ci, 3, 3)
    """The gradients of conv2d(x, weight, padding=1) for x and weight in one pass over the tiles of `grad`:
    the transposed transforms, so each chunk's output-gradient tiles serve both products."""
    n, ci, h, w = x.shape
    g = x.new_tensor(_G)
    grad = grad.permute(0, 2, 3, 1)  # (N, H, W, Co)
    grad_x = x.new_empty(n, h, w, ci) if need_x else None
    gwt = x.new_zeros(16, ci, grad.shape[-1]) if need_w else None
    if need_x:
        wt = _transformed_weight(weight).transpose(1, 2)  # (16, Co, Ci)
    for i, xp in _padded_chunks(x, need_w):
        b = len(xp)
        grad_m = _output_tiles_adjoint(grad[i:i + b].contiguous())  # (16, P, Co)
        if need_w:
            gwt.baddbmm_(_input_tiles(xp).transpose(1, 2), grad_m)
        if need_x:
            _input_tiles_adjoint(torch.bmm(grad_m, wt), grad_x[i:i + b])
    grad_w = torch.einsum("ka,lb,klio->oiab", g, g, gwt.view(4, 4, *gwt.shape[1:])) if need_w else None
    return grad_x.permute(0, 3, 1, 2) if need_x else None, grad_w


def channels_at(res, channel_base, channel_max):
    """Feature maps at resolution `res`."""
    return min(channel_base // res, channel_max)


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
        bias = self.bias * self.lr_mult if self.bias is not None else None
        x = F.linear(x, self.weight * self.scale, bias)
        return lrelu(x) if self.activation else x


class EqualConv2d(nn.Module):
    """Convolution with equalised learning rate; `down` halves the resolution first."""

    def __init__(self, in_channels, out_channels, kernel_size, bias=True, activation=True, down=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.activation, self.down = activation, down

    def forward(self, x):
        if self.down:
            x = downsample2x(x)
        x = conv2d(x, self.weight * self.scale, padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias[None, :, None, None]
        return lrelu(x) if self.activation else x


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
    """SAGAN self-attention (seed 003): every position attends to every other one, and the result is
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
    output. The per-sample grouped-convolution form (fused=True) gives the same result but generated
    slower at batch 64: 955 vs 1,411 img/s on an H100 at 256x256, 4.6 vs 5.7 on a 2-core CPU at 64x64."""

    def __init__(self, in_channels, out_channels, kernel_size, w_dim, demodulate=True, up=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.demodulate, self.up = demodulate, up
        self.blur = Blur() if up else None

    def forward(self, x, w, fused=False):  # (N, Cin, H, W), (N, w_dim) -> (N, Cout, H', W')
        styles = self.affine(w)  # (N, Cin)
        weight = self.weight * self.scale  # (Cout, Cin, k, k)
        dcoefs = None
        if self.demodulate:  # 1/sqrt(sum_{i,k} (w_oik s_i)^2) = 1/sqrt(s^2 @ sum_k w_oik^2)
            dcoefs = (styles.square() @ weight.square().sum([2, 3]).T + 1e-8).rsqrt()  # (N, Cout)
        x = self._grouped(x, weight, styles, dcoefs) if fused else self._scaled(x, weight, styles, dcoefs)
        return self.blur(x) if self.up else x

    def _scaled(self, x, weight, styles, dcoefs):
        x = x * styles[:, :, None, None]
        if self.up:
            x = conv2d(x, weight.transpose(0, 1), stride=2, transpose=True)
        else:
            x = conv2d(x, weight, padding=weight.shape[-1] // 2)
        return x * dcoefs[:, :, None, None] if dcoefs is not None else x

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
    """Adds per-pixel Gaussian noise scaled by a learned per-layer strength (starts at zero)."""

    def __init__(self, resolution):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("const_noise", torch.randn(1, 1, resolution, resolution))

    def forward(self, x, noise_mode="random"):
        if noise_mode == "none":
            return x
        if noise_mode == "const":
            noise = self.const_noise
        else:
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        return x + noise * self.strength


class StyledLayer(nn.Module):
    """One synthesis layer: modulated 3x3 convolution, noise, bias, leaky ReLU."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, up=False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up)
        self.noise = NoiseInjection(resolution)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x, w, noise_mode="random"):
        x = self.noise(self.conv(x, w), noise_mode)
        return lrelu(x + self.bias[None, :, None, None])


class ToImage(nn.Module):
    """1x1 modulated convolution (no demodulation) from features to the image channels."""

    def __init__(self, in_channels, img_channels, w_dim):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, img_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(img_channels))

    def forward(self, x, w):
        return self.conv(x, w) + self.bias[None, :, None, None]


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: up-sampling conv, conv, and an image output that is
    added to the up-sampled image of the previous resolution. Uses three w's."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels):
        super().__init__()
        self.conv0 = StyledLayer(in_channels, out_channels, w_dim, resolution, up=True)
        self.conv1 = StyledLayer(out_channels, out_channels, w_dim, resolution)
        self.to_img = ToImage(out_channels, img_channels, w_dim)

    def forward(self, x, img, ws, noise_mode="random", weight=1.0):  # x (N, Cin, R/2, R/2) -> (N, Cout, R, R)
        x = self.conv0(x, ws[:, 0], noise_mode)
        x = self.conv1(x, ws[:, 1], noise_mode)
        out = self.to_img(x, ws[:, 2])
        return x, upsample2x(img) + (out if weight == 1 else out * weight)  # weight < 1: fading in


class SynthesisNetwork(nn.Module):
    """Learned 4x4 constant, then one SynthesisBlock per resolution up to the output resolution.

    `level` is progressive training's growth level (None: every resolution): the image output of
    the block at 4 * 2^k has weight clamp(level - k + 1, 0, 1), blocks with weight 0 are skipped,
    and the image is up-sampled to the output resolution."""

    def __init__(self, w_dim, resolution, img_channels, channel_base, channel_max, attention_res=0):
        super().__init__()
        ch = lambda r: channels_at(r, channel_base, channel_max)  # noqa: E731
        self.const = nn.Parameter(torch.randn(ch(4), 4, 4))
        self.conv = StyledLayer(ch(4), ch(4), w_dim, 4)
        self.to_img = ToImage(ch(4), img_channels, w_dim)
        self.resolutions = [2**i for i in range(3, int(math.log2(resolution)) + 1)]
        self.blocks = nn.ModuleList(SynthesisBlock(ch(r // 2), ch(r), w_dim, r, img_channels)
                                    for r in self.resolutions)
        self.attention_res = attention_res
        self.attention = SelfAttention(ch(attention_res)) if attention_res else None  # after that block
        self.num_ws = 2 + 2 * len(self.blocks)
        self.level = None

    def forward(self, ws, noise_mode="random"):  # ws (N, num_ws, w_dim) -> (N, C, R, R)
        x = self.const[None].expand(ws.shape[0], -1, -1, -1)
        x = self.conv(x, ws[:, 0], noise_mode)
        img = self.to_img(x, ws[:, 1])
        for i, (block, res) in enumerate(zip(self.blocks, self.resolutions)):
            weight = 1.0 if self.level is None else min(max(self.level - i, 0.0), 1.0)
            if weight == 0:
                break
            x, img = block(x, img, ws[:, 1 + 2 * i:4 + 2 * i], noise_mode, weight)
            if res == self.attention_res:
                x = self.attention(x)
        while img.shape[-1] < self.resolutions[-1]:  # a growing generator: up to the output size
            img = upsample2x(img)
        return img


class Generator(nn.Module):
    """Mapping network + synthesis network, with style mixing in training and truncation at inference."""

    def __init__(self, z_dim, w_dim, mapping_layers, resolution, img_channels, num_classes=0,
                 channel_base=16384, channel_max=256, mapping_lr_mult=0.01, w_avg_beta=0.995, attention_res=0):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, num_classes, mapping_lr_mult, w_avg_beta)
        self.synthesis = SynthesisNetwork(w_dim, resolution, img_channels, channel_base, channel_max, attention_res)
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


def at_growth_level(img, level):  # (N, C, R, R) -> (N, C, R, R)
    """Real images as a growing generator at `level` draws them: down-sampled to 4 * 2^floor(level),
    blended toward the next resolution by the fraction of level, and up-sampled back to R."""
    top = int(math.log2(img.shape[-1])) - 2
    if level is None or level >= top:
        return img

    def at(k):  # the image at 4 * 2^k, up-sampled back like the skip generator's outputs
        x = img
        for _ in range(top - k):
            x = downsample2x(x)
        for _ in range(top - k):
            x = upsample2x(x)
        return x

    low, fade = math.floor(level), level - math.floor(level)
    return at(low) if fade == 0 else torch.lerp(at(low), at(low + 1), fade)


class MinibatchStdDev(nn.Module):
    """Appends the standard deviation of the features across groups of samples as one extra
    channel, so the discriminator can see a lack of variety (mode collapse)."""

    def __init__(self, group_size=4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x):  # (N, C, H, W) -> (N, C + 1, H, W)
        n, c, h, w = x.shape
        g = max(d for d in range(1, min(self.group_size, n) + 1) if n % d == 0)
        y = x.reshape(g, -1, c, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()  # (N/g, C, H, W)
        y = y.mean([1, 2, 3]).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)  # (N, 1, H, W)
        return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual block: 3x3 conv, down-sampling 3x3 conv, plus a down-sampled 1x1 skip; sum / sqrt(2)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, activation=False, down=True)

    def forward(self, x):  # (N, Cin, R, R) -> (N, Cout, R/2, R/2)
        return (self.skip(x) + self.conv1(self.conv0(x))) / SQRT2


def apply_spectral_norm(module):
    """Spectral normalisation (seed 003) of every convolution and fully connected layer in `module`:
    each weight is divided by its largest singular value (one power iteration per forward pass).
    The equalised learning rate's constant is dropped there: it would shrink every layer again."""
    for layer in module.modules():
        if isinstance(layer, (EqualConv2d, EqualLinear)):
            nn.utils.parametrizations.spectral_norm(layer, "weight")
            layer.scale = layer.lr_mult if isinstance(layer, EqualLinear) else 1.0


class Discriminator(nn.Module):
    """Image -> score: from-image 1x1 conv, residual blocks down to 4x4, minibatch std, conv, FC;
    conditional models add a projection of the class embedding onto the final features."""

    def __init__(self, resolution, img_channels, num_classes=0, channel_base=16384, channel_max=256, mbstd_group=4,
                 spectral_norm=False, attention_res=0):
        super().__init__()
        ch = lambda r: channels_at(r, channel_base, channel_max)  # noqa: E731
        self.num_classes = num_classes
        self.from_img = EqualConv2d(img_channels, ch(resolution), 1)
        resolutions = [2**i for i in range(int(math.log2(resolution)), 2, -1)]
        self.blocks = nn.Sequential(*[layer for r in resolutions for layer in  # attention before that block
                                      ([SelfAttention(ch(r))] if r == attention_res else []) +
                                      [DiscriminatorBlock(ch(r), ch(r // 2))]])
        self.mbstd = MinibatchStdDev(mbstd_group)
        self.conv = EqualConv2d(ch(4) + 1, ch(4), 3)
        self.fc = EqualLinear(ch(4) * 16, ch(4), activation=True)
        self.out = EqualLinear(ch(4), 1)
        self.embed = EqualLinear(num_classes, ch(4), bias=False) if num_classes else None
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, img, labels=None):  # (N, C, R, R) -> (N,)
        x = self.blocks(self.from_img(img))  # (N, ch(4), 4, 4)
        h = self.fc(self.conv(self.mbstd(x)).flatten(1))  # (N, ch(4))
        score = self.out(h).squeeze(1)
        if self.num_classes:
            e = self.embed(F.one_hot(labels, self.num_classes).to(h.dtype))
            score = score + (e * h).sum(1) / math.sqrt(h.shape[1])
        return score


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
