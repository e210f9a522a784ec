"""ops.py: the convolutions whose derivatives are convolutions (to the second derivative, Winograd's
included), anti-aliased resampling, bf16 under autocast, the allocator setting, and the clock of the
convolutions."""
import resource
from types import SimpleNamespace

import pytest
import torch

import modules
import ops


def test_keep_freed_memory_reuses_a_large_freed_block_without_paging_it_in_again():
    if not ops.keep_freed_memory():
        pytest.skip("not glibc's malloc")
    torch.empty(2**24).fill_(1)  # 64 MB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24 - 2**20).fill_(1)  # 60 MB fit into it
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1000  # a fresh block: 15,360 pages


CONV_CASES = [  # cin, cout, kernel, stride, padding, groups, transpose, size: every use in the model
    (4, 6, 3, 1, 1, 1, False, 7),  # 3x3 convolution
    (4, 6, 1, 1, 0, 1, False, 5),  # 1x1 (to image, skip)
    (6, 4, 3, 2, 0, 1, True, 5),  # up-sampling transposed 3x3
    (4, 4, 4, 1, 1, 4, False, 9),  # depthwise blur
    (4, 6, 3, 2, 1, 1, False, 8),  # strided (the transposed one's input gradient)
]


@pytest.mark.determinism
@pytest.mark.parametrize("cin,cout,k,stride,padding,groups,transpose,size", CONV_CASES)
def test_conv2d_matches_torch_to_the_second_derivative(cin, cout, k, stride, padding, groups, transpose, size):
    torch.manual_seed(0)
    x = torch.randn(3, cin, size, size, dtype=torch.float64, requires_grad=True)
    shape = (cin, cout // groups, k, k) if transpose else (cout, cin // groups, k, k)
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ours = lambda x, w: ops.conv2d(x, w, stride, padding, groups, transpose)  # noqa: E731
    theirs = (lambda x, w: torch.nn.functional.conv_transpose2d(x, w, None, stride, padding, 0, groups)) if transpose \
        else (lambda x, w: torch.nn.functional.conv2d(x, w, None, stride, padding, 1, groups))
    assert torch.allclose(ours(x, w), theirs(x, w))
    # first and second derivatives (the lazy penalties' double backward) against PyTorch's own
    g = torch.randn_like(ours(x, w))

    def derivatives(f):
        x.grad = w.grad = None
        gx, gw = torch.autograd.grad(f(x, w), (x, w), g, create_graph=True)
        (gx.square().sum() + gw.square().sum()).backward()
        return gx.detach(), gw.detach(), x.grad.clone(), w.grad.clone()

    for a, b in zip(derivatives(ours), derivatives(theirs)):
        assert torch.allclose(a, b)
    assert torch.autograd.gradgradcheck(ours, (x, w))


@pytest.mark.determinism
@pytest.mark.parametrize("cin,cout", [(1, 6), (6, 1), (1, 1)])  # from an image, to an image
def test_pointwise_conv_to_or_from_one_channel_matches_torch_to_the_second_derivative(monkeypatch, cin, cout):
    monkeypatch.setitem(ops.LAYOUT, "channels_last", True)  # where conv2d takes it (the CPU's layout)
    torch.manual_seed(0)
    x = torch.randn(3, cin, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(cout, cin, 1, 1, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, cout, 5, 7, dtype=torch.float64)
    theirs = lambda x, w: torch.nn.functional.conv2d(x, w)  # noqa: E731
    for a, b in zip(conv_derivatives(ops.conv2d, x, w, g), conv_derivatives(theirs, x, w, g)):
        assert torch.allclose(a, b)
    assert ops.conv2d(x, w).is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradgradcheck(ops.conv2d, (x, w))


@pytest.mark.parametrize("cin,cout,k,stride,padding,size", [
    (1, 6, 1, 1, 0, 8),  # from a grey image: a multiply-add
    (3, 6, 1, 1, 0, 8),  # from an RGB image
    (4, 6, 3, 1, 1, 8),  # a 3x3 layer of D
    (4, 6, 3, 2, 0, 9),  # D's down-sampling 3x3 layer with resample upfirdn: strides over the blurred image
])
def test_conv_with_bias_and_leaky_relu_in_one_kernel_matches_the_composition_to_the_second_derivative(
        monkeypatch, cin, cout, k, stride, padding, size):
    """In the CPU's layout (channels-last) a convolution takes its bias and leaky ReLU in the same kernel: the same
    values, first derivatives, and derivatives of a penalty on them as conv2d, +, leaky ReLU (float32: rounding)."""
    torch.manual_seed(0)
    x = torch.randn(2, cin, size, size).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(cout, cin, k, k) / k, torch.randn(cout)
    out = (size + 2 * padding - k) // stride + 1
    g = torch.randn(2, cout, out, out)

    def derivatives(fused):
        monkeypatch.setitem(ops.LAYOUT, "channels_last", fused)
        monkeypatch.setitem(ops.EPILOGUE, "enabled", fused)
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = ops.conv2d_bias_lrelu(xs, ws, bs, stride, padding)
        assert ("BiasLReLU" in y.grad_fn.name()) == fused
        assert y.is_contiguous(memory_format=torch.channels_last) or not fused
        first = torch.autograd.grad(y, (xs, ws, bs), g)  # no graph: the first-order kernels
        gx, = torch.autograd.grad(ops.conv2d_bias_lrelu(xs, ws, bs, stride, padding), xs, g, create_graph=True)
        second = torch.autograd.grad(gx.square().sum(), (xs, ws, bs), allow_unused=True, materialize_grads=True)
        return y.detach(), *first, *second  # the penalties' path

    for a, c in zip(derivatives(False), derivatives(True)):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def test_the_fused_epilogue_runs_only_where_the_kernel_works(monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    ops.use_fast_kernels(torch.device("cpu"))
    assert ops.EPILOGUE["enabled"]
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(5)
    assert "BiasLReLU" in ops.conv2d_bias_lrelu(ops.activations(x), w.requires_grad_(), b, padding=1).grad_fn.name()

    def broken(*args):
        raise RuntimeError("no such kernel in this build")
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", broken)
    ops.use_fast_kernels(torch.device("cpu"))
    assert not ops.EPILOGUE["enabled"]
    y = ops.conv2d_bias_lrelu(ops.activations(x), w, b, padding=1)  # the composition
    assert torch.allclose(y, torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(x, w, b, padding=1), 0.2),
                          atol=1e-5)


def test_gradients_stay_channels_last_through_the_networks_backward_and_double_backward(monkeypatch):
    """Every convolution kernel of D's backward, and of the double backward of a penalty on its input gradient (R1),
    gets its operands channels-last: a gradient in the default order makes oneDNN hand back that order, and every
    layer below it then runs at about half speed."""
    monkeypatch.setitem(ops.LAYOUT, "channels_last", True)
    monkeypatch.setitem(ops.EPILOGUE, "enabled", True)
    seen = []

    def spy(kernel, activations):  # the number of activation operands in front: (x, ...) or (grad, x, ...)
        def run(*args):
            seen.extend(t.is_contiguous(memory_format=torch.channels_last) for t in args[:activations]
                        if t.shape[1] > 1 and t.shape[-1] > 1)
            return kernel(*args)
        return run
    for name, activations in (("_aten_conv", 1), ("_aten_conv_grads", 2), ("_mkldnn_conv_bias_lrelu", 1)):
        monkeypatch.setattr(ops, name, spy(getattr(ops, name), activations))
    torch.manual_seed(0)
    D = modules.Discriminator(img_channels=1, resolution=16, channel_base=64, channel_max=8)
    x = ops.activations(torch.randn(4, 1, 16, 16)).requires_grad_()
    D(x).sum().backward()  # D's step
    grad, = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    grad.square().sum().backward()  # R1
    assert len(seen) > 20 and all(seen), seen


def conv_derivatives(f, x, w, g):
    """Output, first derivatives, and the derivatives of a penalty on them (the lazy penalties' double backward)."""
    x.grad = w.grad = None
    y = f(x, w)
    gx, gw = torch.autograd.grad(y, (x, w), g, create_graph=True)
    (gx.square().sum() + gw.square().sum()).backward()
    first = torch.autograd.grad(f(x, w), (x, w), g)  # a first-order backward (no graph): the fused gradient pass
    return y.detach(), gx.detach(), gw.detach(), x.grad.clone(), w.grad.clone(), *first


@pytest.mark.determinism
@pytest.mark.parametrize("cin,cout,n,h,w,chunk,transpose", [
    (4, 6, 3, 8, 10, 2**20, False),  # one chunk
    (5, 4, 5, 6, 12, 800, False),  # chunks of 2, 2 and 1 images
    (6, 3, 2, 4, 4, 2**20, True),  # a stride-1 transposed 3x3 (an input gradient) is the same convolution
])
def test_winograd_matches_direct_convolution_to_the_second_derivative(monkeypatch, cin, cout, n, h, w, chunk,
                                                                      transpose):
    monkeypatch.setitem(ops.WINOGRAD, "chunk", chunk)
    monkeypatch.setitem(ops.WINOGRAD, "min_channels", 1)  # small layers, to keep the test fast
    monkeypatch.setitem(ops.WINOGRAD, "min_size", 2)
    torch.manual_seed(0)
    x = torch.randn(n, cin, h, w, requires_grad=True)
    weight = torch.randn(*((cin, cout) if transpose else (cout, cin)), 3, 3, requires_grad=True)
    f = lambda x, w: ops.conv2d(x, w, padding=1, transpose=transpose)  # noqa: E731
    g = torch.randn(n, cout, h, w)
    monkeypatch.setitem(ops.WINOGRAD, "enabled", False)
    direct = conv_derivatives(f, x, weight, g)
    monkeypatch.setitem(ops.WINOGRAD, "enabled", True)
    spies = {name: Spy(getattr(ops, name)) for name in ("winograd_conv", "winograd_conv_grads")}
    for name, spy in spies.items():
        monkeypatch.setattr(ops, name, spy)
    winograd = conv_derivatives(f, x, weight, g)
    assert spies["winograd_conv"].calls >= 3 and spies["winograd_conv_grads"].calls >= 2  # nothing fell back
    for a, b in zip(direct, winograd):
        assert (a - b).abs().max() < 1e-5 * a.abs().max()  # float32 rounding, not an approximation
    assert (winograd[0] - direct[0]).abs().max() > 0  # and truly another algorithm


@pytest.mark.parametrize("shape,cout,k,stride,dtype", [
    ((2, 4, 8, 8), 6, 1, 1, torch.float32),  # 1x1
    ((2, 4, 8, 8), 6, 3, 2, torch.float32),  # strided
    ((2, 4, 7, 8), 6, 3, 1, torch.float32),  # odd height: 2x2 output tiles do not fit
    ((2, 4, 8, 8), 6, 3, 1, torch.float64),
    ((1, 128, 8, 8), 128, 3, 1, torch.float32),  # under min_size: slower than the direct convolution
    ((1, 64, 16, 16), 128, 3, 1, torch.float32),  # under min_channels: likewise
])
def test_winograd_leaves_other_convolutions_to_pytorch(monkeypatch, shape, cout, k, stride, dtype):
    monkeypatch.setitem(ops.WINOGRAD, "enabled", True)
    if shape[1] == 4:
        monkeypatch.setitem(ops.WINOGRAD, "min_channels", 1)
        monkeypatch.setitem(ops.WINOGRAD, "min_size", 2)
    spy = Spy(ops.winograd_conv)
    monkeypatch.setattr(ops, "winograd_conv", spy)
    x, w = torch.randn(*shape, dtype=dtype), torch.randn(cout, shape[1], k, k, dtype=dtype)
    y = ops.conv2d(x, w, stride=stride, padding=k // 2)
    assert spy.calls == 0 and torch.equal(y, torch.nn.functional.conv2d(x, w, stride=stride, padding=k // 2))
    if shape[1] >= 64:  # the same layer above the thresholds does use it
        monkeypatch.setitem(ops.WINOGRAD, "min_channels", 64)
        monkeypatch.setitem(ops.WINOGRAD, "min_size", 8)
        ops.conv2d(x, w, stride=stride, padding=k // 2)
        assert spy.calls == 1


@pytest.mark.parametrize("winograd", [False, True])
def test_conv_clock_times_each_convolution_kernel_and_nothing_else(monkeypatch, winograd):
    ticks = iter(range(1000))
    monkeypatch.setattr(ops, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))  # each kernel: 1 s
    monkeypatch.setitem(ops.WINOGRAD, "enabled", winograd)
    monkeypatch.setitem(ops.WINOGRAD, "min_channels", 1)
    monkeypatch.setitem(ops.WINOGRAD, "min_size", 8)
    monkeypatch.setitem(ops.LAYOUT, "channels_last", True)  # 1x1 convolutions to one channel: a matrix product
    x = torch.randn(4, 8, 32, 32, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    with ops.conv_clock(enabled=False) as clock:
        ops.conv2d(x, w, padding=1).sum().backward()
    assert clock["seconds"] == 0
    with ops.conv_clock() as clock:
        x.detach().exp().sin()  # element-wise work only
    assert clock["seconds"] == 0
    with ops.conv_clock() as clock:
        ops.conv2d(x, w, padding=1).square().sum().backward()
    assert clock["seconds"] == 2  # the forward kernel, and one backward kernel for both gradients
    with ops.conv_clock() as clock:
        ops.conv2d(x, w[:1, :, :1, :1], padding=0)  # a 1x1 convolution to one channel
    assert clock["seconds"] == 1
    assert not ops.CONV_CLOCK["on"]


def test_winograd_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    try:
        for setting, device, enabled in [("auto", cpu, True), ("auto", cuda, False), ("on", cuda, True),
                                         ("off", cpu, False)]:
            ops.use_winograd(setting, device)
            assert ops.WINOGRAD["enabled"] is enabled, (setting, device)
    finally:
        ops.use_winograd("off", cpu)


def test_conv2d_under_autocast_computes_in_bf16_and_returns_float32_gradients():
    x, w = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(6, 4, 3, 3, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = ops.conv2d(x, w, padding=1)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()  # the backward runs outside autocast: dtypes must still agree
    assert x.grad.dtype == w.grad.dtype == torch.float32
    ref = torch.nn.functional.conv2d(x.detach(), w.detach(), padding=1)
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 2, 8, 4), (1, 1, 2, 2)])
def test_downsample_is_antialiased_bilinear_to_the_second_derivative(shape):
    """The strided depthwise [1, 3, 3, 1] filter with its border renormalisation equals PyTorch's
    antialiased bilinear half-size interpolation, in value and in the R1 penalty's double backward."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    reference = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
    ours = modules.downsample2x(x)
    torch.testing.assert_close(ours, reference)
    grads = [torch.autograd.grad(y.square().sum(), x, create_graph=True)[0] for y in (ours, reference)]
    torch.testing.assert_close(grads[0], grads[1])
    second = [torch.autograd.grad(g.sin().sum(), x)[0] for g in grads]
    torch.testing.assert_close(second[0], second[1])


def test_resampling_constants_made_in_inference_mode_serve_training():
    """The filter taps and border weights are made once per device, dtype and size; made first inside
    torch.inference_mode, they still serve a forward whose backward saves them."""
    modules._taps.cache.cache_clear()
    modules._border_weights.cache.cache_clear()
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        expected = modules.downsample2x(x)
    y = x.clone().requires_grad_()
    out = modules.downsample2x(y)
    out.square().sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    hits = modules._taps.cache.cache_info().hits + modules._border_weights.cache.cache_info().hits
    assert hits >= 2 and y.grad is not None


class Spy:
    """Counts calls of a function it wraps."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)
