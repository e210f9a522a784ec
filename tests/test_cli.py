"""Command-line behaviour of train.py and generate_images.py, called in-process through main(argv):
bad input is exit status 2 with one line on stderr naming the flag, never a traceback; settings
resolve as defaults < preset < explicit flags."""

import numpy as np
import pytest
import torch
from conftest import assert_user_error, write_images
from PIL import Image

import constants
import generate_images
import train
import utils

SMOKE = ["--preset", "smoke", "--device", "cpu"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A two-iteration smoke-preset run on 20 random 32x32 PNGs (flat folder, unconditional)."""
    base = tmp_path_factory.mktemp("smoke")
    data = base / "data"
    write_images(data, 20, size=32, seed=1)
    out = base / "run"
    code = train.main(SMOKE + ["--data-root", str(data), "--out-dir", str(out), "--max-steps", "2"])
    assert code == 0
    checkpoints = utils.list_checkpoints(out / "Models")
    assert checkpoints, "training wrote no checkpoint"
    return dict(data=data, out=out, checkpoint=checkpoints[-1])


# ---------------------------------------------------------------------------------------
# train.py: bad flags and values
# ---------------------------------------------------------------------------------------
def test_unknown_flag(capsys):
    assert_user_error(capsys, train.main(["--bogus-flag", "3"]), "--bogus-flag")


@pytest.mark.parametrize("argv,flag", [
    (["--batch-size", "x"], "--batch-size"),
    (["--g-lr", "fast"], "--g-lr"),
    (["--adam-betas", "a,b"], "--adam-betas"),
    (["--lr-schedule", "sawtooth"], "--lr-schedule"),
    (["--image-mode", "CMYK"], "--image-mode"),
])
def test_wrong_type_or_choice(capsys, argv, flag):
    assert_user_error(capsys, train.main(argv), flag)


@pytest.mark.parametrize("argv,flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--resolution", "48"], "--resolution"),
    (["--resolution", "2048"], "--resolution"),
    (["--resolution", "16"], "--resolution"),
    (["--style-mixing-prob", "1.5"], "--style-mixing-prob"),
    (["--adam-betas", "0.5"], "--adam-betas"),
    (["--adam-betas", "0.5,1.5"], "--adam-betas"),
    (["--adam-betas", "0.0,0.9,0.99"], "--adam-betas"),
    (["--epochs", "0"], "--epochs"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--lr-cycle-min", "2"], "--lr-cycle-min"),
    (["--preset", "smoke", "--sample-count", "1000"], "--sample-count"),
])
def test_out_of_range(capsys, argv, flag):
    assert_user_error(capsys, train.main(argv), flag)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(capsys, tmp_path):
    code = train.main(SMOKE[:2] + ["--device", "cuda", "--out-dir", str(tmp_path)])
    assert_user_error(capsys, code, "--device")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_resume_with_empty_out_dir(capsys, tmp_path):
    assert_user_error(capsys, train.main(["--resume", "--out-dir", str(tmp_path)]), "--resume")


def test_missing_data_root(capsys, tmp_path):
    missing = tmp_path / "no_data"
    code = train.main(SMOKE + ["--data-root", str(missing), "--out-dir", str(tmp_path / "out")])
    assert_user_error(capsys, code, str(missing), "--data-root", "--preset demo")


def test_default_data_root_missing_points_to_the_demo(capsys, tmp_path, monkeypatch):
    """No preset and no data: the error names the setting (flag and constant) and the demo preset."""
    monkeypatch.chdir(tmp_path)
    code = train.main([])
    assert_user_error(capsys, code, "data/AD_NC", "--data-root", "DATA_ROOT", "--preset demo")


def test_batch_larger_than_data(capsys, tmp_path):
    write_images(tmp_path / "data", 4)
    code = train.main(SMOKE + ["--data-root", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")])
    assert_user_error(capsys, code, "--batch-size")


def test_conditional_on_flat_folder(capsys, tmp_path):
    write_images(tmp_path / "data", 4)
    code = train.main(SMOKE + ["--conditional", "--data-root", str(tmp_path / "data"),
                               "--out-dir", str(tmp_path / "out")])
    assert_user_error(capsys, code, "--conditional")


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in utils.setting_names(""):
        assert utils.flag_of(name) in out, name
    assert "--preset" in out and "--resume" in out
    with pytest.raises(SystemExit) as e:
        generate_images.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--seeds", "--truncation", "--label", "--noise-mode"):
        assert flag in out


# ---------------------------------------------------------------------------------------
# Settings precedence
# ---------------------------------------------------------------------------------------
def test_resolve_settings_precedence():
    default = utils.resolve_settings({}, "")
    assert default.resolution == constants.RESOLUTION == 256
    preset = utils.resolve_settings({}, "", "smoke")
    assert preset.resolution == 32
    assert preset.batch_size == constants.PRESETS["smoke"]["BATCH_SIZE"]
    assert preset.g_lr == constants.G_LR  # not in the preset: the default
    flags = utils.resolve_settings({"RESOLUTION": 64}, "", "smoke")
    assert flags.resolution == 64
    assert flags.z_dim == constants.PRESETS["smoke"]["Z_DIM"]


def test_resolve_settings_base_below_flags():
    cfg = utils.resolve_settings({"BATCH_SIZE": 8}, "", base={"batch_size": 4, "epochs": 9, "unknown_key": 1})
    assert cfg.batch_size == 8 and cfg.epochs == 9
    assert not hasattr(cfg, "unknown_key")


def test_resolve_settings_checks_the_preset_result():
    with pytest.raises(utils.UserError, match="--resolution"):
        utils.resolve_settings({"RESOLUTION": 100}, "", "smoke")


def test_parse_settings_from_argv():
    given, opts = utils.parse_settings(["--preset", "smoke", "--resolution", "64", "--no-hflip", "--conditional",
                                        "--adam-betas", "0.5,0.9"], "", "doc", train.EXTRA_FLAGS)
    assert given == {"RESOLUTION": 64, "HFLIP": False, "CONDITIONAL": True, "ADAM_BETAS": (0.5, 0.9)}
    assert opts.preset == "smoke" and not getattr(opts, "resume", False)
    cfg = utils.resolve_settings(given, "", opts.preset)
    assert (cfg.resolution, cfg.hflip, cfg.conditional, cfg.adam_betas) == (64, False, True, (0.5, 0.9))
    assert cfg.channel_max == constants.PRESETS["smoke"]["CHANNEL_MAX"]


def test_train_settings_preset_and_flags(tmp_path):
    given, opts = utils.parse_settings(["--preset", "smoke", "--resolution", "64"], "", "", train.EXTRA_FLAGS)
    cfg, state, _ = train.settings(given, opts, tmp_path)
    assert state is None
    assert cfg.resolution == 64 and cfg.preset == "smoke"
    assert cfg.batch_size == constants.PRESETS["smoke"]["BATCH_SIZE"]


def test_generate_settings_strip_prefix():
    given, _ = utils.parse_settings(["--truncation", "0.5", "--seeds", "1,2"], "GEN_", "doc")
    assert given == {"GEN_TRUNCATION": 0.5, "GEN_SEEDS": "1,2"}
    cfg = utils.resolve_settings(given, "GEN_")
    assert cfg.truncation == 0.5 and cfg.seeds == "1,2" and cfg.checkpoint == constants.GEN_CHECKPOINT
    assert not any(k.startswith("gen_") for k in vars(cfg))


# ---------------------------------------------------------------------------------------
# generate_images.py
# ---------------------------------------------------------------------------------------
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


def test_generate_label_on_unconditional_checkpoint(capsys, smoke_run, tmp_path):
    code = generate_images.main(["--checkpoint", str(smoke_run["checkpoint"]), "--label", "AD",
                                 "--out-dir", str(tmp_path / "gen"), "--device", "cpu"])
    assert_user_error(capsys, code, "--label")
    assert not (tmp_path / "gen").exists()


def test_generate_bad_seeds(capsys, smoke_run, tmp_path):
    code = generate_images.main(["--checkpoint", str(smoke_run["out"] / "Models"), "--seeds", "1,x",
                                 "--out-dir", str(tmp_path), "--device", "cpu"])
    assert_user_error(capsys, code, "--seeds")


def test_generate_writes_images_same_seed_same_image(capsys, smoke_run, tmp_path):
    out = tmp_path / "gen"
    code = generate_images.main(["--checkpoint", str(smoke_run["out"] / "Models"), "--seeds", "3,3,5",
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


def test_resume_with_changed_architecture(capsys, smoke_run):
    code = train.main(["--resume", "--out-dir", str(smoke_run["out"]), "--resolution", "64"])
    assert_user_error(capsys, code, "--resolution", str(smoke_run["checkpoint"]))
