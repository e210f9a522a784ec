"""Low-level operations below the networks: a 2D convolution whose derivatives are again
convolutions (to any order, for the lazy penalties' double backward), Winograd's F(2x2, 3x3) for
stride-1 3x3 convolutions on the CPU, 1x1 convolutions to or from one channel as matrix products,
convolutions with their bias and leaky ReLU in oneDNN's kernel, a 1x1 convolution with per-sample weights,
the process-wide fast-kernel switches, a clock of the time in convolution kernels (bench.py), and the
area-averaged thumbnails that the mode-seeking penalty and the pixel-space metrics compare images by."""
import contextlib
import ctypes
import functools
import time

import torch
import torch.nn.functional as F

import constants

CONV_CLOCK = dict(on=False, seconds=0.0)  # time in convolution kernels, while on (bench.py)


def _clocked(kernel):
    """`kernel` with its wall time added to CONV_CLOCK while the clock is on. The time is the kernel's
    own only where kernels run synchronously: on the CPU."""
    @functools.wraps(kernel)
    def clocked(*args):
        if not CONV_CLOCK["on"]:
            return kernel(*args)
        start = time.perf_counter()
        try:
            return kernel(*args)
        finally:
            CONV_CLOCK["seconds"] += time.perf_counter() - start
    return clocked


@contextlib.contextmanager
def conv_clock(enabled=True):
    """Time the convolution kernels run inside the block: yields CONV_CLOCK, whose 'seconds' grows
    (stays 0 when not `enabled`)."""
    CONV_CLOCK.update(on=enabled, seconds=0.0)
    try:
        yield CONV_CLOCK
    finally:
        CONV_CLOCK["on"] = False


def conv2d(x, weight, stride=1, padding=0, groups=1, transpose=False, output_padding=0):
    """F.conv2d (or F.conv_transpose2d) whose gradients are again such convolutions, to any order.

    PyTorch's own second derivative of a convolution runs a convolution with an image-sized kernel,
    slow on GPUs, and the lazy penalties differentiate twice. As in StyleGAN2-ADA, each derivative
    here is an ordinary (transposed) convolution instead."""
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast here: the backward runs outside autocast
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
    if transpose and (stride, padding, groups) == (1, 1, 1) and _winograd_fits(x, weight.transpose(0, 1)):
        return conv2d(x, weight.transpose(0, 1).flip([2, 3]), padding=1)  # the same as a 3x3 conv
    if LAYOUT["channels_last"] and _image_side_pointwise(weight, (stride, padding, groups, transpose)):
        return pointwise_conv(x, weight)
    return _Conv.apply(x, weight, (stride, padding, groups, transpose, output_padding))


def _image_side_pointwise(weight, spec):
    return weight.shape[-2:] == (1, 1) and 1 in weight.shape[:2] and spec == (1, 0, 1, False)


@_clocked
def pointwise_conv(x, weight):  # (N, Ci, H, W), (Co, Ci, 1, 1) -> (N, Co, H, W), channels-last strides
    """A 1x1 convolution to or from one channel (a network's image side on grey slices) as the matrix product it
    is. On the CPU it runs several times faster than oneDNN's convolution, whose 1-channel images are laid out
    alike in both memory orders, so that it returns the default one; this keeps the activations channels-last."""
    return _pixels_times(x, weight.flatten(1).t())


@_clocked
def pointwise_conv_per_sample(x, weights):  # (N, Ci, H, W), (N, Ci, Co) -> (N, Co, H, W), channels-last strides
    """A 1x1 convolution with one weight matrix per sample (a modulated to-image layer, the styles in its weights), as
    one batched matrix product over channels-last pixels: no pass over x to scale it first."""
    return _pixels_times(x, weights)


def _pixels_times(x, weights):  # (N, Ci, H, W), (Ci, Co) or (N, Ci, Co) -> (N, Co, H, W), channels-last strides
    n, ci, h, w = x.shape
    out = torch.matmul(x.permute(0, 2, 3, 1).reshape(n, h * w, ci), weights)  # (N, H*W, Co): one mm, or a bmm
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def _input_grad(grad, weight, spec, input_shape):
    """d(conv(x, weight)) / dx applied to `grad`: the convolution the other way round."""
    stride, padding, groups, transpose, _ = spec
    if transpose:
        return conv2d(grad, weight, stride, padding, groups)
    k = weight.shape[-1]
    extra = input_shape[-1] - ((grad.shape[-1] - 1) * stride - 2 * padding + k)
    return conv2d(grad, weight, stride, padding, groups, transpose=True, output_padding=extra)


@_clocked
def _aten_conv(x, weight, spec):
    stride, padding, groups, transpose, output_padding = spec
    return torch.ops.aten.convolution(x, weight, None, [stride] * 2, [padding] * 2, [1, 1], transpose,
                                      [output_padding] * 2, groups)


@_clocked
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
        grad = activations(grad)  # else the input gradient, and every layer's below, would take grad's order
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


def conv2d_bias_lrelu(x, weight, bias, stride=1, padding=0, slope=0.2):
    """leaky_relu(conv2d(x, weight, stride, padding) + bias, slope). On the CPU in channels-last order, one oneDNN
    kernel with the bias and the activation in the convolution's epilogue: two passes over the output fewer; from a
    1-channel image, one multiply-add and the activation in place."""
    spec = (stride, padding, 1, False, 0)
    if _epilogue_fits(x, weight, spec):
        if _image_side_pointwise(weight, spec[:4]) and x.shape[1] == 1:
            return _FromImageBiasLReLU.apply(x, weight, bias, slope)
        return _ConvBiasLReLU.apply(x, weight, bias, spec, slope)
    return F.leaky_relu(conv2d(x, weight, stride, padding) + bias.view(1, -1, 1, 1), slope)


EPILOGUE = dict(enabled=False)  # set by use_fast_kernels: on for the CPU where oneDNN's fused kernel works


def fused_epilogue(device):
    """Whether D's layers on `device` run oneDNN's convolution with the bias and activation in its epilogue."""
    return EPILOGUE["enabled"] and LAYOUT["channels_last"] and device.type == "cpu"


def _epilogue_fits(x, weight, spec):
    return (fused_epilogue(x.device) and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not _winograd_fits(x, weight, spec))


def epilogue_kernel_works():
    """Whether this PyTorch build runs oneDNN's convolution with a fused bias and leaky ReLU, and agrees with the
    composition (checked once per process, on a tiny layer); where it does not, the composition runs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, generator=g)
    try:
        y = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 1, "leaky_relu", [0.2], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return torch.allclose(y, F.leaky_relu(F.conv2d(x, w, b, padding=1), 0.2), rtol=1e-4, atol=1e-5)


@_clocked
def _mkldnn_conv_bias_lrelu(x, weight, bias, spec, slope):
    stride, padding = spec[:2]
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [padding] * 2, [stride] * 2, [1, 1], 1,
                                                   "leaky_relu", [slope], "")


class _ConvBiasLReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec, slope):
        out = _mkldnn_conv_bias_lrelu(x, weight, bias, spec, slope)
        ctx.save_for_backward(x, weight, out)  # out > 0 where the activation's input was
        ctx.spec, ctx.slope = spec, slope
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = _lrelu_grad(activations(grad), out, ctx.slope)
        if torch.is_grad_enabled():  # building a graph (the penalties' double backward): differentiable ops
            grad_x = _input_grad(grad, weight, ctx.spec, x.shape) if need_x else None
            grad_w = _ConvWeightGrad.apply(grad, x, weight.shape, ctx.spec) if need_w else None
        else:
            grad_x, grad_w = _aten_conv_grads(grad, x, weight, ctx.spec, [need_x, need_w])
        return grad_x, grad_w, grad.sum((0, 2, 3)) if need_b else None, None, None


def _lrelu_grad(grad, out, slope):
    """leaky_relu's backward from its output; differentiable (in grad) when a graph is being built."""
    if torch.is_grad_enabled():
        return grad * torch.where(out > 0, 1.0, slope)
    return torch.ops.aten.leaky_relu_backward(grad, out, slope, True)


@_clocked
def _from_image_bias_lrelu(x, weight, bias, slope):
    n, _, h, w = x.shape
    return F.leaky_relu_(torch.addcmul(bias, x.reshape(n, h, w, 1), weight.flatten()), slope)


class _FromImageBiasLReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, slope):  # (N, 1, H, W), (Co, 1, 1, 1) -> (N, Co, H, W), channels-last strides
        out = _from_image_bias_lrelu(x, weight, bias, slope)  # (N, H, W, Co)
        ctx.save_for_backward(x, weight, out)
        ctx.slope = slope
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = _lrelu_grad(activations(grad).permute(0, 2, 3, 1), out, ctx.slope).reshape(-1, out.shape[-1])
        grad_x = (grad @ weight.view(-1, 1)).view(x.shape) if need_x else None  # (N*H*W, Co) @ (Co, 1)
        grad_w = (x.reshape(1, -1) @ grad).view(weight.shape) if need_w else None
        return grad_x, grad_w, grad.sum(0) if need_b else None, None


# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016): a stride-1 3x3 convolution as 16 matrix
# products over 4x4 input tiles, one per 2x2 output tile: 16 instead of 36 multiplies per tile. Y = A^T
# [(G g G^T) * (B^T d B)] A, with the input and output transforms written out below. It is exact to float32
# rounding. It runs on the CPU only, and only for layers of at least min_channels channels and min_size
# pixels (constants.WINOGRAD_KERNEL), where it measured faster than the direct convolution (docs/speed.md);
# CUDA keeps cuDNN's own algorithms.
WINOGRAD = dict(enabled=False, **constants.WINOGRAD_KERNEL)  # enabled: set by use_winograd()
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


@_clocked
def winograd_conv(x, weight):  # (N, Ci, H, W), (Co, Ci, 3, 3) -> (N, Co, H, W), padding 1, channels-last strides
    """conv2d(x, weight, padding=1) by Winograd's F(2x2, 3x3), a batch chunk at a time."""
    n, _, h, w = x.shape
    wt = _transformed_weight(weight)
    y = x.new_empty(n, h, w, weight.shape[0])
    for i, xp in _padded_chunks(x):
        _output_tiles(torch.bmm(_input_tiles(xp), wt), y[i:i + len(xp)])
    return y.permute(0, 3, 1, 2)


@_clocked
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


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse. By default it hands every freed block over
    32 MB back to the system, so each large activation of a CPU step is paged in and zeroed by the
    kernel again. Elsewhere (not glibc) it does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers in malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 2**30) and libc.mallopt(m_trim_threshold, 2**31 - 1))


LAYOUT = dict(channels_last=False)  # set by use_fast_kernels: True on the CPU


def activations(x):
    """x in the memory layout the networks' activations take: channels-last on the CPU, where oneDNN's
    convolutions of thin, large activations run faster in it (docs/speed.md); as it is elsewhere."""
    return x.contiguous(memory_format=torch.channels_last) if LAYOUT["channels_last"] and x.dim() == 4 else x


def use_fast_kernels(device, winograd="auto"):
    """The process-wide speed settings each script makes once it knows its device: Winograd's
    convolution where it is faster (--winograd), channels-last activations and D's convolutions with their
    bias and activation in the kernel on the CPU, and malloc keeping freed memory."""
    use_winograd(winograd, device)
    LAYOUT["channels_last"] = device.type == "cpu"
    EPILOGUE["enabled"] = device.type == "cpu" and epilogue_kernel_works()
    keep_freed_memory()


def thumbnails(images, size=16):
    """Images area-averaged to size x size and flattened: (N, C, H, W) -> (N, C*size*size)."""
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)
