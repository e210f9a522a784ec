"""Unit tests of modules.py: equalised learning rate, modulated convolution, minibatch std,
mapping network truncation, generator and discriminator behaviour."""
import math

import pytest
import torch
import torch.nn.functional as F

import modules
import ops
from modules import Discriminator, EqualLinear, Generator, MappingNetwork, MinibatchStdDev, ModulatedConv2d


def lrelu(x):
    """The textbook activation: leaky ReLU (slope 0.2) times sqrt(2)."""
    return F.leaky_relu(x, 0.2) * math.sqrt(2)

TINY = dict(resolution=32, channel_base=256, channel_max=16)


def tiny_generator(img_channels=1, num_classes=0, z_dim=16, w_dim=16):
    return Generator(z_dim=z_dim, w_dim=w_dim, mapping_layers=2, img_channels=img_channels,
                     num_classes=num_classes, **TINY)


# ---------------------------------------------------------------------------------------
# Equalised learning rate
# ---------------------------------------------------------------------------------------


def test_equal_linear_keeps_unit_variance():
    torch.manual_seed(0)
    layer = EqualLinear(512, 512)
    x = torch.randn(4096, 512)
    with torch.no_grad():
        y = layer(x)
    assert abs(y.var().item() - 1) < 0.1
    assert abs(y.mean().item()) < 0.05


def test_equal_linear_activation_gain_keeps_second_moment():
    """The activated layer's sqrt(2) gain keeps E[y^2] ~ 1 for unit Gaussian inputs."""
    torch.manual_seed(0)
    layer = EqualLinear(512, 512, activation=True)
    with torch.no_grad():
        y = layer(torch.randn(2000, 512))
    assert abs(y.square().mean().item() - (1 + 0.04)) < 0.02  # 2 * (0.5 + 0.5 * 0.2^2) = 1.04


@pytest.mark.parametrize("lr_mult", [0.01, 0.1, 1.0])
def test_equal_linear_lr_mult_storage_and_effective_weight(lr_mult):
    torch.manual_seed(1)
    layer = EqualLinear(256, 128, bias_init=0.5, lr_mult=lr_mult)
    torch.manual_seed(1)
    raw = torch.randn(128, 256)
    assert torch.allclose(layer.weight.detach(), raw / lr_mult)
    effective = layer.weight.detach() * layer.scale
    assert torch.allclose(effective, raw / math.sqrt(256), atol=1e-6)
    assert abs(effective.std().item() * math.sqrt(256) - 1) < 0.02
    # the bias is stored divided by lr_mult and used multiplied by it
    assert torch.allclose(layer.bias.detach(), torch.full([128], 0.5 / lr_mult))
    with torch.no_grad():
        out = layer(torch.zeros(3, 256))
    assert torch.allclose(out, torch.full([3, 128], 0.5), atol=1e-6)


def test_equal_linear_gradient_scaled_by_lr_mult():
    lr_mult = 0.01
    torch.manual_seed(3)
    a = EqualLinear(64, 32, lr_mult=1.0)
    torch.manual_seed(3)
    b = EqualLinear(64, 32, lr_mult=lr_mult)
    x = torch.randn(10, 64)
    ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=1e-5)  # same function
    target = torch.randn(10, 32)
    (ya - target).square().sum().backward()
    (yb - target).square().sum().backward()
    assert torch.allclose(b.weight.grad, a.weight.grad * lr_mult, rtol=1e-4, atol=1e-9)
    assert torch.allclose(b.bias.grad, a.bias.grad * lr_mult, rtol=1e-4, atol=1e-9)
    assert a.weight.grad.abs().sum() > 0
    # with Adam (invariant to the gradient's scale) the stored weights of both layers move by the
    # same amount, so the effective weight of the lr_mult layer moves lr_mult times as far
    eff_a, eff_b = a.weight.detach() * a.scale, b.weight.detach() * b.scale
    for layer in (a, b):
        torch.optim.Adam(layer.parameters(), lr=1e-3, eps=1e-12).step()
    step_a = (a.weight.detach() * a.scale - eff_a).abs().mean()
    step_b = (b.weight.detach() * b.scale - eff_b).abs().mean()
    assert (step_b / step_a).item() == pytest.approx(lr_mult, rel=1e-2)  # float32 rounding of ~100-sized weights


# ---------------------------------------------------------------------------------------
# Modulated convolution
# ---------------------------------------------------------------------------------------
def _interior_var(y, border=2):
    return y[:, :, border:-border, border:-border].var().item()


@pytest.mark.parametrize("style_scale", [1.0, 3.0])
def test_modconv_demodulation_gives_unit_variance(style_scale):
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 64, 3, w_dim=32, demodulate=True)
    with torch.no_grad():
        conv.affine.weight.mul_(style_scale)
        conv.affine.bias.mul_(style_scale)
        x = torch.randn(8, 64, 32, 32)
        w = torch.randn(8, 32)
        y = conv(x, w, fused=False)
    assert 0.85 < _interior_var(y) < 1.15


def test_modconv_without_demodulation_is_not_unit_variance():
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 64, 3, w_dim=32, demodulate=False)
    with torch.no_grad():
        conv.affine.weight.mul_(3)
        conv.affine.bias.mul_(3)
        y = conv(torch.randn(8, 64, 32, 32), torch.randn(8, 32), fused=False)
    assert _interior_var(y) > 2.0


@pytest.mark.determinism
@pytest.mark.parametrize("kernel,up,demodulate", [(3, False, True), (3, True, True), (1, False, False),
                                                  (3, True, False)])
def test_modconv_fused_matches_unfused(kernel, up, demodulate):
    torch.manual_seed(0)
    conv = ModulatedConv2d(8, 6, kernel, w_dim=16, demodulate=demodulate, up=up)
    x = torch.randn(3, 8, 8, 8)
    w = torch.randn(3, 16)
    with torch.no_grad():
        a = conv(x, w, fused=True)
        b = conv(x, w, fused=False)
    expected_size = 16 if up else 8
    assert a.shape == (3, 6, expected_size, expected_size)
    assert torch.allclose(a, b, atol=1e-5)
    # per-sample styles really matter: swapping the styles of two samples changes the output
    with torch.no_grad():
        c = conv(x, w.flip(0), fused=True)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("demodulate", [False, True])
def test_modconv_1x1_as_per_sample_matrix_product_matches_scaling_the_activations(monkeypatch, demodulate):
    """On the CPU (channels-last) a 1x1 modulated layer (to-image) multiplies by per-sample weights that carry the
    styles: the same output, gradients and penalty gradients (the path-length penalty's) as scaling x first."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(8, 3, 1, w_dim=16, demodulate=demodulate)
    x, w, g = torch.randn(3, 8, 6, 6), torch.randn(3, 16), torch.randn(3, 3, 6, 6)

    def derivatives(channels_last):
        monkeypatch.setitem(ops.LAYOUT, "channels_last", channels_last)
        xs, ws = ops.activations(x).requires_grad_(), w.clone().requires_grad_()
        y = conv(xs, ws)
        gx, gw = torch.autograd.grad(y, (xs, ws), g, create_graph=True)
        penalty = torch.autograd.grad(gx.square().sum() + gw.square().sum(), [ws, *conv.parameters()])
        return y.detach(), gx.detach(), gw.detach(), *penalty

    for a, b in zip(derivatives(False), derivatives(True)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("fused,up,style_op", [(False, False, "modconv"), (False, True, "modconv"),
                                                (True, True, "modconv"), (False, False, "adain")])
def test_styled_layer_is_lrelu_of_conv_plus_noise_plus_bias_times_sqrt2(fused, up, style_op):
    """The layer carries lrelu's gain (and adds the noise) in its convolution's last pass; the result is
    the textbook sqrt(2) * lrelu(conv + strength * noise + bias), with either form of the convolution."""
    torch.manual_seed(0)
    layer = modules.StyledLayer(6, 5, 16, 16, up=up, style_op=style_op)
    with torch.no_grad():
        layer.noise.strength.fill_(0.7)
        layer.bias.normal_()
    size = 8 if up else 16
    x, w = torch.randn(3, 6, size, size), torch.randn(3, 16)
    noise, bias = 0.7 * layer.noise.const_noise, layer.bias[None, :, None, None]
    with torch.no_grad():
        expected = lrelu(layer.conv(x, w, fused=fused) + noise + bias)
        if layer.adain is not None:
            expected = layer.adain(expected, w)
        if fused:  # the layer's own last steps around the grouped form
            got = F.leaky_relu(layer.conv(x, w, fused=True, noise=noise, gain=math.sqrt(2)) + bias * math.sqrt(2), 0.2)
        else:
            got = layer(x, w, noise_mode="const")
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("down,resample", [(False, "bilinear"), (True, "bilinear"), (True, "upfirdn")])
def test_equal_conv_is_lrelu_of_conv_plus_bias_times_sqrt2(down, resample):
    torch.manual_seed(0)
    layer = modules.EqualConv2d(4, 6, 3, down=down, resample=resample)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 4, 8, 8)
    plain = modules.EqualConv2d(4, 6, 3, activation=False, down=down, resample=resample)
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.allclose(layer(x), lrelu(plain(x)), atol=1e-5)
    fc = EqualLinear(5, 3, bias_init=0.3, lr_mult=0.1, activation=True)
    linear = EqualLinear(5, 3, bias_init=0.3, lr_mult=0.1)
    linear.load_state_dict(fc.state_dict())
    v = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.allclose(fc(v), lrelu(linear(v)), atol=1e-5)


def test_modconv_default_path_selection(monkeypatch):
    conv = ModulatedConv2d(4, 4, 3, w_dim=8)
    calls = []
    monkeypatch.setattr(conv, "_grouped", lambda *a: calls.append("fused") or a[0])
    monkeypatch.setattr(conv, "_scaled", lambda *a: calls.append("unfused") or a[0])
    x, w = torch.randn(2, 4, 4, 4), torch.randn(2, 8)
    conv.train()(x, w)
    conv.eval()(x, w)
    conv(x, w, fused=True)
    assert calls == ["unfused", "unfused", "fused"]  # the cheap form, faster at inference too


# ---------------------------------------------------------------------------------------
# Minibatch standard deviation
# ---------------------------------------------------------------------------------------
def test_mbstd_extra_channel_is_mean_std_over_group():
    torch.manual_seed(0)
    layer = MinibatchStdDev(group_size=4)
    x = torch.randn(4, 3, 5, 5)
    y = layer(x)
    assert y.shape == (4, 4, 5, 5)
    assert torch.equal(y[:, :3], x)
    expected = x.std(dim=0, unbiased=False).mean()
    assert torch.allclose(y[:, 3], expected.expand(4, 5, 5), atol=1e-5)


def test_mbstd_groups_are_separate():
    """With N=8 and group 4 there are two groups; each sees only its own samples' std."""
    torch.manual_seed(0)
    layer = MinibatchStdDev(group_size=4)
    x = torch.randn(8, 2, 3, 3)
    x[0::2] = x[0]  # samples 0,2,4,6 identical; 1,3,5,7 vary
    y = layer(x)[:, -1, 0, 0]
    # group membership (StyleGAN2 layout): sample i belongs to group i % (N / g)
    assert torch.allclose(y[0::2], torch.full([4], 1e-4), atol=1e-5)
    assert (y[1::2] > 0.3).all()


def test_mbstd_identical_samples_give_zero():
    x = torch.randn(1, 3, 4, 4).repeat(4, 1, 1, 1)
    y = MinibatchStdDev(4)(x)
    assert torch.allclose(y[:, 3], torch.full([4, 4, 4], 1e-4), atol=1e-5)  # sqrt(1e-8)


def test_mbstd_keeps_batches_scored_in_one_pass_apart():
    """Real and generated images scored in one pass (batches=2): each half gets its own groups,
    the same as scoring it alone; without the split the groups would mix the halves."""
    torch.manual_seed(0)
    layer = MinibatchStdDev(4)
    real, fake = torch.randn(4, 2, 3, 3), torch.randn(1, 2, 3, 3).repeat(4, 1, 1, 1)
    both = layer(torch.cat([real, fake]), batches=2)
    torch.testing.assert_close(both, torch.cat([layer(real), layer(fake)]))
    assert (both[4:, -1] < 1e-3).all()  # the identical half alone: no spread
    assert (layer(torch.cat([real, fake]))[4:, -1] > 0.1).all()  # mixed groups would see one


def test_discriminator_scores_two_batches_in_one_pass_as_one_at_a_time():
    torch.manual_seed(0)
    D = Discriminator(32, 1, channel_base=256, channel_max=16)
    a, b = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(D(torch.cat([a, b]), batches=2), torch.cat([D(a), D(b)]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,group,used", [(6, 4, 3), (5, 4, 1), (2, 4, 2), (7, 4, 1), (8, 4, 4)])
def test_mbstd_batch_not_divisible_by_group(n, group, used):
    torch.manual_seed(0)
    x = torch.randn(n, 2, 3, 3)
    y = MinibatchStdDev(group)(x)
    assert y.shape == (n, 3, 3, 3)
    extra = y[:, 2, 0, 0]
    ngroups = n // used
    for k in range(ngroups):
        members = x[k::ngroups]
        assert len(members) == used
        expected = members.var(0, unbiased=False).add(1e-8).sqrt().mean()
        assert torch.allclose(extra[k::ngroups], expected.expand(used), atol=1e-5)


# ---------------------------------------------------------------------------------------
# Mapping network and truncation
# ---------------------------------------------------------------------------------------
def test_mapping_truncation_zero_returns_w_avg_unconditional():
    torch.manual_seed(0)
    m = MappingNetwork(16, 16, 2)
    m.w_avg.copy_(torch.randn(1, 16))
    z = torch.randn(5, 16)
    w = m(z, truncation=0.0)
    assert torch.allclose(w, m.w_avg.expand(5, -1))
    full = m(z)
    half = m(z, truncation=0.5)
    assert torch.allclose(half, (full + m.w_avg) / 2, atol=1e-6)


def test_mapping_truncation_zero_returns_w_avg_per_class():
    torch.manual_seed(0)
    m = MappingNetwork(16, 16, 2, num_classes=3)
    m.w_avg.copy_(torch.randn(3, 16))
    labels = torch.tensor([2, 0, 1, 2])
    w = m(torch.randn(4, 16), labels, truncation=0.0)
    assert torch.allclose(w, m.w_avg[labels])


def test_mapping_update_w_avg_moves_towards_batch_mean():
    torch.manual_seed(0)
    beta = 0.9
    m = MappingNetwork(16, 16, 2, w_avg_beta=beta)
    m.w_avg.copy_(torch.randn(1, 16))
    before = m.w_avg.clone()
    z = torch.randn(6, 16)
    w = m(z, update_w_avg=True)
    expected = before + (1 - beta) * (w.mean(0, keepdim=True) - before)
    assert torch.allclose(m.w_avg, expected, atol=1e-6)
    # without update_w_avg nothing changes
    m(z)
    assert torch.allclose(m.w_avg, expected, atol=1e-6)


def test_mapping_conditional_update_only_changes_present_classes():
    torch.manual_seed(0)
    beta = 0.5
    m = MappingNetwork(16, 16, 2, num_classes=3, w_avg_beta=beta)
    before = torch.randn(3, 16)
    m.w_avg.copy_(before)
    labels = torch.tensor([0, 0, 2, 0])
    w = m(torch.randn(4, 16), labels, update_w_avg=True)
    assert torch.equal(m.w_avg[1], before[1])
    mean0 = w[labels == 0].mean(0)
    mean2 = w[labels == 2].mean(0)
    assert torch.allclose(m.w_avg[0], before[0] + (1 - beta) * (mean0 - before[0]), atol=1e-6)
    assert torch.allclose(m.w_avg[2], before[2] + (1 - beta) * (mean2 - before[2]), atol=1e-6)


def test_mapping_conditional_label_changes_w():
    torch.manual_seed(0)
    m = MappingNetwork(16, 16, 2, num_classes=2)
    z = torch.randn(3, 16)
    a = m(z, torch.zeros(3, dtype=torch.long))
    b = m(z, torch.ones(3, dtype=torch.long))
    assert not torch.allclose(a, b, atol=1e-4)


def test_mapping_class_weights_mix_classes():
    """Class weights (N, K) instead of indices: one-hot rows give the class's w exactly; a 50/50 mix
    lies between the classes, and truncates towards the mixed class means."""
    torch.manual_seed(0)
    m = MappingNetwork(16, 16, 2, num_classes=2)
    m.w_avg.copy_(torch.randn(2, 16))
    z = torch.randn(3, 16)
    for k in (0, 1):
        onehot = torch.nn.functional.one_hot(torch.full([3], k), 2).float()
        assert torch.equal(m(z, onehot), m(z, torch.full([3], k)))
        assert torch.equal(m(z, onehot, truncation=0.5), m(z, torch.full([3], k), truncation=0.5))
    half = torch.full([3, 2], 0.5)
    mixed, a, b = m(z, half), m(z, torch.zeros(3, dtype=torch.long)), m(z, torch.ones(3, dtype=torch.long))
    assert not torch.allclose(mixed, a, atol=1e-4) and not torch.allclose(mixed, b, atol=1e-4)
    assert torch.allclose(m(z, half, truncation=0.0), m.w_avg.mean(0).expand(3, -1), atol=1e-6)


# ---------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------
def test_generator_num_ws():
    G = tiny_generator()
    assert G.num_ws == 2 * int(math.log2(32)) - 2 == 8
    assert G.synthesis.num_ws == 8
    G64 = Generator(z_dim=8, w_dim=8, mapping_layers=1, resolution=64, img_channels=1, channel_base=256,
                    channel_max=8)
    assert G64.num_ws == 10


def test_generator_every_ws_entry_is_used():
    """Changing any single per-layer w must change the image (no w is ignored or misindexed)."""
    torch.manual_seed(0)
    G = tiny_generator()
    ws = G.make_ws(torch.randn(1, 16)).detach()
    batch = ws.repeat(G.num_ws + 1, 1, 1)  # sample 0 unchanged; sample 1 + i has w_i perturbed
    for i in range(G.num_ws):
        batch[1 + i, i] += 1.0
    with torch.no_grad():
        out = G.synthesis(batch, noise_mode="const")
    for i in range(G.num_ws):
        assert not torch.allclose(out[1 + i], out[0], atol=1e-6), f"ws[:, {i}] has no effect"


def test_generator_style_mixing_changes_output():
    G = tiny_generator().eval()
    torch.manual_seed(5)
    z = torch.randn(4, 16)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = G(z, mixing_prob=0.0, noise_mode="const")
        torch.manual_seed(0)
        plain2 = G(z, mixing_prob=0.0, noise_mode="const")
        torch.manual_seed(0)
        mixed = G(z, mixing_prob=1.0, noise_mode="const")
    assert torch.equal(plain, plain2)
    assert not torch.allclose(plain, mixed, atol=1e-5)


def test_generator_make_ws_mixing_structure():
    torch.manual_seed(0)
    G = tiny_generator()
    z = torch.randn(3, 16)
    ws = G.make_ws(z, mixing_prob=1.0)
    w = G.mapping(z)
    assert torch.allclose(ws[:, 0], w)  # the first layer always keeps the first latent
    differs = [not torch.allclose(ws[:, i], w) for i in range(G.num_ws)]
    cut = differs.index(True)
    assert 1 <= cut < G.num_ws
    assert all(differs[cut:])  # every layer from the crossover on uses the second latent
    ws0 = G.make_ws(z, mixing_prob=0.0)
    assert torch.allclose(ws0, w[:, None].expand(-1, G.num_ws, -1))


def test_generator_noise_modes():
    torch.manual_seed(0)
    G = tiny_generator().eval()
    with torch.no_grad():
        for mod in G.modules():
            if isinstance(mod, modules.NoiseInjection):
                mod.strength.fill_(0.5)  # noise starts at zero strength; make it matter
    z = torch.randn(2, 16)
    with torch.no_grad():
        c1 = G(z, noise_mode="const")
        c2 = G(z, noise_mode="const")
        r1 = G(z, noise_mode="random")
        r2 = G(z, noise_mode="random")
        n1 = G(z, noise_mode="none")
    assert torch.equal(c1, c2)
    assert not torch.allclose(r1, r2, atol=1e-4)
    assert not torch.allclose(c1, n1, atol=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("epilogue", [False, True])  # D's bias and activation in the convolution's kernel
def test_networks_keep_channels_last_activations_where_the_layout_asks(monkeypatch, channels, epilogue):
    """On the CPU the activations run channels-last from the networks' inputs on, with no conversion between
    layers (docs/speed.md); a layer that hands back the default order slows every layer after it."""
    monkeypatch.setitem(ops.LAYOUT, "channels_last", True)
    monkeypatch.setitem(ops.EPILOGUE, "enabled", epilogue)
    torch.manual_seed(0)
    G, D = tiny_generator(img_channels=channels), Discriminator(img_channels=channels, **TINY)
    seen = []

    def check(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[1] > 1 and output.shape[-1] > 1:
            seen.append((type(module).__name__, output.is_contiguous(memory_format=torch.channels_last)))
    for m in [*G.synthesis.modules(), *D.modules()]:
        m.register_forward_hook(check)
    img = G(torch.randn(4, 16))
    D(img).sum().backward()
    assert len(seen) > 10 and all(ok for _, ok in seen), [name for name, ok in seen if not ok]


@pytest.mark.parametrize("channels", [1, 3])
def test_generator_output_channels(channels):
    torch.manual_seed(0)
    G = tiny_generator(img_channels=channels)
    with torch.no_grad():
        img = G(torch.randn(2, 16), noise_mode="const")
    assert img.shape == (2, channels, 32, 32)
    assert torch.isfinite(img).all()
    assert img.std() > 0


def test_generator_conditional_label_changes_image():
    torch.manual_seed(0)
    G = tiny_generator(num_classes=2).eval()
    z = torch.randn(2, 16)
    with torch.no_grad():
        a = G(z, torch.tensor([0, 0]), noise_mode="const")
        b = G(z, torch.tensor([1, 1]), noise_mode="const")
        t = G(z, torch.tensor([0, 1]), truncation=0.0, noise_mode="const")
    assert not torch.allclose(a, b, atol=1e-5)
    # truncation 0 with w_avg still zero for both classes: the same image for both labels
    assert torch.allclose(t[0], t[1], atol=1e-6)


# ---------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------
def test_discriminator_unconditional_shape_and_sample_dependence():
    torch.manual_seed(0)
    D = Discriminator(img_channels=1, **TINY)
    x = torch.randn(4, 1, 32, 32)
    s = D(x)
    assert s.shape == (4,)
    x2 = x.clone()
    x2[1] += 1.0
    s2 = D(x2)
    assert not torch.isclose(s[1], s2[1])


def test_discriminator_conditional_projection_depends_on_label():
    torch.manual_seed(0)
    D = Discriminator(img_channels=3, num_classes=2, **TINY)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        s0 = D(x, torch.zeros(4, dtype=torch.long))
        s1 = D(x, torch.ones(4, dtype=torch.long))
        smix = D(x, torch.tensor([0, 1, 0, 1]))
    assert s0.shape == (4,)
    assert not torch.allclose(s0, s1, atol=1e-5)
    # the label only enters through the per-sample projection
    assert torch.allclose(smix[0::2], s0[0::2], atol=1e-6)
    assert torch.allclose(smix[1::2], s1[1::2], atol=1e-6)


def test_discriminator_gradients_reach_every_parameter():
    torch.manual_seed(0)
    D = Discriminator(img_channels=1, num_classes=2, **TINY)
    D(torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])).sum().backward()
    missing = [n for n, p in D.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


# ---------------------------------------------------------------------------------------
# Spectral normalisation
# ---------------------------------------------------------------------------------------
def test_spectral_norm_makes_every_d_layer_1_lipschitz():
    torch.manual_seed(0)
    D = Discriminator(img_channels=1, spectral_norm=True, **TINY)
    x = torch.randn(8, 1, 32, 32)
    for _ in range(30):  # power iterations run in training-mode forward passes
        D(x)
    layers = [m for m in D.modules() if isinstance(m, (modules.EqualConv2d, EqualLinear))]
    assert len(layers) == len([m for m in Discriminator(img_channels=1, **TINY).modules()
                               if isinstance(m, (modules.EqualConv2d, EqualLinear))])
    for layer in layers:
        w = layer.weight.reshape(layer.weight.shape[0], -1) * layer.scale
        assert torch.linalg.matrix_norm(w, 2).item() == pytest.approx(1.0, abs=0.02)
    plain = Discriminator(img_channels=1, **TINY).blocks[0].conv0
    assert torch.linalg.matrix_norm(plain.weight.reshape(plain.weight.shape[0], -1) * plain.scale, 2) > 1.2


def test_spectral_norm_d_has_second_derivatives():
    D = Discriminator(img_channels=1, spectral_norm=True, **TINY)
    x = torch.randn(4, 1, 32, 32, requires_grad=True)
    g, = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    g.square().sum().backward()  # R1 / gradient penalty
    assert D.from_img.parametrizations.weight.original.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# Self-attention
# ---------------------------------------------------------------------------------------
def test_self_attention_starts_as_identity_and_mixes_positions_once_trained():
    torch.manual_seed(0)
    block = modules.SelfAttention(16)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)  # gain 0
    with torch.no_grad():
        block.gain.fill_(1.0)
    y = block(x)
    x2 = x.clone()
    x2[:, :, 0, 0] += 5  # one position changes ...
    changed = (block(x2) - y).abs().sum(1)[:, 1:, 1:]
    assert changed.min() > 0  # ... and every other position's output changes: global receptive field


def test_attention_is_placed_at_its_resolution_in_g_and_d():
    torch.manual_seed(0)
    G = tiny_generator()
    G_att = Generator(z_dim=16, w_dim=16, mapping_layers=2, img_channels=1, attention_res=16, **TINY)
    D_att = Discriminator(img_channels=1, attention_res=16, **TINY)
    seen = []
    for net in (G_att, D_att):
        for m in net.modules():
            if isinstance(m, modules.SelfAttention):
                m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    z = torch.randn(2, 16)
    D_att(G_att(z))
    assert seen == [(16, 16), (16, 16)]
    G_att.load_state_dict({**G_att.state_dict(), **G.state_dict()})  # same weights, attention gain 0
    assert torch.allclose(G_att(z, noise_mode="const"), G(z, noise_mode="const"), atol=1e-6)
    x = torch.randn(4, 1, 32, 32, requires_grad=True)
    g, = torch.autograd.grad(D_att(x).sum(), x, create_graph=True)
    g.square().sum().backward()  # twice differentiable, for R1 / the gradient penalty


def test_adain_normalises_each_map_then_applies_the_style():
    torch.manual_seed(0)
    layer = modules.AdaIN(6, 8)
    x = torch.randn(3, 6, 5, 5) * 4 + 2
    w = torch.randn(3, 8)
    y = layer(x, w)
    scale, shift = layer.affine(w).chunk(2, dim=1)
    assert torch.allclose(y.mean((2, 3)), shift, atol=1e-5)
    assert torch.allclose(y.std((2, 3), unbiased=False), scale.abs(), atol=1e-4)
    fresh = modules.AdaIN(6, 8)  # at initialisation: scale ~1 + noise, shift ~0 + noise, from w
    assert torch.allclose(fresh.affine.bias[:6], torch.ones(6)) and torch.equal(fresh.affine.bias[6:], torch.zeros(6))


def test_adain_generator_uses_no_modulation_and_its_styles_matter():
    torch.manual_seed(0)
    G = Generator(z_dim=16, w_dim=16, mapping_layers=2, resolution=16, img_channels=1, channel_base=256,
                  channel_max=16, style_op="adain")
    layer = G.synthesis.blocks[0].conv0
    assert layer.adain is not None and layer.conv.affine is None and not layer.conv.demodulate
    ws = G.make_ws(torch.randn(2, 16))
    img = G.synthesis(ws, noise_mode="const")
    assert img.shape == (2, 1, 16, 16)
    other = ws.clone()
    other[:, 2] = G.make_ws(torch.randn(2, 16))[:, 2]  # only the style of one AdaIN layer changes
    assert not torch.allclose(G.synthesis(other, noise_mode="const"), img)
    img.square().mean().backward()  # gradients reach the AdaIN styles and the plain convolution
    assert layer.adain.affine.weight.grad.abs().sum() > 0 and layer.conv.weight.grad.abs().sum() > 0
    modconv = Generator(z_dim=16, w_dim=16, mapping_layers=2, resolution=16, img_channels=1, channel_base=256,
                        channel_max=16)
    assert modconv.synthesis.blocks[0].conv0.adain is None and modconv.synthesis.blocks[0].conv0.conv.demodulate


# ---------------------------------------------------------------------------------------
# Scanner noise
# ---------------------------------------------------------------------------------------
def half_brain(n=4, size=64):
    """Images in [-1, 1]: the left half at intensity 0.5 (0..1 units), the right half background."""
    img = torch.full((n, 1, size, size), -1.0)
    img[..., : size // 2] = 0.0
    return img


def test_scanner_noise_is_rician_of_its_level_on_the_foreground_only():
    torch.manual_seed(0)
    layer, img = modules.ScannerNoise(64, 1), half_brain()
    assert torch.equal(layer(img), img)  # no levels measured: no noise
    with torch.no_grad():
        layer.levels.fill_(0.05)
        out = layer(img, noise_mode="const")
        n = layer.const_noise * 0.05
        rician = ((0.5 + n[0]).square() + n[1].square()).sqrt()  # the foreground's 0..1 intensities
        assert torch.allclose((out[..., :32] + 1) / 2, rician[..., :32].expand(4, -1, -1, -1), atol=1e-6)
        assert torch.equal(out[..., 32:], img[..., 32:])  # the background is left as it is
        drawn = (layer(img)[..., :32] + 1) / 2
        assert abs(drawn.std().item() - 0.05) < 0.003
        assert abs(((layer(img, weight=0.5)[..., :32] + 1) / 2).std().item() - 0.025) < 0.002
        assert torch.equal(layer(img, noise_mode="none"), img)


def test_scanner_noise_draws_each_samples_level_from_the_measured_ones():
    torch.manual_seed(0)
    layer, img = modules.ScannerNoise(64, 1), half_brain(n=400, size=16)
    with torch.no_grad():
        layer.levels.copy_(torch.tensor([0.01, 0.04]).repeat_interleave(32))
        sds = ((layer(img)[..., :8] + 1) / 2).flatten(1).std(1)  # one level per sample
    low = sds < 0.025
    assert 0.4 < low.float().mean() < 0.6  # half of the samples at each level
    assert abs(sds[low].mean() - 0.01) < 0.002 and abs(sds[~low].mean() - 0.04) < 0.006


def test_scanner_noise_measures_the_noise_levels_of_real_slices():
    torch.manual_seed(0)
    truth = torch.linspace(0.008, 0.03, 41)  # one slice per level: a smooth blob with Rician noise
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 96), indexing="ij")
    clean = (0.6 - 0.3 * (xx.square() + yy.square())) * ((xx.square() + yy.square()) < 0.8)  # 0 outside
    n = torch.randn(2, 41, 1, 96, 96) * truth[:, None, None, None]
    noisy = ((clean + n[0]).square() + n[1].square()).sqrt() * (clean > 0)
    layer = modules.ScannerNoise(96, 1)
    levels = layer.measure(noisy.mul(255).round().clamp(0, 255).to(torch.uint8), chunk=16)
    assert torch.allclose(levels, torch.quantile(truth, torch.linspace(0, 1, 64)), atol=0.0015)
    assert torch.equal(layer.levels, levels)


def test_generator_draws_scanner_noise_only_once_its_top_resolution_is_in():
    torch.manual_seed(0)
    G = Generator(z_dim=16, w_dim=16, mapping_layers=2, img_channels=1, scanner_noise=True, **TINY).eval()
    with torch.no_grad():
        G.synthesis.scanner_noise.levels.fill_(0.5)
        G.synthesis.const.fill_(1.0)  # a bright image: every pixel is foreground
        z = torch.randn(2, 16)
        top = len(G.synthesis.blocks)
        for level, differs in ((top - 1, False), (top - 0.5, True), (None, True)):
            G.synthesis.level = level
            plain, noisy = G(z, noise_mode="none"), G(z, noise_mode="random")
            assert (not torch.allclose(plain, noisy, atol=1e-3)) == differs, level
