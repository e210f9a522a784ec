"""stop_signal.py: SIGINT/SIGTERM save a checkpoint after the iteration and resume continues;
SIGTERM before training writes nothing; a checkpoint being written is finished first."""
import os
import signal
import time

import pytest
from conftest import QUICK, smoke, steps_of

import checkpoints
import dataset
import train
import training


def test_sigterm_while_loading_data_exits_143_and_writes_nothing(data, tmp_path, monkeypatch, capsys):
    real = dataset.load_image_and_kind

    def load_then_terminate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset, "load_image_and_kind", load_then_terminate)
    code = train.main(smoke(data, tmp_path, *QUICK))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "loading images" not in line]
    assert code == 128 + signal.SIGTERM
    assert err == ["SIGTERM before training started: stopped, no checkpoint written"]
    assert list(tmp_path.iterdir()) == []  # not even the Models/ folder its lock was in
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_sigterm_during_a_checkpoint_write_lets_it_finish(data, tmp_path, monkeypatch):
    """SIGTERM, twice, while the epoch's checkpoint is being written: it completes, then the run exits
    143 with it as its newest checkpoint."""
    real_save = checkpoints.torch.save

    def save_under_signals(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save_under_signals)
    assert train.main(smoke(data, tmp_path, "--epochs", "5", *QUICK)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert steps_of(tmp_path / "Models") == [6, 7]  # the epoch's checkpoint, then the stop's, one iteration on
    assert checkpoints.load_checkpoint(tmp_path / "Models")[0]["step"] == 7


@pytest.mark.determinism
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
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "Models")] == ["checkpoint_00000002.pt"]
    monkeypatch.setattr(training, "ema_update", real_ema_update)
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "4"]) == 0
    state, _ = checkpoints.load_checkpoint(tmp_path / "Models")
    assert state["step"] == 4 and len(state["history"]["loss_gen"]) == 4
