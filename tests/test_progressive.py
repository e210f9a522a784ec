"""Progressive training: the growth schedule, the skip generator's per-resolution output
weights, real images at the generator's level, and a progressive run end to end."""
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_user_error, smoke

import checkpoints
import generate_images
import modules
import settings
import train
import training
from modules import Generator, at_growth_level


def generator(seed=0):
    torch.manual_seed(seed)
    return Generator(z_dim=16, w_dim=16, mapping_layers=2, resolution=32, img_channels=1,
                     channel_base=256, channel_max=16).eval()


def image_at(G, ws, level):
    G.synthesis.level = level
    return G.synthesis(ws, noise_mode="const")


def variation(images):
    """Mean absolute difference of neighbouring pixels: the fine detail in an image."""
    return ((images[..., 1:, :] - images[..., :-1, :]).abs().mean() +
            (images[..., :, 1:] - images[..., :, :-1]).abs().mean()).item()


def test_growth_schedule_holds_each_level_then_fades_in_the_next():
    levels = [modules.growth_level(n, 1.0, 32) for n in range(0, 3001, 125)]  # 32x32: levels 0..3
    assert levels[:5] == [0.0] * 5  # the first 500 images at 4x4
    assert levels[6] == 0.5 and levels[8] == 1.0 and levels[12] == 1.0 and levels[14] == 1.5
    grown = levels.index(None)
    assert grown * 125 == 3000 and all(v is None for v in levels[grown:])  # 1,000 images per resolution
    steps = [b - a for a, b in zip(levels[:grown], levels[1:grown])]
    assert all(0 <= s <= 0.25 for s in steps)  # never backwards, never a jump


def test_a_fading_resolution_blends_the_neighbouring_levels():
    G = generator()
    with torch.no_grad():
        ws = G.make_ws(torch.randn(3, 16))
        low, high, quarter = image_at(G, ws, 1.0), image_at(G, ws, 2.0), image_at(G, ws, 1.25)
        assert torch.allclose(quarter, 0.75 * low + 0.25 * high, atol=1e-6)
        assert torch.equal(image_at(G, ws, 3.0), image_at(G, ws, None))  # the top level is the full generator
        assert variation(image_at(G, ws, 0.0)) < 0.5 * variation(image_at(G, ws, None))


def test_blocks_above_the_level_are_not_run():
    G = generator()
    ran = []
    for i, block in enumerate(G.synthesis.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
    ws = G.make_ws(torch.randn(2, 16))
    for level, expected in ((0.0, []), (0.5, [0]), (1.0, [0]), (1.25, [0, 1]), (None, [0, 1, 2])):
        ran.clear()
        assert image_at(G, ws, level).shape == (2, 1, 32, 32)  # always the output size
        assert ran == expected, level


def test_growth_can_start_higher_and_hold_there():
    """--progressive-start 64 --progressive-hold-kimg 2: 2,000 images at 64x64 (level 4), then each
    higher resolution in --progressive-kimg (1): half at the level below, half fading in."""
    level = lambda n: modules.growth_level(n, 1.0, 256, start=64, hold_kimg=2.0)  # noqa: E731
    assert [level(n) for n in (0, 1999, 2000, 2499, 2750, 3000, 3500, 3750)] == [4, 4, 4, 4, 4.5, 5, 5, 5.5]
    assert level(3999) < 6 and level(4000) is None
    assert modules.growth_level(500, 1.0, 32) == modules.growth_level(500, 1.0, 32, start=4, hold_kimg=0)


def test_images_at_the_levels_own_resolution_are_the_full_size_ones_before_upsampling():
    G = generator()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ws = G.make_ws(torch.randn(2, 16))
        for level, size in ((0.0, 4), (1.0, 8), (1.5, 16), (2.25, 32), (None, 32)):
            G.synthesis.level = level
            own, full = G.synthesis(ws, "const", full_size=False), G.synthesis(ws, "const")
            real = at_growth_level(x, level, full_size=False)
            assert own.shape[-1] == real.shape[-1] == size
            while own.shape[-1] < 32:
                own, real = modules.upsample2x(own), modules.upsample2x(real)
            assert torch.allclose(own, full, atol=1e-5) and torch.allclose(real, at_growth_level(x, level), atol=1e-5)


def growing_d(seed=0, **kw):
    torch.manual_seed(seed)
    return modules.Discriminator(32, 1, channel_base=256, channel_max=16, mbstd_group=2, **kw).eval()


def test_a_growing_discriminator_enters_at_the_images_resolution_and_fades_like_g():
    D, fixed = growing_d(grow=True), growing_d()
    fixed.load_state_dict({k: v for k, v in D.state_dict().items() if not k.startswith("from_img_low.")})
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(D(x), fixed(x))  # fully grown: the lower from-image convs are not used
        half = modules.downsample2x(x)
        D.level = 2.0  # 16x16: enter at the 16x16 block through its own from-image conv
        entered = D.blocks[D.starts[16]:](D.from_img_low["16"](half))
        assert torch.allclose(D.features(half), entered, atol=1e-6)
        assert torch.allclose(D.features(x), entered, atol=1e-6)  # a full-size image is taken down first
        D.level = 2.25  # 32x32 a quarter faded in: 1/4 its block's output, 3/4 the 16x16 entry
        top = D.blocks[:D.starts[16]](D.from_img(x))
        blend = 0.25 * top + 0.75 * D.from_img_low["16"](half)
        assert torch.allclose(D.features(x), D.blocks[D.starts[16]:](blend), atol=1e-5)


def test_channel_min_widens_only_the_thin_layers():
    assert [modules.channels_at(r, 1024, 64, 16) for r in (4, 32, 64, 128, 256)] == [64, 32, 16, 16, 16]
    assert [modules.channels_at(r, 1024, 64) for r in (64, 128, 256)] == [16, 8, 4]


def test_an_older_progressive_checkpoint_is_refused_on_resume_and_a_fixed_d_initialises_a_growing_one():
    D, fixed = growing_d(grow=True), growing_d(seed=1)
    cfg = settings.resolve_settings({"PROGRESSIVE": True}, "", "smoke")
    with pytest.raises(settings.UserError, match="--init-from"):
        training.restore(None, dict(class_names=[], D=fixed.state_dict()), cfg, SimpleNamespace(class_names=[]))
    lower = {k: v.clone() for k, v in D.state_dict().items() if k.startswith("from_img_low.")}
    training.load_d_weights(D, fixed.state_dict())
    assert torch.equal(D.from_img.weight, fixed.from_img.weight)
    assert all(torch.equal(D.state_dict()[k], v) for k, v in lower.items())  # its own, kept
    training.load_d_weights(fixed, D.state_dict())  # and back: a fixed D leaves them out


def test_reals_at_a_growth_level_keep_only_its_detail():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    assert at_growth_level(x, None) is x and at_growth_level(x, 3.0) is x  # fully grown: untouched
    low, high = at_growth_level(x, 1.0), at_growth_level(x, 2.0)
    assert torch.allclose(at_growth_level(x, 1.25), 0.75 * low + 0.25 * high, atol=1e-6)
    coarse = at_growth_level(x, 0.0)
    assert variation(coarse) < variation(low) < variation(high) < variation(x)
    assert variation(coarse) < 0.1 * variation(x)  # white noise: at 4x4 almost nothing is left
    flat = torch.full((2, 1, 32, 32), 0.3)
    assert torch.allclose(at_growth_level(flat, 0.0), flat, atol=1e-6)  # no change of brightness
    assert x.mean().item() == pytest.approx(at_growth_level(x, 0.0).mean().item(), abs=0.02)


def test_progressive_run_shows_d_reals_at_the_level_grows_and_resumes(data, tmp_path, monkeypatch):
    seen = []
    d_step = training.d_step

    def recording(run, cfg, real, labels, regularize):
        seen.append((run.G.synthesis.level, real.shape[-1], run.D.level))
        return d_step(run, cfg, real, labels, regularize)

    monkeypatch.setattr(training, "d_step", recording)
    flags = ["--progressive", "--progressive-kimg", "0.032", "--epochs", "3", "--eval-every", "0", "--device", "cpu"]
    # smoke preset, batch 8: 32 images per resolution, so 16 at a level and 16 fading in the next
    assert train.main(smoke(data, tmp_path / "straight", "--max-steps", "13", *flags)) == 0
    levels = [level for level, _, _ in seen]
    assert levels == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0, 2.5, None]
    assert all(d_level == level for level, _, d_level in seen)  # D grows with G
    # D sees real slices at the resolution G draws so far: 4x4, then 8x8 from the fade-in of 8x8 on
    assert [size for _, size, _ in seen] == [4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32]

    state, _ = checkpoints.load_checkpoint(tmp_path / "straight" / "Models")
    assert checkpoints.checkpoint_growth_level(state) is None  # fully grown: generates at full resolution
    monkeypatch.setattr(training, "d_step", d_step)
    split = tmp_path / "split"
    assert train.main(smoke(data, split, "--max-steps", "3", *flags)) == 0
    middle, _ = checkpoints.load_checkpoint(split / "Models")
    assert checkpoints.checkpoint_growth_level(middle) == 0.5  # after 24 images: fading in 8x8
    assert checkpoints.load_generator(middle, torch.device("cpu")).synthesis.level == 0.5
    assert generate_images.main(["--checkpoint", str(split / "Models"), "--out-dir", str(tmp_path / "gen"),
                                 "--n", "2"]) == 0
    assert train.main(["--resume", "--out-dir", str(split), "--max-steps", "13"]) == 0
    resumed, _ = checkpoints.load_checkpoint(split / "Models")
    for name in ("G", "D", "G_ema"):
        assert all(torch.equal(state[name][k], resumed[name][k]) for k in state[name]), name


def test_progressive_is_off_by_default(data, tmp_path):
    cfg = settings.resolve_settings({}, "", "smoke")
    assert cfg.progressive is False
    assert train.main(smoke(data, tmp_path, "--max-steps", "1", "--eval-every", "0")) == 0
    state, _ = checkpoints.load_checkpoint(tmp_path / "Models")
    assert checkpoints.checkpoint_growth_level(state) is None


def test_a_run_can_start_growing_at_a_higher_resolution(data, tmp_path, monkeypatch):
    sizes = []
    d_step = training.d_step

    def recording(run, cfg, real, labels, regularize):
        sizes.append(real.shape[-1])
        return d_step(run, cfg, real, labels, regularize)

    monkeypatch.setattr(training, "d_step", recording)
    flags = ["--progressive", "--progressive-start", "16", "--progressive-hold-kimg", "0.016", "--progressive-kimg",
             "0.032", "--max-steps", "6", "--eval-every", "0", "--device", "cpu"]
    assert train.main(smoke(data, tmp_path, *flags)) == 0
    # batch 8: 16 images held at 16x16, the stage's first 16 still there, then 32x32 fading in
    assert sizes == [16, 16, 16, 16, 16, 32]


@pytest.mark.parametrize("flags,needle", [(["--progressive-start", "48"], "--progressive-start must be a power"),
                                          (["--progressive-start", "64"], "--progressive-start 64 is above")])
def test_a_progressive_start_must_be_a_resolution_of_the_model(data, tmp_path, capsys, flags, needle):
    assert_user_error(capsys, train.main(smoke(data, tmp_path, *flags)), needle)


# ---------------------------------------------------------------------------------------
# Growing a trained lower-resolution network (--init-from with a higher --resolution)
# ---------------------------------------------------------------------------------------
def grown_run(source_dir, tmp_path, *extra):
    given = {"INIT_FROM": str(source_dir), "DATA_ROOT": "x", "RESOLUTION": 64, "PROGRESSIVE": True}
    cfg, _, init = train.settings(dict(given, **dict(extra)), SimpleNamespace(preset="smoke"), tmp_path)
    data = SimpleNamespace(class_names=["AD", "NC"], channels=1)
    torch.manual_seed(1)
    run = training.build_run(cfg, data, torch.device("cpu"))
    training.initialise(run, init, data, cfg.init_from)
    return cfg, run, init


def test_a_grown_network_draws_and_scores_like_its_source_at_the_sources_level(uncond_run, tmp_path):
    cfg, run, init = grown_run(uncond_run, tmp_path)
    assert (cfg.resolution, cfg.progressive_start, cfg.progressive_hold_kimg) == (64, 32, 0.0)
    source, _ = checkpoints.load_checkpoint(uncond_run / "Models")
    G_src, D_src = checkpoints.load_generator(source, "cpu"), checkpoints.load_discriminator(source, "cpu")
    torch.manual_seed(2)
    z = torch.randn(8, G_src.z_dim)
    with torch.no_grad():
        w = G_src.mapping(z)[:, None]  # (N, 1, w_dim): every layer's w
        assert torch.equal(run.G_ema.mapping(z)[:, None], w)
        own = G_src.synthesis(w.expand(-1, G_src.synthesis.num_ws, -1), noise_mode="const")
        run.G_ema.synthesis.level = run.D.level = 3.0  # 32x32, 64x64 not yet faded in
        grown = run.G_ema.synthesis(w.expand(-1, run.G_ema.synthesis.num_ws, -1), noise_mode="const",
                                    full_size=False)
        assert grown.shape[-1] == 32 and torch.allclose(grown, own, atol=1e-5)
        run.D.eval()
        assert torch.allclose(run.D(own), D_src(own), atol=1e-5)
        full = modules.upsample2x(own)  # a full-size image is taken down to the level first
        assert torch.allclose(run.D(full), D_src(modules.downsample2x(full)), atol=1e-5)
    torch.manual_seed(1)  # the networks grown_run built, before the source's weights went in
    fresh = training.build_run(cfg, SimpleNamespace(class_names=["AD", "NC"], channels=1), torch.device("cpu"))
    for net in ("G", "G_ema", "D"):  # the layers the source lacks keep their initial values
        own, initial = getattr(run, net).state_dict(), getattr(fresh, net).state_dict()
        new = [k for k in own if k.startswith(("synthesis.blocks.3.", "blocks.0.", "from_img."))]
        assert new and all(torch.equal(own[k], initial[k]) for k in new), net


def test_a_grown_run_trains_from_the_sources_resolution_and_resumes(data, uncond_run, tmp_path, capsys):
    out = tmp_path / "grown"
    flags = ["--init-from", str(uncond_run), "--resolution", "64", "--progressive", "--progressive-kimg", "0.032",
             "--max-steps", "3", "--eval-every", "0"]
    assert train.main(smoke(data, out, *flags)) == 0
    assert "growing it from 32x32 to 64x64" in capsys.readouterr().out
    state, _ = checkpoints.load_checkpoint(out / "Models")
    assert state["model_args"]["G"]["resolution"] == 64 and state["config"]["progressive_start"] == 32
    source, _ = checkpoints.load_checkpoint(uncond_run / "Models")
    moved = (state["G"]["synthesis.blocks.2.conv1.conv.weight"] - source["G"]["synthesis.blocks.2.conv1.conv.weight"])
    assert 0 < moved.abs().max() < 0.1  # trained on from the source's 32x32 block
    assert train.main(smoke(data, out, "--resume", "--resolution", "64", "--max-steps", "5")) == 0
    assert checkpoints.load_checkpoint(out / "Models")[0]["step"] == 5


@pytest.mark.parametrize("flags,needle", [
    ([], "needs --progressive"),
    (["--progressive", "--progressive-start", "16"], "starts at its resolution, 32"),
    (["--progressive", "--channel-base", "1024"], "--channel-base is 1024"),
])
def test_growing_a_network_the_run_cannot_hold_is_one_line(data, uncond_run, tmp_path, capsys, flags, needle):
    code = train.main(smoke(data, tmp_path, "--init-from", str(uncond_run), "--resolution", "64", *flags))
    assert_user_error(capsys, code, needle)


def test_a_layer_that_does_not_fit_the_grown_network_is_named(uncond_run, tmp_path):
    with pytest.raises(settings.UserError, match="synthesis.const .* does not fit"):
        grown_run(uncond_run, tmp_path, ("CHANNEL_MIN", 64))
