"""generate_images.py: samples and their errors, the same seed giving the same image, and the
latent-space modes (style mixing, interpolation, truncation sweeps, the style-space plot, projection
of real slices) on the tiny checkpoints of the shared smoke runs."""
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_user_error
from PIL import Image

import checkpoints
import generate_images
import modules
import sampling
import settings


@pytest.mark.parametrize("argv,needle", [
    (["--bogus"], "--bogus"),
    (["--truncation", "-1"], "--truncation"),
    (["--noise-mode", "loud"], "--noise-mode"),
    (["--n", "0"], "--n"),
    (["--batch", "x"], "--batch"),
])
def test_generate_bad_flags(capsys, argv, needle):
    assert_user_error(capsys, generate_images.main(argv), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_device_cuda_without_cuda(capsys, tmp_path):
    assert_user_error(capsys, generate_images.main(["--device", "cuda", "--checkpoint", str(tmp_path)]), "--device")


def test_generate_missing_checkpoint(capsys, tmp_path):
    missing = tmp_path / "Models"
    assert_user_error(capsys, generate_images.main(["--checkpoint", str(missing)]), str(missing))


def test_generate_garbage_checkpoint(capsys, tmp_path):
    bad = tmp_path / "checkpoint_00000001.pt"
    bad.write_bytes(b"garbage" * 100)
    assert_user_error(capsys, generate_images.main(["--checkpoint", str(bad)]), str(bad))


def test_generate_label_on_unconditional_checkpoint(capsys, uncond_run, tmp_path):
    code = generate_images.main(["--checkpoint", str(uncond_run / "Models"), "--label", "AD",
                                 "--out-dir", str(tmp_path / "gen"), "--device", "cpu"])
    assert_user_error(capsys, code, "--label")
    assert not (tmp_path / "gen").exists()


def test_generate_bad_seeds(capsys, uncond_run, tmp_path):
    code = generate_images.main(["--checkpoint", str(uncond_run / "Models"), "--seeds", "1,x",
                                 "--out-dir", str(tmp_path), "--device", "cpu"])
    assert_user_error(capsys, code, "--seeds")


def test_generate_writes_images_same_seed_same_image(capsys, uncond_run, tmp_path):
    out = tmp_path / "gen"
    code = generate_images.main(["--checkpoint", str(uncond_run / "Models"), "--seeds", "3,3,5",
                                 "--out-dir", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} >= {"seed0003.png", "seed0005.png", "grid.png", "losses.png"}
    with Image.open(out / "seed0003.png") as img:
        assert img.size == (32, 32) and img.mode == "L"
    with Image.open(out / "grid.png") as grid:
        g = np.asarray(grid)
    tile = lambda i: g[2:34, 2 + i * 34:2 + i * 34 + 32]  # noqa: E731  (pad 2, 32x32 tiles)
    assert np.array_equal(tile(0), tile(1))  # seed 3 twice: the same image
    assert not np.array_equal(tile(0), tile(2))  # seed 5: a different one


pytestmark = pytest.mark.determinism  # image comparisons: CI runs them under every CPU kernel family

R, PAD = 32, 2  # smoke-preset resolution and grid padding


def read(path):
    return np.asarray(Image.open(path)).astype(int)


def test_generate_writes_requested_files(cond_run, tmp_path):
    out = tmp_path / "gen"
    rc = generate_images.main(["--checkpoint", str(cond_run / "Models"), "--out-dir", str(out),
                               "--seeds", "3,5,8", "--label", "NC"])
    assert rc == 0
    assert sorted(p.name for p in out.glob("seed*.png")) == ["seed0003_NC.png", "seed0005_NC.png", "seed0008_NC.png"]
    assert (out / "grid.png").is_file() and (out / "losses.png").is_file()
    assert read(out / "seed0003_NC.png").shape == (32, 32)


def test_same_seed_same_image(cond_run, tmp_path):
    """The same seeds and settings give the same PNGs; another batch size or seed list changes only the
    float rounding of the batched arithmetic (at most one grey level)."""
    args = ["--checkpoint", str(cond_run / "Models"), "--seeds", "7,11", "--label", "AD"]
    assert generate_images.main(args + ["--out-dir", str(tmp_path / "a")]) == 0
    assert generate_images.main(args + ["--out-dir", str(tmp_path / "a2")]) == 0
    assert generate_images.main(args + ["--out-dir", str(tmp_path / "b"), "--batch", "1"]) == 0
    assert generate_images.main(["--checkpoint", str(cond_run / "Models"), "--seeds", "7",
                                 "--label", "AD", "--out-dir", str(tmp_path / "c")]) == 0
    a = read(tmp_path / "a" / "seed0007_AD.png").astype(int)
    assert np.array_equal(a, read(tmp_path / "a2" / "seed0007_AD.png"))
    assert np.abs(a - read(tmp_path / "b" / "seed0007_AD.png")).max() <= 1
    assert np.abs(a - read(tmp_path / "c" / "seed0007_AD.png")).max() <= 1
    assert np.abs(a - read(tmp_path / "a" / "seed0011_AD.png")).max() > 20


def test_truncation_zero_gives_the_class_mean_image(cond_run, tmp_path):
    assert generate_images.main(["--checkpoint", str(cond_run / "Models"), "--out-dir", str(tmp_path),
                                 "--seeds", "1,2", "--label", "AD", "--truncation", "0"]) == 0
    assert np.array_equal(read(tmp_path / "seed0001_AD.png"), read(tmp_path / "seed0002_AD.png"))


def tile(grid, row, col):
    y, x = PAD + row * (R + PAD), PAD + col * (R + PAD)
    return grid[y:y + R, x:x + R]


def generate(checkpoint_dir, out, *flags):
    return generate_images.main(["--checkpoint", str(checkpoint_dir / "Models"), "--out-dir", str(out), *flags])


def state_and_G(run_dir):
    state, _ = checkpoints.load_checkpoint(run_dir / "Models")
    return state, checkpoints.load_generator(state, torch.device("cpu"))


@pytest.mark.parametrize("text,expected", [("0-3", [0, 1, 2, 3]), ("5", [5]), (" 2 - 7 ", [2, 3, 4, 5, 6, 7])])
def test_parse_layers(text, expected):
    assert generate_images.parse_layers(text, 8) == expected


@pytest.mark.parametrize("text", ["3-1", "0-8", "a-b", "", "-1"])
def test_parse_layers_rejects(text):
    with pytest.raises(settings.UserError, match="--mix-layers"):
        generate_images.parse_layers(text, 8)


def test_mixing_grid_layout_and_crossover(cond_run, tmp_path):
    flags = ["--mode", "mixing", "--seeds", "1,2", "--mix-seeds", "3,4,5", "--label", "AD", "--device", "cpu"]
    assert generate(cond_run, tmp_path / "a", *flags) == 0
    grid = read(tmp_path / "a" / "mixing.png")
    assert grid.shape == (PAD + 3 * (R + PAD), PAD + 4 * (R + PAD))
    assert tile(grid, 0, 0).max() == 0  # blank corner
    assert generate(cond_run, tmp_path / "s", "--seeds", "1,3", "--label", "AD", "--device", "cpu") == 0
    assert np.abs(tile(grid, 1, 0) - read(tmp_path / "s" / "seed0001_AD.png")).max() <= 1  # row source image
    assert np.abs(tile(grid, 0, 1) - read(tmp_path / "s" / "seed0003_AD.png")).max() <= 1  # column source image
    mix = tile(grid, 1, 1)
    assert not np.array_equal(mix, tile(grid, 1, 0)) and not np.array_equal(mix, tile(grid, 0, 1))
    # every layer from the row seed: each mix is its row's image
    assert generate(cond_run, tmp_path / "all", *flags, "--mix-layers", "0-7") == 0
    full = read(tmp_path / "all" / "mixing.png")
    for row in (1, 2):
        for col in (1, 2, 3):
            assert np.abs(tile(full, row, col) - tile(full, row, 0)).max() <= 1
    # the same seeds give the same grid: bit for bit at the same batch size, and within one grey level
    # at another (the kernels for another batch size round differently)
    assert generate(cond_run, tmp_path / "b", *flags) == 0
    assert np.array_equal(grid, read(tmp_path / "b" / "mixing.png"))
    assert generate(cond_run, tmp_path / "c", *flags, "--batch", "1") == 0
    assert np.abs(grid - read(tmp_path / "c" / "mixing.png")).max() <= 1


def test_mixing_layer_range_checked_against_model(cond_run, tmp_path, capsys):
    code = generate(cond_run, tmp_path, "--mode", "mixing", "--mix-layers", "0-8")
    assert_user_error(capsys, code, "--mix-layers", "0-7")


@pytest.mark.parametrize("space", ["w", "z"])
def test_interpolation_between_seeds_ends_at_the_seed_images(uncond_run, tmp_path, space):
    out = tmp_path / "i"
    flags = ("--mode", "interpolate", "--seeds", "4,9,2", "--frames", "5", "--space", space)
    assert generate(uncond_run, out, *flags) == 0
    strip = read(out / "interpolation.png")
    assert strip.shape == (PAD + R + PAD, PAD + 9 * (R + PAD))  # 2 segments of 5 frames sharing one
    assert generate(uncond_run, tmp_path / "s", "--seeds", "4,9,2") == 0
    for col, seed in ((0, 4), (4, 9), (8, 2)):
        assert np.abs(tile(strip, 0, col) - read(tmp_path / "s" / f"seed{seed:04d}.png")).max() <= 1
    assert not np.array_equal(tile(strip, 0, 2), tile(strip, 0, 0))
    with Image.open(out / "interpolation.gif") as gif:
        assert gif.n_frames == 2 * 9 - 2 and gif.size == (PAD + R + PAD, PAD + R + PAD)


@pytest.mark.parametrize("space", ["w", "z"])
def test_interpolation_between_classes_at_fixed_z(cond_run, tmp_path, space):
    out = tmp_path / "i"
    assert generate(cond_run, out, "--mode", "interpolate", "--interp", "classes", "--seeds", "3,6", "--frames", "4",
               "--space", space) == 0
    strip = read(out / "interpolation.png")
    assert strip.shape == (PAD + 2 * (R + PAD), PAD + 4 * (R + PAD))  # one row per seed
    for label, col in (("AD", 0), ("NC", 3)):
        assert generate(cond_run, tmp_path / label, "--seeds", "3,6", "--label", label) == 0
        for row, seed in ((0, 3), (1, 6)):
            assert np.abs(tile(strip, row, col) - read(tmp_path / label / f"seed{seed:04d}_{label}.png")).max() <= 1
    with Image.open(out / "interpolation.gif") as gif:
        assert gif.n_frames == 2 * 4 - 2 and gif.size == (PAD + 2 * (R + PAD), PAD + R + PAD)
    table = read(out / "class_difference.png")  # per seed: AD, NC, NC - AD around mid-grey
    for row in (0, 1):
        ad, nc = tile(strip, row, 0), tile(strip, row, 3)
        assert np.array_equal(tile(table, row, 0), ad) and np.array_equal(tile(table, row, 1), nc)
        expected = np.clip(nc - ad, -127.5, 127.5) + 127.5
        assert np.abs(tile(table, row, 2) - expected).max() <= 1.5


def test_class_options_on_an_unconditional_checkpoint(uncond_run, tmp_path, capsys):
    assert_user_error(capsys, generate(uncond_run, tmp_path, "--mode", "interpolate", "--interp", "classes"),
                      "--interp classes", "conditional")
    assert_user_error(capsys, generate(uncond_run, tmp_path, "--mode", "truncation", "--label", "AD"), "--label")
    assert_user_error(capsys, generate(uncond_run, tmp_path, "--mode", "mixing", "--label", "NC"), "--label")
    assert not tmp_path.joinpath("interpolation.png").exists()


def test_interpolation_needs_two_seeds(uncond_run, tmp_path, capsys):
    assert_user_error(capsys, generate(uncond_run, tmp_path, "--mode", "interpolate", "--seeds", "3"), "--seeds")


def test_truncation_rows_per_class_and_psi(cond_run, tmp_path):
    state, G = state_and_G(cond_run)
    cfg = SimpleNamespace(psis="1,0.5,0", label="", noise_mode="const", batch=4)
    images, rows = generate_images.truncation_grid(cfg, state, G, torch.device("cpu"), [1, 2, 3])
    assert images.shape == (6, 3, 1, R, R)
    assert rows == ["AD ψ = 1", "AD ψ = 0.5", "AD ψ = 0", "NC ψ = 1", "NC ψ = 0.5", "NC ψ = 0"]
    assert torch.allclose(images[2], images[2, :1].expand(3, -1, -1, -1), atol=1e-5)  # psi 0: the class mean
    assert not torch.allclose(images[2, 0], images[5, 0], atol=1e-3)  # ... which differs by class
    assert not torch.allclose(images[0, 0], images[0, 1], atol=1e-3)  # psi 1: seeds differ
    z = sampling.seed_latents([1, 2, 3], G.z_dim)
    expected = sampling.images_from_latents(G, z, torch.tensor([1, 1, 1]), 1.0, "const", 4, torch.device("cpu"))
    assert torch.allclose(images[3], expected, atol=1e-6)  # NC psi 1 = plain NC samples
    assert generate(cond_run, tmp_path, "--mode", "truncation", "--seeds", "1,2,3") == 0
    assert read(tmp_path / "truncation.png").ndim == 3  # a labelled figure


def test_losses_mode_writes_loss_and_metric_plots(cond_run, tmp_path):
    assert generate(cond_run, tmp_path, "--mode", "losses") == 0
    assert {p.name for p in tmp_path.iterdir()} == {"losses.png", "metrics.png"}


def target_slice(data):
    return sorted((data / "test" / "AD").iterdir())[0]


def test_projection_lowers_pixel_loss_and_writes_outputs(cond_run, data, tmp_path):
    target = target_slice(data)
    flags = ["--mode", "project", "--target", str(target), "--project-steps", "40", "--frames", "4", "--label", "AD",
             "--device", "cpu"]  # the same w twice: bit for bit on the CPU
    assert generate(cond_run, tmp_path / "a", *flags) == 0
    stem = tmp_path / "a" / target.stem
    report = json.loads(stem.with_name(stem.name + "_projection.json").read_text())
    assert report["pixel_mse_end"] < 0.7 * report["pixel_mse_start"]
    assert report["psnr_db"] > 10 and 0 < report["ssim"] <= 1
    mse = np.square((read(f"{stem}_projected.png") - read(f"{stem}_target.png")) / 127.5).mean()
    assert report["psnr_db"] == pytest.approx(10 * math.log10(4 / mse), abs=0.01)  # PSNR of the saved PNGs
    w = np.load(f"{stem}_w.npy")
    state, G = state_and_G(cond_run)
    assert w.shape == (state["model_args"]["G"]["w_dim"],)
    assert len(np.load(f"{stem}_noise.npz").files) == sum(isinstance(m, modules.NoiseInjection) for m in G.modules())
    assert read(f"{stem}_steps.png").shape == (PAD + R + PAD, PAD + 5 * (R + PAD))  # 4 snapshots + target
    with Image.open(f"{stem}_steps.gif") as gif:
        assert gif.n_frames == 6
    assert generate(cond_run, tmp_path / "b", *flags) == 0  # seeded: the same w again
    assert np.array_equal(w, np.load(tmp_path / "b" / f"{target.stem}_w.npy"))


def test_projection_in_w_plus_fits_closer(uncond_run, data, tmp_path):
    target = target_slice(data)
    scores = {}
    for space in ("w", "w+"):
        assert generate(uncond_run, tmp_path / space, "--mode", "project", "--target", str(target),
                        "--project-steps", "40", "--project-space", space) == 0
        scores[space] = json.loads((tmp_path / space / f"{target.stem}_projection.json").read_text())
    assert np.load(tmp_path / "w+" / f"{target.stem}_w.npy").shape[0] == 8  # one w per style layer
    assert scores["w+"]["pixel_mse_end"] < scores["w"]["pixel_mse_end"]


def test_project_needs_a_readable_target(cond_run, tmp_path, capsys):
    assert_user_error(capsys, generate(cond_run, tmp_path, "--mode", "project"), "--target")
    missing = tmp_path / "missing.png"
    assert_user_error(capsys, generate(cond_run, tmp_path, "--mode", "project", "--target", str(missing)), str(missing))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert_user_error(capsys, generate(cond_run, tmp_path, "--mode", "project", "--target", str(bad)), str(bad))


def test_tsne_conditional_reports_separability(cond_run, tmp_path):
    assert generate(cond_run, tmp_path, "--mode", "tsne", "--tsne-n", "30") == 0
    report = json.loads((tmp_path / "style_space.json").read_text())
    assert report["generated_per_class"] == 30 and report["generated"]["chance"] == 0.5
    assert 0 <= report["generated"]["accuracy"] <= 1
    assert read(tmp_path / "style_space.png").ndim == 3


def test_tsne_unconditional_projects_real_slices(uncond_run, data, tmp_path):
    assert generate(uncond_run, tmp_path, "--mode", "tsne", "--tsne-n", "20", "--data-root", str(data),
               "--tsne-real", "5", "--project-steps", "3") == 0
    report = json.loads((tmp_path / "style_space.json").read_text())
    assert "generated" not in report  # no classes among generated w of an unconditional model
    assert report["real_projected_per_class"] == 5 and report["real_projected"]["chance"] == 0.5


def test_tsne_data_root_classes_must_match(cond_run, tmp_path, capsys):
    other = tmp_path / "other"
    for name in ("CN", "MCI"):
        (other / "train" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(other / "train" / name / "a.png")
    assert_user_error(capsys, generate(cond_run, tmp_path / "o", "--mode", "tsne", "--data-root", str(other),
                                  "--tsne-n", "10", "--tsne-real", "2"), "--data-root")


@pytest.mark.parametrize("flags,needle", [(["--mode", "truncation", "--psis", "1,x"], "--psis"),
                                          (["--mode", "truncation", "--psis", "-0.5"], "--psis"),
                                          (["--mode", "mixing", "--mix-seeds", ""], "--mix-seeds"),
                                          (["--mode", "mixing", "--mix-seeds", "1,a"], "--mix-seeds"),
                                          (["--mode", "tsne", "--label", "AD"], "--label")])
def test_bad_mode_settings_name_the_flag(cond_run, tmp_path, capsys, flags, needle):
    assert_user_error(capsys, generate(cond_run, tmp_path, *flags), needle)


def test_samples_are_written_as_they_are_drawn_and_a_disk_too_small_is_one_line(uncond_run, tmp_path, capsys,
                                                                                 monkeypatch):
    """--n is drawn a --batch at a time (never all latents or images at once), and when the first
    batch shows the rest cannot fit on the disk, the run stops there with one line."""
    drawn = []
    real = generate_images.images_from_latents
    monkeypatch.setattr(generate_images, "images_from_latents", lambda G, z, *a: drawn.append(len(z)) or real(G, z, *a))
    out = tmp_path / "many"
    assert generate(uncond_run, out, "--n", "10", "--batch", "4") == 0
    assert drawn == [4, 4, 2] and len(list(out.glob("seed*.png"))) == 10
    drawn.clear()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(generate_images.shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    code = generate(uncond_run, tmp_path / "huge", "--n", "100000000", "--batch", "4")
    assert_user_error(capsys, code, "--n: the 99999996 images still to write need about", "GB free")
    assert drawn == [4] and len(list((tmp_path / "huge").glob("seed*.png"))) == 4
