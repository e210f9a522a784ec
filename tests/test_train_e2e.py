"""End to end: train.py writes samples, checkpoints and plots; resume is exact; a stop signal saves
a checkpoint; a non-finite loss stops without touching the last good checkpoint;
generate_images.py writes what it is asked for, and the same seed gives the same image."""
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from conftest import assert_user_error, smoke
from PIL import Image

import generate_images
import losses
import ops
import train
import training
import utils

REPO = Path(__file__).resolve().parents[1]


def test_train_writes_samples_checkpoints_plot_and_config(cond_run):
    """The shared run of conftest: python train.py --preset smoke --epochs 2 --conditional."""
    samples = cond_run / "saved_examples" / "32x32"
    assert (samples / "epoch_0001.png").is_file() and (samples / "epoch_0002.png").is_file()
    assert (samples / "losses.png").is_file() and (samples / "config.json").is_file()
    reals = np.asarray(Image.open(samples / "reals.png"))  # 8 training slices (smoke preset), one row
    assert reals.shape == (2 + 34, 2 + 8 * 34)
    tile_max = [int(reals[2:34, 2 + 34 * i:34 + 34 * i].max()) for i in range(8)]
    is_ad = [m > 200 for m in tile_max]  # AD squares are 255, NC squares 120
    assert is_ad == sorted(is_ad, reverse=True) and any(is_ad) and not all(is_ad)  # class by class
    ckpts = utils.list_checkpoints(cond_run / "Models")
    assert [p.name for p in ckpts] == ["checkpoint_00000006.pt", "checkpoint_00000012.pt"]  # 48 images / 8
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    assert state["step"] == 12 and state["epoch"] == 2 and state["class_names"] == ["AD", "NC"]
    assert len(state["history"]["loss_gen"]) == 12
    assert state["config"]["conditional"] is True and state["config"]["resolution"] == 32


def test_resume_is_exact(data, tmp_path):
    """3 steps + resume to 7 steps == 7 steps in one go, bit for bit (crossing an epoch boundary).
    On the CPU: cuDNN's autotuned kernels and atomic adds vary a CUDA run's last bits."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(smoke(data, straight, "--max-steps", "7", "--device", "cpu")) == 0
    assert train.main(smoke(data, split, "--max-steps", "3", "--device", "cpu")) == 0
    assert train.main(["--resume", "--out-dir", str(split), "--max-steps", "7"]) == 0
    a, _ = utils.load_checkpoint(straight / "Models")
    b, _ = utils.load_checkpoint(split / "Models")
    assert a["step"] == b["step"] == 7 and a["epoch"] == b["epoch"] == 1
    for net in ("G", "D", "G_ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs after resume"
    assert torch.equal(a["history"]["loss_critic"], b["history"]["loss_critic"])
    assert torch.equal(a["pl_mean"], b["pl_mean"])


def test_resume_refuses_changed_architecture(data, tmp_path, capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "1")) == 0
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--z-dim", "64"]) == 2
    assert "--z-dim" in capsys.readouterr().err


def test_checkpoint_of_an_older_version_resumes_with_defaults_for_newer_settings(data, tmp_path):
    """A checkpoint written before a setting existed (no key in its config) resumes with its default."""
    assert train.main(smoke(data, tmp_path, "--max-steps", "1")) == 0
    state, path = utils.load_checkpoint(tmp_path / "Models")
    for key in ("spectral_norm", "attention_res", "augment", "progressive"):
        state["config"].pop(key, None)
    torch.save(state, path)
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "2"]) == 0
    assert utils.load_checkpoint(tmp_path / "Models")[0]["step"] == 2


def test_stop_signal_saves_a_checkpoint_and_resume_continues(data, tmp_path, monkeypatch):
    real_ema_update = training.ema_update
    calls = []

    def ema_then_signal(*args):
        real_ema_update(*args)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training, "ema_update", ema_then_signal)
    assert train.main(smoke(data, tmp_path, "--epochs", "50")) == 128 + signal.SIGTERM
    assert [p.name for p in utils.list_checkpoints(tmp_path / "Models")] == ["checkpoint_00000002.pt"]
    monkeypatch.setattr(training, "ema_update", real_ema_update)
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "4"]) == 0
    state, _ = utils.load_checkpoint(tmp_path / "Models")
    assert state["step"] == 4 and len(state["history"]["loss_gen"]) == 4


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "6")) == 0  # one epoch: checkpoint at step 6
    before = (tmp_path / "Models" / "checkpoint_00000006.pt").read_bytes()
    real_loss, calls = losses.d_wgan_loss, []

    def nan_on_third_call(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(losses, "d_wgan_loss", nan_on_third_call)
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "20"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite loss_critic" in err[0] and "step 8" in err[0]
    assert utils.list_checkpoints(tmp_path / "Models")[-1].name == "checkpoint_00000006.pt"
    assert (tmp_path / "Models" / "checkpoint_00000006.pt").read_bytes() == before


def read(path):
    return np.asarray(Image.open(path))


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


def test_scripts_run_as_commands(cond_run, tmp_path):
    gen = subprocess.run([sys.executable, "generate_images.py", "--checkpoint", str(cond_run / "Models"),
                          "--out-dir", str(tmp_path), "--n", "2"], cwd=REPO, capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    assert len(list(tmp_path.glob("seed*.png"))) == 2
    bad = subprocess.run([sys.executable, "train.py", "--epochs", "-1"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --epochs must be >= 1, got -1"


def test_compile_falls_back_to_eager_with_one_warning(data, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler found\nlong details")
    monkeypatch.setattr(torch, "compile", broken)
    assert train.main(smoke(data, tmp_path, "--max-steps", "2", "--compile", "--eval-every", "0")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --compile: torch.compile does not work here (RuntimeError: no C compiler found); "
                        "training runs eagerly"]
    state, _ = utils.load_checkpoint(tmp_path / "Models")
    assert state["step"] == 2 and state["config"]["compile"] is True


def test_winograd_training_follows_the_direct_convolution(data, tmp_path, monkeypatch):
    """The smoke model's layers are under Winograd's thresholds; lowered, every stride-1 3x3 convolution of
    the step (penalties' double backward included) runs it, and the losses follow the direct convolution's."""
    monkeypatch.setitem(ops.WINOGRAD, "min_channels", 1)
    monkeypatch.setitem(ops.WINOGRAD, "min_size", 2)
    calls = []
    monkeypatch.setattr(ops, "winograd_conv", lambda *a, f=ops.winograd_conv: calls.append(1) or f(*a))
    history = {}
    for setting in ("on", "off"):
        out = tmp_path / setting
        assert train.main(smoke(data, out, "--max-steps", "5", "--eval-every", "0", "--winograd", setting)) == 0
        history[setting] = utils.load_checkpoint(out / "Models")[0]["history"]
        if setting == "on":
            assert len(calls) > 50
    for key in ("loss_critic", "loss_gen"):
        on, off = history["on"][key], history["off"][key]
        assert torch.allclose(on[0], off[0], rtol=1e-5, atol=1e-6), key  # before any update: float32 rounding
        assert torch.allclose(on, off, rtol=0, atol=5e-3), key  # then Adam's steps amplify it, a little


def test_amp_is_a_cuda_setting():
    cfg = utils.resolve_settings({"AMP": True}, "", "smoke")
    run = training.build_run(cfg, SimpleNamespace(class_names=["AD", "NC"], channels=1), torch.device("cpu"))
    assert run.amp is False and isinstance(training.autocast(run), contextlib.nullcontext)  # no bf16 on the CPU


def test_spectral_norm_and_attention_train_resume_and_are_part_of_the_architecture(data, tmp_path, capsys):
    flags = ["--spectral-norm", "--attention-res", "16", "--eval-every", "0"]
    assert train.main(smoke(data, tmp_path, "--max-steps", "2", *flags)) == 0
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "3"]) == 0
    state, _ = utils.load_checkpoint(tmp_path / "Models")
    assert state["step"] == 3 and state["model_args"]["D"]["spectral_norm"] is True
    assert state["model_args"]["G"]["attention_res"] == state["model_args"]["D"]["attention_res"] == 16
    assert generate_images.main(["--checkpoint", str(tmp_path / "Models"), "--out-dir", str(tmp_path / "gen"),
                                 "--n", "2"]) == 0
    capsys.readouterr()
    code = train.main(["--resume", "--out-dir", str(tmp_path), "--no-spectral-norm"])
    assert_user_error(capsys, code, "--spectral-norm")
    code = train.main(smoke(data, tmp_path / "bad", "--attention-res", "12"))
    assert_user_error(capsys, code, "--attention-res 12")


def test_wgan_r1_adds_an_r1_penalty_to_the_gradient_penalty():
    """Seed 002: WGAN-GP with a small R1 penalty on the reals as well."""
    data = SimpleNamespace(class_names=["AD", "NC"], channels=1)
    real = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    stats = {}
    for gamma in (0.0, 5.0):
        cfg = utils.resolve_settings({"LOSS": "wgan-gp", "WGAN_R1_GAMMA": gamma}, "", "smoke")
        torch.manual_seed(0)
        run = training.build_run(cfg, data, torch.device("cpu"))
        torch.manual_seed(1)
        stats[gamma] = training.d_step(run, cfg, real, None, regularize=True)
    assert "r1" not in stats[0.0] and stats[5.0]["r1"] > 0
    assert stats[0.0]["gp"] == stats[5.0]["gp"]  # the same gradient penalty, logged as gp
    assert stats[5.0]["grad_d_reg"] != stats[0.0]["grad_d_reg"]  # and the R1 term in the update
    only_r1 = utils.resolve_settings({"LOSS": "wgan-gp", "GP_LAMBDA": 0, "WGAN_R1_GAMMA": 1.0}, "", "smoke")
    assert training.reg_intervals(only_r1)["D"] == only_r1.d_reg_interval


def test_adain_style_op_trains_resumes_generates_and_is_part_of_the_architecture(data, tmp_path, capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "2", "--style-op", "adain", "--eval-every", "0")) == 0
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "3"]) == 0
    state, _ = utils.load_checkpoint(tmp_path / "Models")
    assert state["step"] == 3 and state["model_args"]["G"]["style_op"] == "adain"
    assert any(".adain." in k for k in state["G_ema"])
    assert generate_images.main(["--checkpoint", str(tmp_path / "Models"), "--out-dir", str(tmp_path / "gen"),
                                 "--n", "2"]) == 0
    capsys.readouterr()
    code = train.main(["--resume", "--out-dir", str(tmp_path), "--style-op", "modconv"])
    assert_user_error(capsys, code, "--style-op")
