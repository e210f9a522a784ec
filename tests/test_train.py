"""train.py end to end: samples, checkpoints and plots; bad flags and data in one line; exact resume;
a non-finite loss or a full disk stops without touching the last good checkpoint; the scripts as
commands; --compile, Winograd, spectral norm, attention and AdaIN through training and resume."""
import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import QUICK, assert_user_error, smoke, write_images
from PIL import Image

import checkpoints
import evaluate
import generate_images
import losses
import ops
import run_folder
import settings
import train
import training


def full_disk_save(obj, f, *args, **kwargs):
    """torch.save on a disk that fills up part-way, as PyTorch reports it: a RuntimeError whose
    context is the OSError."""
    f.write(b"PK\x03\x04 partial")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_checkpoints(data, tmp_path, monkeypatch, capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "6", *QUICK)) == 0
    before = (tmp_path / "Models" / "checkpoint_00000006.pt").read_bytes()
    monkeypatch.setattr(checkpoints.torch, "save", full_disk_save)
    capsys.readouterr()
    code = train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "12"])
    assert_user_error(capsys, code, str(tmp_path / "Models" / "checkpoint_00000012.pt"), "No space left on device")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "Models").iterdir()) == ["checkpoint_00000006.pt"]  # no .tmp, no lock
    assert (tmp_path / "Models" / "checkpoint_00000006.pt").read_bytes() == before
    assert checkpoints.load_checkpoint(tmp_path / "Models")[0]["step"] == 6


def full_disk(self, fp, *args, **kwargs):
    """PIL's save on a full disk: part of the file written, then ENOSPC."""
    with open(fp, "wb") as f:
        f.write(b"\x89PNG")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_a_sample_grid_is_one_line(data, tmp_path, monkeypatch, capsys):
    from PIL import Image
    monkeypatch.setattr(Image.Image, "save", full_disk)
    code = train.main(smoke(data, tmp_path, "--max-steps", "2", *QUICK))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    reals = tmp_path / "saved_examples" / "32x32" / "reals.png"
    assert code == 1 and len(err) == 1, err
    assert f"cannot write {reals}: No space left on device" in err[0]
    assert not reals.exists() and not list(reals.parent.glob("*.tmp"))  # no truncated grid left behind
    assert not (tmp_path / "Models" / run_folder.LOCK_FILE).exists()


def test_generate_and_evaluate_on_a_full_disk_write_no_part_files(uncond_run, data, tmp_path, monkeypatch, capsys):
    from PIL import Image
    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "gen"
    code = generate_images.main(["--checkpoint", str(uncond_run / "Models"), "--out-dir", str(out), "--n", "2"])
    line = assert_one_line(capsys, code)
    assert "cannot write" in line and "seed0000.png" in line and not list(out.iterdir())
    code = evaluate.main(["--checkpoint", str(uncond_run / "Models"), "--data-root", str(data), "--n", "16",
                          "--out", str(tmp_path / "ev" / "evaluation.json")])
    line = assert_one_line(capsys, code)
    assert "memorisation.png: No space left on device" in line and not list((tmp_path / "ev").iterdir())


def assert_one_line(capsys, code):
    """Exit status 1 and exactly one line on stderr (tqdm's bars aside), no traceback."""
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not line.startswith(("loading images", "\r"))]
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


SMOKE = ["--preset", "smoke", "--device", "cpu"]


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
    a_file = tmp_path / "slices.png"  # an image, or any file, where the folder should be
    a_file.write_bytes(b"x")
    code = train.main(SMOKE + ["--data-root", str(a_file), "--out-dir", str(tmp_path / "out")])
    assert_user_error(capsys, code, f"--data-root {a_file} is a file; give the folder")


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


def test_resume_with_changed_architecture(capsys, uncond_run):
    code = train.main(["--resume", "--out-dir", str(uncond_run), "--resolution", "64"])
    assert_user_error(capsys, code, "--resolution", str(checkpoints.list_checkpoints(uncond_run / "Models")[-1]))
    code = train.main(["--resume", "--preset", "demo", "--out-dir", str(uncond_run)])  # the preset's, not a flag
    assert_user_error(capsys, code, "--preset demo sets --resolution 64", "resume without --preset")


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
    ckpts = checkpoints.list_checkpoints(cond_run / "Models")
    assert [p.name for p in ckpts] == ["checkpoint_00000006.pt", "checkpoint_00000012.pt"]  # 48 images / 8
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    assert state["step"] == 12 and state["epoch"] == 2 and state["class_names"] == ["AD", "NC"]
    assert len(state["history"]["loss_gen"]) == 12
    assert state["config"]["conditional"] is True and state["config"]["resolution"] == 32


@pytest.mark.determinism
def test_resume_is_exact(data, tmp_path):
    """3 steps + resume to 7 steps == 7 steps in one go, bit for bit (crossing an epoch boundary).
    On the CPU: cuDNN's autotuned kernels and atomic adds vary a CUDA run's last bits."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(smoke(data, straight, "--max-steps", "7", "--device", "cpu")) == 0
    assert train.main(smoke(data, split, "--max-steps", "3", "--device", "cpu")) == 0
    assert train.main(["--resume", "--out-dir", str(split), "--max-steps", "7"]) == 0
    a, _ = checkpoints.load_checkpoint(straight / "Models")
    b, _ = checkpoints.load_checkpoint(split / "Models")
    assert a["step"] == b["step"] == 7 and a["epoch"] == b["epoch"] == 1
    for net in ("G", "D", "G_ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs after resume"
    assert torch.equal(a["history"]["loss_critic"], b["history"]["loss_critic"])
    assert torch.equal(a["pl_mean"], b["pl_mean"])


def test_resuming_a_run_that_reached_its_length_says_which_flag_and_touches_nothing(data, tmp_path, capsys):
    """A finished run resumed again (a requeued job, or --resume after a short --max-steps test) exits 0
    with one line naming the flag to raise, and writes nothing; raising it trains on."""
    assert train.main(smoke(data, tmp_path, "--max-steps", "2")) == 0
    def files():  # the run's lock comes and goes with every start
        return {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "train.lock"}
    before = files()
    capsys.readouterr()
    assert train.main(["--resume", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("nothing to train: ") and "--max-steps 2 (step 2)" in out[0]
    assert files() == before
    last_grid = tmp_path / "saved_examples" / "32x32" / "step_00000002.png"
    last_grid.unlink()  # as if a stop signal had come in the last iteration: the run's end is still to do
    assert train.main(["--resume", "--out-dir", str(tmp_path)]) == 0
    assert "done: 2 iterations" in capsys.readouterr().out and last_grid.is_file()
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "3"]) == 0
    assert checkpoints.load_checkpoint(tmp_path / "Models")[0]["step"] == 3
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "0", "--epochs", "1"]) == 0
    assert checkpoints.load_checkpoint(tmp_path / "Models")[0]["step"] == 6  # one epoch of 48 slices
    capsys.readouterr()
    assert train.main(["--resume", "--out-dir", str(tmp_path)]) == 0
    assert "its --epochs 1 (epoch 1): give a larger one" in capsys.readouterr().out
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--kimg", "0.04"]) == 0
    assert "its --kimg 0.04 (48 images)" in capsys.readouterr().out


def test_a_run_is_wrapped_up_when_its_last_grid_and_evaluation_are_there(tmp_path):
    cfg = SimpleNamespace(resolution=32, eval_every=1)
    grid = tmp_path / "saved_examples" / "32x32" / "step_00000002.png"
    assert not train.wrapped_up(cfg, dict(step=2, metrics=[dict(step=2)]), tmp_path)
    grid.parent.mkdir(parents=True)
    grid.touch()
    assert train.wrapped_up(cfg, dict(step=2, metrics=[dict(step=1), dict(step=2)]), tmp_path)
    assert not train.wrapped_up(cfg, dict(step=2, metrics=[dict(step=1)]), tmp_path)
    assert not train.wrapped_up(cfg, dict(step=2, metrics=[]), tmp_path)
    assert train.wrapped_up(SimpleNamespace(resolution=32, eval_every=0), dict(step=2, metrics=[]), tmp_path)


def test_checkpoint_of_an_older_version_resumes_with_defaults_for_newer_settings(data, tmp_path):
    """A checkpoint written before a setting existed (no key in its config) resumes with its default."""
    assert train.main(smoke(data, tmp_path, "--max-steps", "1")) == 0
    state, path = checkpoints.load_checkpoint(tmp_path / "Models")
    for key in ("spectral_norm", "attention_res", "augment", "progressive"):
        state["config"].pop(key, None)
    torch.save(state, path)
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "2"]) == 0
    assert checkpoints.load_checkpoint(tmp_path / "Models")[0]["step"] == 2


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
    assert checkpoints.list_checkpoints(tmp_path / "Models")[-1].name == "checkpoint_00000006.pt"
    assert (tmp_path / "Models" / "checkpoint_00000006.pt").read_bytes() == before


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
    state, _ = checkpoints.load_checkpoint(tmp_path / "Models")
    assert state["step"] == 2 and state["config"]["compile"] is True


@pytest.mark.parametrize("fused", [True, False])
def test_compile_keeps_d_eager_where_its_fused_cpu_kernels_run(data, tmp_path, monkeypatch, fused):
    """On the CPU D's layers run oneDNN's convolution with the bias and activation fused, which a compiled D loses:
    there --compile compiles G's synthesis network only; where the fused kernel does not run, D as well."""
    modules = []

    def recording_compile(fn, *args, **kwargs):
        modules.extend([type(fn).__name__] if isinstance(fn, torch.nn.Module) else [])
        return fn
    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(ops, "epilogue_kernel_works", lambda: fused)
    assert train.main(smoke(data, tmp_path, "--max-steps", "1", "--compile", "--eval-every", "0")) == 0
    assert modules == (["SynthesisNetwork"] if fused else ["SynthesisNetwork", "Discriminator"])


@pytest.mark.determinism
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
        history[setting] = checkpoints.load_checkpoint(out / "Models")[0]["history"]
        if setting == "on":
            assert len(calls) > 50
    for key in ("loss_critic", "loss_gen"):
        on, off = history["on"][key], history["off"][key]
        assert torch.allclose(on[0], off[0], rtol=1e-5, atol=1e-6), key  # before any update: float32 rounding
        assert torch.allclose(on, off, rtol=0, atol=5e-3), key  # then Adam's steps amplify it, a little


def test_amp_is_a_cuda_setting():
    cfg = settings.resolve_settings({"AMP": True}, "", "smoke")
    run = training.build_run(cfg, SimpleNamespace(class_names=["AD", "NC"], channels=1), torch.device("cpu"))
    assert run.amp is False and isinstance(training.autocast(run), contextlib.nullcontext)  # no bf16 on the CPU


def test_spectral_norm_and_attention_train_resume_and_are_part_of_the_architecture(data, tmp_path, capsys):
    flags = ["--spectral-norm", "--attention-res", "16", "--eval-every", "0"]
    assert train.main(smoke(data, tmp_path, "--max-steps", "2", *flags)) == 0
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "3"]) == 0
    state, _ = checkpoints.load_checkpoint(tmp_path / "Models")
    assert state["step"] == 3 and state["model_args"]["D"]["spectral_norm"] is True
    assert state["model_args"]["G"]["attention_res"] == state["model_args"]["D"]["attention_res"] == 16
    assert generate_images.main(["--checkpoint", str(tmp_path / "Models"), "--out-dir", str(tmp_path / "gen"),
                                 "--n", "2"]) == 0
    capsys.readouterr()
    code = train.main(["--resume", "--out-dir", str(tmp_path), "--no-spectral-norm"])
    assert_user_error(capsys, code, "--spectral-norm")
    code = train.main(smoke(data, tmp_path / "bad", "--attention-res", "12"))
    assert_user_error(capsys, code, "--attention-res 12")


def test_adain_style_op_trains_resumes_generates_and_is_part_of_the_architecture(data, tmp_path, capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "2", "--style-op", "adain", "--eval-every", "0")) == 0
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "3"]) == 0
    state, _ = checkpoints.load_checkpoint(tmp_path / "Models")
    assert state["step"] == 3 and state["model_args"]["G"]["style_op"] == "adain"
    assert any(".adain." in k for k in state["G_ema"])
    assert generate_images.main(["--checkpoint", str(tmp_path / "Models"), "--out-dir", str(tmp_path / "gen"),
                                 "--n", "2"]) == 0
    capsys.readouterr()
    code = train.main(["--resume", "--out-dir", str(tmp_path), "--style-op", "modconv"])
    assert_user_error(capsys, code, "--style-op")
