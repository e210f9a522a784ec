"""The kimg schedule (--kimg, --snapshot-kimg, --tick-kimg) and the run's logs, stats.jsonl and
metrics.jsonl: lengths, snapshot names, tick means, exact resume, and what a resume or a fresh
run does with lines written after the checkpoint it starts from."""
import json

import pytest
import torch
from conftest import smoke

import generate_images
import train
from utils import append_jsonl, read_checkpoint, read_jsonl

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


def test_resuming_an_older_checkpoint_moves_later_log_lines_aside(data, tmp_path):
    out = tmp_path / "run"
    assert train.main(smoke(data, out, "--epochs", "1", *SCHEDULE)) == 0
    before = (out / "stats.jsonl").read_text()
    assert train.main(["--resume", str(out / "Models" / "checkpoint_00000005.pt"), "--max-steps", "6"]) == 0
    (superseded,) = (out / "Models" / "superseded").iterdir()
    assert (superseded / "stats.jsonl").read_text() == before  # the original, whole
    assert [t["nimg"] for t in lines(out / "stats.jsonl")] == [16, 32, 48]  # up to 40 images, then the new end
    assert [m["nimg"] for m in lines(out / "metrics.jsonl")] == [40, 48]  # up to 40 images, then the new end
    assert {p.name for p in superseded.iterdir()} >= {"checkpoint_00000010.pt", "metrics.jsonl"}


def test_a_fresh_run_starts_new_logs(data, tmp_path):
    out = tmp_path / "run"
    assert train.main(smoke(data, out, "--max-steps", "2", "--tick-kimg", "0.008", "--eval-every", "0")) == 0
    assert not (out / "metrics.jsonl").exists()  # no evaluation, no metrics lines
    assert train.main(smoke(data, out, "--max-steps", "3", "--tick-kimg", "0.008", "--overwrite")) == 0
    assert [t["step"] for t in lines(out / "stats.jsonl")] == [1, 2, 3]


def test_a_cut_line_is_skipped_when_read_and_the_next_line_starts_afresh(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text('{"kimg": 4.0, "nimg": 4000}\n{"kimg": 8.0, "ni')
    assert read_jsonl(path) == [{"kimg": 4.0, "nimg": 4000}]
    append_jsonl({"kimg": 8.0, "nimg": 8000, "gp": float("nan")}, path)  # the resumed run's next tick
    assert read_jsonl(path) == [{"kimg": 4.0, "nimg": 4000}, {"kimg": 8.0, "nimg": 8000, "gp": None}]


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
