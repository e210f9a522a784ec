"""Progressive training: the growth schedule, the skip generator's per-resolution output
weights, real images at the generator's level, and a progressive run end to end."""
import pytest
import torch
from conftest import smoke

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
        low, high, half = image_at(G, ws, 1.0), image_at(G, ws, 2.0), image_at(G, ws, 1.5)
        assert torch.allclose(half, (low + high) / 2, atol=1e-6)
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


def test_reals_at_a_growth_level_keep_only_its_detail():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    assert at_growth_level(x, None) is x and at_growth_level(x, 3.0) is x  # fully grown: untouched
    low, high = at_growth_level(x, 1.0), at_growth_level(x, 2.0)
    assert torch.allclose(at_growth_level(x, 1.5), (low + high) / 2, atol=1e-6)
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
        seen.append((run.G.synthesis.level, variation(real)))
        return d_step(run, cfg, real, labels, regularize)

    monkeypatch.setattr(training, "d_step", recording)
    flags = ["--progressive", "--progressive-kimg", "0.032", "--epochs", "3", "--eval-every", "0", "--device", "cpu"]
    # smoke preset, batch 8: 32 images per resolution, so 16 at a level and 16 fading in the next
    assert train.main(smoke(data, tmp_path / "straight", "--max-steps", "13", *flags)) == 0
    levels = [level for level, _ in seen]
    assert levels == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0, 2.5, None]
    detail = {level: v for level, v in seen}
    assert detail[0.0] < 0.5 * detail[2.0] < 0.5 * detail[None]  # D sees what G can draw so far

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
