"""run_folder.py: one run per output folder (refusal, --overwrite, a lock against concurrent runs),
resume from the newest readable checkpoint or a named one, exactly, with what was written after it
moved aside, never deleted, and fresh logs for a fresh run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, assert_user_error, smoke, steps_of

import checkpoints
import run_folder
import settings
import train

REPO = Path(__file__).resolve().parents[1]


def assert_same_weights(a, b):
    for net in ("G", "D", "G_ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs"
    assert torch.equal(a["history"]["loss_critic"], b["history"]["loss_critic"])


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """7 iterations in one go (checkpoints at 6, the end of epoch 1, and 7)."""
    out = tmp_path_factory.mktemp("straight")
    assert train.main(smoke(data, out, "--max-steps", "7", *QUICK)) == 0
    return checkpoints.load_checkpoint(out / "Models")[0]


def test_a_second_fresh_run_into_the_same_folder_is_refused_and_overwrite_starts_over(data, tmp_path, capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "8", *QUICK)) == 0
    first = (tmp_path / "Models" / "checkpoint_00000008.pt").read_bytes()
    capsys.readouterr()
    code = train.main(smoke(data, tmp_path, "--max-steps", "8", "--seed", "5", *QUICK))
    line = assert_user_error(capsys, code, str(tmp_path), "--resume", "--out-dir", "--overwrite")
    assert "Models/checkpoint_00000008.pt and 2 more" in line  # the newest, an older one, stats.jsonl
    assert (tmp_path / "Models" / "checkpoint_00000008.pt").read_bytes() == first  # untouched
    assert json.loads((tmp_path / "saved_examples" / "32x32" / "config.json").read_text())["seed"] == 0

    assert train.main(smoke(data, tmp_path, "--max-steps", "3", "--seed", "5", "--overwrite", *QUICK)) == 0
    assert "--overwrite: deleted" in capsys.readouterr().err
    assert steps_of(tmp_path / "Models") == [3]  # the first run's 6 and 8 are gone, not mixed in
    assert not (tmp_path / "saved_examples" / "32x32" / "epoch_0001.png").exists()
    state, _ = checkpoints.load_checkpoint(tmp_path / "Models")
    assert state["config"]["seed"] == 5
    assert json.loads((tmp_path / "saved_examples" / "32x32" / "config.json").read_text())["seed"] == 5


def test_a_concurrent_run_is_refused_and_repeated_sigterm_exits_143_with_a_checkpoint(data, tmp_path, capsys):
    """A real `python train.py` holds the folder's lock; a second run there names its PID. Two quick
    SIGTERMs (a cluster's scheduler and its launcher, say) end it with 143 and a loadable checkpoint."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "train.py", *smoke(data, out, "--epochs", "1000", *QUICK)],
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "epoch 1/1000" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (out / "Models" / run_folder.LOCK_FILE).read_text().split() == [str(proc.pid), socket.gethostname()]
        code = train.main(smoke(data, out, "--max-steps", "2", *QUICK))
        assert_user_error(capsys, code, f"PID {proc.pid}", str(out / "Models"), "--out-dir")
        code = train.main(["--resume", "--out-dir", str(out), "--max-steps", "2"])
        assert_user_error(capsys, code, f"PID {proc.pid}")
    finally:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text
    assert "Traceback" not in text and "continue with --resume" in text
    state, _ = checkpoints.load_checkpoint(out / "Models")
    assert state["step"] >= 1
    assert not (out / "Models" / run_folder.LOCK_FILE).exists()  # released
    assert list((out / "Models").glob("*.tmp")) == []


def test_a_lock_left_by_a_dead_process_is_taken_over(data, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "Models" / run_folder.LOCK_FILE
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert train.main(smoke(data, tmp_path, "--max-steps", "1", *QUICK)) == 0
    err = capsys.readouterr().err
    assert f"taking over {lock}, left by PID {dead.pid} on {socket.gethostname()}: no process holds" in err
    assert not lock.exists() and steps_of(tmp_path / "Models") == [1]


def test_the_pid_decides_where_the_file_system_has_no_flock(tmp_path, monkeypatch):
    """Without flock (some NFS and Lustre mounts), a lock naming a live process on this host holds."""
    monkeypatch.setattr(run_folder, "_try_flock", lambda fd: None)
    lock = tmp_path / run_folder.LOCK_FILE
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")  # alive: pytest's parent
    with pytest.raises(settings.UserError, match=f"PID {os.getppid()}"):
        with run_folder.RunLock(tmp_path):
            pass
    lock.write_text(f"{os.getppid()} some-other-node\n")  # unknown: held
    with pytest.raises(settings.UserError, match="some-other-node"):
        with run_folder.RunLock(tmp_path):
            pass
    lock.write_text("")
    with run_folder.RunLock(tmp_path):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


def test_flock_refuses_a_second_holder_even_when_the_lock_file_is_deleted(tmp_path):
    with run_folder.RunLock(tmp_path):
        with pytest.raises(settings.UserError, match=f"PID {os.getpid()}"):
            with run_folder.RunLock(tmp_path):
                pass
        (tmp_path / run_folder.LOCK_FILE).unlink()  # the flock is on the folder itself
        with pytest.raises(settings.UserError, match="its PID not recorded"):
            with run_folder.RunLock(tmp_path):
                pass


def test_taking_over_a_lock_says_what_was_checked(tmp_path, monkeypatch, capsys):
    """A lock file naming a live process (PID 1) that holds no flock: taken over, without claiming the
    process is gone; without flock, a live PID on this host holds the folder."""
    lock = tmp_path / run_folder.LOCK_FILE
    lock.write_text(f"1 {socket.gethostname()}\n")
    with run_folder.RunLock(tmp_path):
        pass
    err = capsys.readouterr().err
    assert "no process holds the folder's lock" in err and "no longer running" not in err


def test_resume_path_from_another_folder_needs_an_empty_one(data, tmp_path, capsys):
    assert train.main(smoke(data, tmp_path / "a", "--max-steps", "2", *QUICK)) == 0
    assert train.main(smoke(data, tmp_path / "b", "--max-steps", "1", *QUICK)) == 0
    capsys.readouterr()
    source = tmp_path / "a" / "Models" / "checkpoint_00000002.pt"
    code = train.main(["--resume", str(source), "--out-dir", str(tmp_path / "b"), "--max-steps", "3"])
    assert_user_error(capsys, code, f"{tmp_path / 'b'} holds another run", "--out-dir")
    assert train.main(["--resume", str(source), "--out-dir", str(tmp_path / "c"), "--max-steps", "3"]) == 0
    assert steps_of(tmp_path / "c" / "Models") == [3] and steps_of(tmp_path / "a" / "Models") == [2]
    code = train.main(["--resume", str(tmp_path / "a" / "Models")])
    assert_user_error(capsys, code, "--resume", "is a folder")


def test_training_prunes_only_its_own_checkpoints(data, tmp_path):
    """--keep-checkpoints 1 after resuming an older checkpoint: the superseded later branch is kept
    aside, never pruned, and never taken for this run's."""
    assert train.main(smoke(data, tmp_path, "--max-steps", "8", "--keep-checkpoints", "0", *QUICK)) == 0
    assert steps_of(tmp_path / "Models") == [6, 8]
    older = tmp_path / "Models" / "checkpoint_00000006.pt"
    assert train.main(["--resume", str(older), "--max-steps", "7", "--keep-checkpoints", "1"]) == 0
    assert steps_of(tmp_path / "Models") == [7]
    aside = list((tmp_path / "Models" / run_folder.SUPERSEDED).glob("*/checkpoint_*.pt"))
    assert [p.name for p in aside] == ["checkpoint_00000008.pt"]


@pytest.mark.determinism
def test_resume_passes_over_a_truncated_newest_checkpoint_exactly(data, tmp_path, straight, capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "3", *QUICK)) == 0
    good = (tmp_path / "Models" / "checkpoint_00000003.pt").read_bytes()
    (tmp_path / "Models" / "checkpoint_00000005.pt").write_bytes(good[:len(good) // 2])  # a save cut short
    (tmp_path / "Models" / "checkpoint_00000004.pt").write_text("not a checkpoint")
    capsys.readouterr()
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "7"]) == 0
    err = capsys.readouterr().err
    passed = [line for line in err.splitlines() if line.startswith("warning: passing over")]
    assert len(passed) == 2 and "checkpoint_00000005.pt is an incomplete" in passed[0]
    assert "checkpoint_00000004.pt is not a PyTorch checkpoint" in passed[1]
    state, _ = checkpoints.load_checkpoint(tmp_path / "Models")
    assert state["step"] == 7 and steps_of(tmp_path / "Models") == [3, 6, 7]
    assert_same_weights(state, straight)


@pytest.mark.determinism
def test_resume_from_a_named_older_checkpoint_is_exact_and_moves_the_later_ones_aside(data, tmp_path, straight,
                                                                                   capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "3", *QUICK)) == 0
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "5", "--seed", "9"]) == 0
    assert steps_of(tmp_path / "Models") == [3, 5]
    capsys.readouterr()
    older = tmp_path / "Models" / "checkpoint_00000003.pt"
    assert train.main(["--resume", str(older), "--max-steps", "7"]) == 0  # OUT_DIR: the folder above Models/
    assert "moved 1 checkpoint(s) newer than step 3" in capsys.readouterr().err
    state, _ = checkpoints.load_checkpoint(tmp_path / "Models")
    assert steps_of(tmp_path / "Models") == [3, 6, 7]
    assert_same_weights(state, straight)


def test_resume_with_no_readable_checkpoint_is_one_line(data, tmp_path, capsys):
    models = tmp_path / "Models"
    models.mkdir()
    (models / "checkpoint_00000002.pt").write_bytes(b"")
    (models / "checkpoint_00000001.pt").write_text("hello")
    code = train.main(["--resume", "--out-dir", str(tmp_path)])
    assert_user_error(capsys, code, "no readable checkpoint", "checkpoint_00000002.pt is empty", "1 older")


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


SCHEDULE = ("--kimg", "0.1", "--snapshot-kimg", "0.04", "--tick-kimg", "0.016", "--eval-n", "16")


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def fake_run(out, steps, best=None):
    """A run folder with checkpoints at `steps` and best.pt from step `best` ("garbage": unreadable)."""
    models = out / "Models"
    for step in steps:
        checkpoints.save_checkpoint(dict(step=step), checkpoints.checkpoint_path(models, step))
    if best == "garbage":
        (models / "best.pt").write_bytes(b"not a checkpoint")
    elif best is not None:
        checkpoints.save_checkpoint(dict(step=best), models / "best.pt")
    return models


def test_a_folder_holding_only_best_pt_is_another_runs_and_overwrite_removes_it(tmp_path):
    models = fake_run(tmp_path, [], best=3)
    with pytest.raises(settings.UserError, match="best.pt"):
        run_folder.earlier_run(tmp_path, overwrite=False)
    earlier = run_folder.earlier_run(tmp_path, overwrite=True)
    run_folder.clear_for_fresh_run(tmp_path, settings.resolve_settings({}, "", "smoke"), earlier)
    assert not (models / "best.pt").exists()


@pytest.mark.parametrize("best,moved", [(2, False), (4, True), ("garbage", True)])
def test_resuming_moves_best_pt_aside_only_when_it_is_newer_or_unreadable(tmp_path, best, moved):
    """Resuming step 2 of a run that went on to step 4: best.pt of step 2 stays, of step 4 moves, and
    one that cannot be read counts as newer (it may be)."""
    models = fake_run(tmp_path, [2, 4], best=best)
    run_folder.supersede_newer(tmp_path, 2, 0)
    assert not (models / "checkpoint_00000004.pt").exists() and (models / "checkpoint_00000002.pt").exists()
    assert (models / "best.pt").exists() != moved
    assert bool(list((models / run_folder.SUPERSEDED).rglob("best.pt"))) == moved


@pytest.mark.parametrize("left", ["Models/checkpoint_final.pt", "stats.jsonl", "metrics.jsonl"])
def test_any_checkpoint_file_or_log_makes_a_used_folder(data, tmp_path, capsys, left):
    (tmp_path / left).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / left).write_text("an earlier run's")
    assert_user_error(capsys, train.main(smoke(data, tmp_path, "--max-steps", "1", *QUICK)), left)
    assert (tmp_path / left).read_text() == "an earlier run's"
    assert train.main(smoke(data, tmp_path, "--max-steps", "1", "--overwrite", *QUICK)) == 0
    assert not (tmp_path / left).exists() or left != "Models/checkpoint_final.pt"
