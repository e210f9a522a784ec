"""run_outputs.py: what a run writes as it goes: the kimg schedule (--kimg, --snapshot-kimg,
--tick-kimg) with exact resume, stats.jsonl's tick means, evaluations during training and best.pt,
the loss plots from the logs, and TensorBoard's."""
import json
import sys

import pytest
import torch
from conftest import assert_user_error, smoke

import checkpoints
import generate_images
import metrics
import train
from checkpoints import read_checkpoint

SCHEDULE = ("--kimg", "0.1", "--snapshot-kimg", "0.04", "--tick-kimg", "0.016", "--eval-n", "16")


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def kimg_run(data, tmp_path_factory):
    """--kimg 0.1 at batch 8 (13 iterations), snapshots every 40 images, ticks every 16."""
    out = tmp_path_factory.mktemp("kimg")
    assert train.main(smoke(data, out, "--epochs", "1", *SCHEDULE)) == 0
    return out


def test_kimg_sets_the_length_and_snapshots_come_every_snapshot_kimg(kimg_run):
    models, samples = kimg_run / "Models", kimg_run / "saved_examples" / "32x32"
    steps = sorted(int(p.stem.split("_")[1]) for p in models.glob("checkpoint_*.pt"))
    assert steps == [5, 10, 13]  # 40 and 80 images, then the end at 104 >= 100 (--epochs 1 is overridden)
    assert read_checkpoint(models / "checkpoint_00000013.pt")["nimg"] == 104
    assert (samples / "fakes_000000.png").is_file() and not list(samples.glob("epoch_*.png"))
    evaluations = lines(kimg_run / "metrics.jsonl")
    assert [m["nimg"] for m in evaluations] == [40, 80, 104]  # every 40 images, and the finished run's end
    assert {"kimg", "step", "time_s", "train_s", "swd", "precision", "copy_rate"} <= set(evaluations[0])
    assert 0 < evaluations[0]["train_s"] <= evaluations[0]["time_s"]


def test_stats_lines_hold_the_tick_means_of_the_losses(kimg_run):
    ticks = lines(kimg_run / "stats.jsonl")
    assert [t["nimg"] for t in ticks] == [16, 32, 48, 64, 80, 96, 104]  # every 16 images, and the end
    history = read_checkpoint(kimg_run / "Models" / "checkpoint_00000013.pt")["history"]
    for before, tick in zip([0] + ticks[:-1], ticks):
        start, stop = (before["step"] if before else 0), tick["step"]
        assert tick["loss_gen"] == pytest.approx(history["loss_gen"][start:stop].mean().item(), rel=1e-5)
        assert tick["loss_critic"] == pytest.approx(history["loss_critic"][start:stop].mean().item(), rel=1e-5)
    for tick in ticks:
        assert tick["img_per_s"] > 0 and tick["sec_per_kimg"] == pytest.approx(1000 / tick["img_per_s"])
        assert tick["mem_mb"] > 0 and tick["lr_G"] > 0 and tick["maintenance_s"] >= 0
    assert [t["time_s"] for t in ticks] == sorted(t["time_s"] for t in ticks)
    assert ticks[2]["maintenance_s"] > 0  # the snapshot at 40 images fell in the third tick
    spent = ticks[-1]["time_s"] - ticks[-1]["train_s"]  # maintenance before the last line was written
    assert spent == pytest.approx(sum(t["maintenance_s"] for t in ticks), abs=1e-6)
    assert ticks[0]["gp"] is not None and ticks[1]["gp"] is None  # the penalty ran at step 0 only, then step 4


@pytest.mark.determinism
def test_resume_continues_the_kimg_schedule_exactly(data, kimg_run, tmp_path):
    out = tmp_path / "run"
    assert train.main(smoke(data, out, "--epochs", "1", *SCHEDULE, "--max-steps", "7")) == 0
    assert train.main(["--resume", "--out-dir", str(out), "--max-steps", "0"]) == 0
    a = read_checkpoint(kimg_run / "Models" / "checkpoint_00000013.pt")
    b = read_checkpoint(out / "Models" / "checkpoint_00000013.pt")
    for name, tensor in a["G_ema"].items():
        assert torch.equal(tensor, b["G_ema"][name]), name
    assert [t["nimg"] for t in lines(out / "stats.jsonl")] == [16, 32, 48, 56, 64, 80, 96, 104]
    assert b["seconds"] >= read_checkpoint(out / "Models" / "checkpoint_00000007.pt")["seconds"] > 0


def test_loss_plots_from_the_logs(kimg_run, tmp_path, capsys):
    out = tmp_path / "plots"
    assert generate_images.main(["--mode", "losses", "--checkpoint", str(kimg_run / "stats.jsonl"),
                                 "--out-dir", str(out)]) == 0
    assert (out / "losses.png").stat().st_size > 0 and (out / "metrics.png").stat().st_size > 0
    empty = tmp_path / "stats.jsonl"
    empty.write_text("")
    assert generate_images.main(["--mode", "losses", "--checkpoint", str(empty), "--out-dir", str(out)]) == 2
    assert "no statistics" in capsys.readouterr().err


def test_a_finished_run_evaluates_its_last_epoch_once(data, tmp_path):
    """Evaluations come every EVAL_EVERY epochs and after the last one, which is not evaluated twice."""
    out = tmp_path / "run"
    assert train.main(smoke(data, out, "--epochs", "3", "--eval-every", "2", "--max-steps", "0")) == 0
    assert [m["epoch"] for m in lines(out / "metrics.jsonl")] == [2, 3]
    again = tmp_path / "again"
    assert train.main(smoke(data, again, "--epochs", "2", "--eval-every", "1", "--max-steps", "0")) == 0
    assert [m["epoch"] for m in lines(again / "metrics.jsonl")] == [1, 2]


def test_training_logs_metrics_and_keeps_best(cond_run):
    samples = cond_run / "saved_examples" / "32x32"
    metrics = json.loads((samples / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2] and [m["step"] for m in metrics] == [6, 12]
    assert {"swd", "swd_32", "swd_16", "ms_ssim_fake", "ms_ssim_real", "precision", "recall"} <= set(metrics[0])
    assert {"d_real", "d_fake", "d_heldout", "d_overfit"} <= set(metrics[0])  # data/test is the held-out set
    assert {"copy_rate", "authenticity", "nn_dist_fake", "nn_dist_heldout"} <= set(metrics[0])
    assert 0 <= metrics[-1]["copy_rate"] <= 1 and metrics[-1]["nn_dist_fake"] > 0
    assert (samples / "metrics.png").is_file() and (samples / "memorisation.png").is_file()
    best, _ = checkpoints.load_checkpoint(cond_run / "Models" / "best.pt")
    best_epoch = min((m for m in metrics if m["copy_rate"] <= 0.01), key=lambda m: m["swd"])["epoch"]
    assert best["epoch"] == best_epoch and best["metrics"] == metrics[:best_epoch]
    last, _ = checkpoints.load_checkpoint(cond_run / "Models")
    assert last["metrics"] == metrics and (cond_run / "Models" / "best.pt") not in checkpoints.list_checkpoints(
        cond_run / "Models")


def test_training_does_not_keep_a_copying_generator_as_best(data, tmp_path, monkeypatch, capsys):
    """Wiring: an evaluation with the lowest SWD but a copy_rate above --eval-max-copy-rate leaves
    best.pt at the earlier evaluation (and says why)."""
    scripted = iter([dict(swd=5.0, copy_rate=0.0), dict(swd=2.0, copy_rate=0.5)])
    monkeypatch.setattr(metrics.Evaluator, "__call__", lambda self, G, device, D=None: next(scripted))
    monkeypatch.setattr(metrics.Evaluator, "save_memorisation_figure", lambda self, path: None)
    out = tmp_path / "run"
    assert train.main(smoke(data, out, "--epochs", "2")) == 0
    best, _ = checkpoints.load_checkpoint(out / "Models" / "best.pt")
    assert best["epoch"] == 1
    assert "not kept as best.pt: copy_rate 0.5 is above --eval-max-copy-rate 0.01" in capsys.readouterr().out


@pytest.mark.determinism
def test_evaluation_is_the_same_after_resume(data, tmp_path):
    """The metrics history is kept in the checkpoint: a resumed run logs the same figures as a straight one."""
    straight, split = tmp_path / "a", tmp_path / "b"
    assert train.main(smoke(data, straight, "--epochs", "2", "--device", "cpu")) == 0  # bit for bit: CPU
    assert train.main(smoke(data, split, "--epochs", "1", "--device", "cpu")) == 0
    assert train.main(["--resume", "--out-dir", str(split), "--epochs", "2"]) == 0
    a, b = (json.loads((d / "saved_examples" / "32x32" / "metrics.json").read_text()) for d in (straight, split))
    assert a == b and len(a) == 2


def test_eval_metric_fid_without_weights_is_an_error(capsys, data, tmp_path):
    code = train.main(smoke(data, tmp_path, "--eval-metric", "fid"))
    assert_user_error(capsys, code, "--eval-metric fid", "--inception-weights")


def test_tensorboard_missing_package_is_a_one_line_error(capsys, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    code = train.main(smoke(data, tmp_path, "--tensorboard", "--max-steps", "1"))
    assert_user_error(capsys, code, "--tensorboard", "pip install tensorboard")


def test_tensorboard_logs_scalars_and_images(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert train.main(smoke(data, tmp_path, "--tensorboard", "--epochs", "1")) == 0
    events = EventAccumulator(str(tmp_path / "runs")).Reload()
    tags = events.Tags()
    assert {"train/loss_gen", "train/loss_critic", "metrics/swd"} <= set(tags["scalars"])
    assert "samples" in tags["images"] and len(events.Scalars("train/loss_gen")) == 6
