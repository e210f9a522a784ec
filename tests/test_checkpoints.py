"""checkpoints.py: the format (round trip, its version checked), atomic writes that never report what
they did not do, pruning by step, the newest readable checkpoint of a folder, and reads that run
nothing, verify the content checksum, and say in plain words what a file is not."""
import errno
import pickle
import re
import struct
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import QUICK, assert_user_error, smoke

import checkpoints
import evaluate
import generate_images
import settings
import train
from settings import UserError


def sample_state(step=0):
    return dict(model_args=dict(G=dict(z_dim=8, resolution=32), D=dict(channels=(1, 2))), G_ema={}, config={},
                class_names=[], nimg=0, history={}, step=step, weights=torch.arange(6.0).reshape(2, 3),
                nested=dict(a=dict(b=torch.tensor([1, 2, 3]), c=[1.5, "x"])), pair=(0.0, 0.99),
                name="run", flag=True)


def test_checkpoint_round_trip(tmp_path):
    state = sample_state(5)
    path = checkpoints.save_checkpoint(state, checkpoints.checkpoint_path(tmp_path / "Models", 5))
    assert path.name == "checkpoint_00000005.pt"
    loaded, loaded_path = checkpoints.load_checkpoint(path)
    assert loaded_path == path
    assert torch.equal(loaded["weights"], state["weights"])
    assert torch.equal(loaded["nested"]["a"]["b"], state["nested"]["a"]["b"])
    assert loaded["nested"]["a"]["c"] == [1.5, "x"]
    assert loaded["pair"] == (0.0, 0.99) and isinstance(loaded["pair"], tuple)
    assert loaded["model_args"] == state["model_args"]
    assert loaded["name"] == "run" and loaded["flag"] is True and loaded["step"] == 5
    assert list(path.parent.glob("*.tmp")) == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint_00000005.pt"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way must leave the previous file at the same path intact."""
    path = checkpoints.checkpoint_path(tmp_path, 1)
    checkpoints.save_checkpoint(sample_state(1), path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    with pytest.raises(UserError, match="disk full"):
        checkpoints.save_checkpoint(sample_state(2), path)
    monkeypatch.undo()
    loaded, _ = checkpoints.load_checkpoint(path)
    assert loaded["step"] == 1


def test_checkpoint_keep_prunes_oldest(tmp_path):
    models, kept = tmp_path / "Models", []
    for step in (1, 20, 300):
        path = checkpoints.save_checkpoint(sample_state(step), checkpoints.checkpoint_path(models, step))
        kept = checkpoints.prune_checkpoints(kept + [path], 2)
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_00000020.pt", "checkpoint_00000300.pt"]
    other = models / "notes.txt"
    other.write_text("keep me")
    path = checkpoints.save_checkpoint(sample_state(4000), checkpoints.checkpoint_path(models, 4000))
    checkpoints.prune_checkpoints(kept + [path], 1)
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_00004000.pt", "notes.txt"]


def test_checkpoint_keep_zero_keeps_all(tmp_path):
    paths = [checkpoints.save_checkpoint(sample_state(step), checkpoints.checkpoint_path(tmp_path, step))
             for step in range(4)]
    assert checkpoints.prune_checkpoints(paths, 0) == paths
    assert len(checkpoints.list_checkpoints(tmp_path)) == 4


def test_load_checkpoint_folder_picks_newest_by_step(tmp_path):
    for step in (9, 100, 11):  # 100 is newest although "9" sorts after "1" as text without padding
        checkpoints.save_checkpoint(sample_state(step), checkpoints.checkpoint_path(tmp_path, step))
    state, path = checkpoints.load_checkpoint(tmp_path)
    assert state["step"] == 100
    assert path.name == "checkpoint_00000100.pt"


def test_load_checkpoint_errors_name_the_file(tmp_path):
    garbage = tmp_path / "checkpoint_00000001.pt"
    garbage.write_bytes(b"this is not a checkpoint \x00\x01\x02" * 10)
    with pytest.raises(UserError) as e:
        checkpoints.load_checkpoint(garbage)
    assert str(garbage) in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError) as e:  # via the folder too
        checkpoints.load_checkpoint(tmp_path)
    assert str(garbage) in str(e.value)
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError) as e:
        checkpoints.load_checkpoint(missing)
    assert str(missing) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        checkpoints.load_checkpoint(empty)
    assert str(empty) in str(e.value)


class RunsOnLoad:
    """An object whose unpickling creates a file: what a weights-only load must never do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "created"
    torch.save(dict(model_args={}, payload=NotAllowed(), trap=RunsOnLoad(marker)), path)
    with pytest.raises(UserError, match="contains Python objects other than tensors, refused for safety") as e:
        checkpoints.load_checkpoint(path)
    assert str(path) in str(e.value) and not marker.exists()


def test_pruning_orders_by_step_where_names_would_not():
    """Past 8 digits the names no longer sort by step (checkpoint_100000000.pt < checkpoint_99999999.pt)."""
    paths = [checkpoints.checkpoint_path("m", step) for step in (99_999_998, 100_000_000, 99_999_999)]
    assert sorted(p.name for p in paths)[0] == "checkpoint_100000000.pt"
    assert checkpoints.prune_checkpoints(paths, 2) == [paths[2], paths[1]]  # nothing on disk to delete


def test_load_checkpoint_refuses_foreign_state(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(UserError) as e:
        checkpoints.load_checkpoint(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     PermissionError(errno.EACCES, "Permission denied")])
def test_a_failed_save_removes_its_temporary_file_and_names_the_reason(tmp_path, monkeypatch, failure):
    path = checkpoints.checkpoint_path(tmp_path, 1)
    checkpoints.save_checkpoint({"step": 1}, path)

    def failing(obj, f, *a, **k):
        f.write(b"partial")
        raise failure

    monkeypatch.setattr(checkpoints.torch, "save", failing)
    reason = f"cannot write checkpoint {re.escape(str(path))}: {failure.strerror}$"
    with pytest.raises(settings.UserError, match=reason):
        checkpoints.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert checkpoints.read_checkpoint(path) == {"step": 1}


def test_a_checkpoint_path_that_is_a_folder_is_a_one_line_error(tmp_path):
    path = checkpoints.checkpoint_path(tmp_path, 3)
    path.mkdir()
    with pytest.raises(settings.UserError, match=f"cannot write checkpoint {re.escape(str(path))}"):
        checkpoints.save_checkpoint({"step": 3}, path)
    assert list(tmp_path.glob("*.tmp")) == []


def test_concurrent_saves_use_their_own_temporary_files(tmp_path):
    path, errors = checkpoints.checkpoint_path(tmp_path, 1), []

    def save(k):
        try:
            for _ in range(5):
                checkpoints.save_checkpoint({"k": k, "w": torch.full((20000,), float(k))}, path)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["w"], torch.full((20000,), float(state["k"])))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_pruning_keeps_the_newest_of_the_runs_own_checkpoints_by_step(tmp_path):
    paths = [checkpoints.checkpoint_path(tmp_path, s) for s in (99_999_999, 100_000_000, 5)]
    for p in paths:
        checkpoints.save_checkpoint({"step": 1}, p)
    other = tmp_path / "checkpoint_00000001.pt"  # not one of the run's
    checkpoints.save_checkpoint({}, other)
    kept = checkpoints.prune_checkpoints(paths, 2)
    assert [p.name for p in kept] == ["checkpoint_99999999.pt", "checkpoint_100000000.pt"]
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == [other.name] + [p.name for p in kept]
    assert checkpoints.prune_checkpoints(kept, 0) == kept


class Payload:
    """Unpickling it would create a file (pickle calls Path.touch)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_checkpoint_errors_say_what_the_file_is_not(tmp_path, uncond_run, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello world\n")
    no_ema = tmp_path / "no_ema.pt"
    state, _ = checkpoints.load_checkpoint(uncond_run / "Models")
    torch.save({k: v for k, v in state.items() if k != "G_ema"}, no_ema)
    rosinality = tmp_path / "rosinality.pt"
    torch.save({"g": {}, "d": {}, "g_ema": {}, "latent_avg": torch.zeros(4)}, rosinality)
    touched = tmp_path / "touched"
    evil = tmp_path / "evil.pt"
    torch.save({"model_args": {}, "payload": Payload(str(touched))}, evil)
    nvlabs = tmp_path / "network-snapshot.pkl"
    nvlabs.write_bytes(pickle.dumps({"G_ema": Payload(str(touched))}))
    mismatched = tmp_path / "mismatched.pt"
    torch.save(dict(state, G_ema={"mapping.bogus": torch.zeros(1)}), mismatched)
    cases = [(text, "is not a PyTorch checkpoint"), (no_ema, "a checkpoint without G_ema"),
             (rosinality, "python convert.py"), (tmp_path / "list.pt", "not a checkpoint of this toolkit"),
             (evil, "contains Python objects other than tensors, refused for safety"),
             (nvlabs, "refused for safety"), (mismatched, "G_ema does not fit")]
    torch.save([1, 2], tmp_path / "list.pt")
    for main, flag in ((generate_images.main, "--out-dir"), (evaluate.main, "--out")):
        for path, words in cases:
            line = assert_user_error(capsys, main(["--checkpoint", str(path), flag, str(tmp_path / "o")]), words)
            assert "weights_only" not in line
            assert str(path) in line or "G_ema does not fit" in line
    assert not touched.exists()  # nothing in either pickle ran
    code = train.main(["--resume", str(evil), "--out-dir", str(tmp_path / "t")])
    assert_user_error(capsys, code, str(evil), "refused for safety")


def test_a_checkpoint_without_d_is_named_where_d_is_needed(tmp_path, uncond_run, capsys):
    state, _ = checkpoints.load_checkpoint(uncond_run / "Models")
    no_d = tmp_path / "no_d.pt"
    torch.save({k: v for k, v in state.items() if k != "D"}, no_d)
    assert generate_images.main(["--checkpoint", str(no_d), "--out-dir", str(tmp_path / "s"), "--n", "1"]) == 0
    code = generate_images.main(["--checkpoint", str(no_d), "--mode", "project", "--target", "x.png",
                                 "--out-dir", str(tmp_path / "p")])
    assert_user_error(capsys, code, str(no_d), "without D")
    code = train.main(["--resume", str(no_d), "--out-dir", str(tmp_path / "t")])
    assert_user_error(capsys, code, str(no_d), "without")


class NotAllowed:
    """An arbitrary Python object: a weights_only load must refuse it."""

    def __init__(self):
        self.x = 1


def test_a_checkpoint_of_a_newer_format_is_refused_and_one_without_a_version_reads(tmp_path):
    state = sample_state(3)
    newer = checkpoints.save_checkpoint(dict(state, version=checkpoints.VERSION + 1), tmp_path / "newer.pt")
    with pytest.raises(settings.UserError, match=f"format {checkpoints.VERSION + 1}, newer than"):
        checkpoints.load_checkpoint(newer, need=())
    unversioned = {k: v for k, v in state.items() if k != "version"}
    path = checkpoints.save_checkpoint(unversioned, tmp_path / "old.pt")
    assert checkpoints.load_checkpoint(path, need=())[0]["step"] == 3


def test_training_and_converted_networks_share_one_format():
    """make_checkpoint builds both: the keys generate_images.py needs, and the version."""
    cfg = settings.resolve_settings({}, "", "smoke")
    state = checkpoints.make_checkpoint(cfg, {"G": {}}, ["AD"], {"G_ema": {}}, {"loss_gen": torch.zeros(0)},
                                        source="x")
    assert set(checkpoints.CHECKPOINT_KEYS) <= set(state) and state["version"] == checkpoints.VERSION
    assert state["config"]["resolution"] == 32 and state["source"] == "x"


def flip_tensor_bytes(path, count=400):
    """XOR `count` bytes in the middle of the largest stored tensor: damage torch.load does not notice."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - count // 2
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def test_a_checkpoint_carries_a_checksum_of_its_contents_and_damage_is_named(tmp_path):
    state = dict(sample_state(3), big=torch.arange(4096.0))
    path = checkpoints.save_checkpoint(state, tmp_path / "c.pt")
    loaded = checkpoints.read_checkpoint(path)
    assert checkpoints.CHECKSUM not in loaded and torch.equal(loaded["big"], state["big"])
    assert torch.load(path, weights_only=True)[checkpoints.CHECKSUM] == checkpoints.content_checksum(state)
    flip_tensor_bytes(path)
    torch.load(path, weights_only=True)  # PyTorch reads the damaged file without a word
    with pytest.raises(UserError, match=f"{re.escape(str(path))} is damaged"):
        checkpoints.read_checkpoint(path)


def test_resume_passes_over_a_damaged_newest_checkpoint_and_moves_it_aside(data, tmp_path, capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "8", *QUICK)) == 0  # checkpoints at 6 and 8
    newest = tmp_path / "Models" / "checkpoint_00000008.pt"
    flip_tensor_bytes(newest)
    capsys.readouterr()
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "8"]) == 0
    err = capsys.readouterr().err
    assert f"passing over an unreadable newer checkpoint: {newest} is damaged" in err
    assert list((tmp_path / "Models" / "superseded").rglob("checkpoint_00000008.pt"))
    assert checkpoints.read_checkpoint(newest)["step"] == 8  # written again, whole, from step 6
