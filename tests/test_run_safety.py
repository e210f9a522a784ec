"""Run safety: one run per output folder (refusal, --overwrite, a lock against concurrent runs), saves
that never report what they did not do (full disk), resume from the newest readable checkpoint or a
named one (exactly), finite and in-range settings at the command line, checkpoint errors in plain
words, and SIGTERM, once or repeated, exiting 143 with a complete checkpoint."""
import ast
import errno
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, smoke, write_images

import bench
import constants
import dataset
import evaluate
import generate_images
import train
import utils

REPO = Path(__file__).resolve().parents[1]
QUICK = ("--eval-every", "0", "--device", "cpu")


def steps_of(models):
    return [utils.checkpoint_step(p) for p in utils.list_checkpoints(models)]


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
    return utils.load_checkpoint(out / "Models")[0]


# ---------------------------------------------------------------------------------------
# One run owns its output folder
# ---------------------------------------------------------------------------------------
def test_a_second_fresh_run_into_the_same_folder_is_refused_and_overwrite_starts_over(data, tmp_path, capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "8", *QUICK)) == 0
    first = (tmp_path / "Models" / "checkpoint_00000008.pt").read_bytes()
    capsys.readouterr()
    code = train.main(smoke(data, tmp_path, "--max-steps", "8", "--seed", "5", *QUICK))
    line = assert_user_error(capsys, code, str(tmp_path / "Models"), "--resume", "--out-dir", "--overwrite")
    assert "checkpoint_00000008.pt" in line
    assert (tmp_path / "Models" / "checkpoint_00000008.pt").read_bytes() == first  # untouched
    assert json.loads((tmp_path / "saved_examples" / "32x32" / "config.json").read_text())["seed"] == 0

    assert train.main(smoke(data, tmp_path, "--max-steps", "3", "--seed", "5", "--overwrite", *QUICK)) == 0
    assert "--overwrite: deleted" in capsys.readouterr().err
    assert steps_of(tmp_path / "Models") == [3]  # the first run's 6 and 8 are gone, not mixed in
    assert not (tmp_path / "saved_examples" / "32x32" / "epoch_0001.png").exists()
    state, _ = utils.load_checkpoint(tmp_path / "Models")
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
        assert (out / "Models" / utils.LOCK_FILE).read_text().split() == [str(proc.pid), socket.gethostname()]
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
    state, _ = utils.load_checkpoint(out / "Models")
    assert state["step"] >= 1
    assert not (out / "Models" / utils.LOCK_FILE).exists()  # released
    assert list((out / "Models").glob("*.tmp")) == []


def test_a_lock_left_by_a_dead_process_is_taken_over(data, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "Models" / utils.LOCK_FILE
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert train.main(smoke(data, tmp_path, "--max-steps", "1", *QUICK)) == 0
    err = capsys.readouterr().err
    assert f"taking over {lock}, left by PID {dead.pid}" in err
    assert not lock.exists() and steps_of(tmp_path / "Models") == [1]


def test_the_pid_decides_where_the_file_system_has_no_flock(tmp_path, monkeypatch):
    """Without flock (some NFS and Lustre mounts), a lock naming a live process on this host holds."""
    monkeypatch.setattr(utils, "_try_flock", lambda fd: None)
    lock = tmp_path / utils.LOCK_FILE
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")  # alive: pytest's parent
    with pytest.raises(utils.UserError, match=f"PID {os.getppid()}"):
        with utils.RunLock(tmp_path):
            pass
    lock.write_text(f"{os.getppid()} some-other-node\n")  # unknown: held
    with pytest.raises(utils.UserError, match="some-other-node"):
        with utils.RunLock(tmp_path):
            pass
    lock.write_text("")
    with utils.RunLock(tmp_path):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


def test_flock_refuses_a_second_holder(tmp_path):
    with utils.RunLock(tmp_path):
        with pytest.raises(utils.UserError, match=f"PID {os.getpid()}"):
            with utils.RunLock(tmp_path):
                pass


def test_resume_path_from_another_folder_needs_an_empty_one(data, tmp_path, capsys):
    assert train.main(smoke(data, tmp_path / "a", "--max-steps", "2", *QUICK)) == 0
    assert train.main(smoke(data, tmp_path / "b", "--max-steps", "1", *QUICK)) == 0
    capsys.readouterr()
    source = tmp_path / "a" / "Models" / "checkpoint_00000002.pt"
    code = train.main(["--resume", str(source), "--out-dir", str(tmp_path / "b"), "--max-steps", "3"])
    assert_user_error(capsys, code, str(tmp_path / "b" / "Models"), "--out-dir")
    assert train.main(["--resume", str(source), "--out-dir", str(tmp_path / "c"), "--max-steps", "3"]) == 0
    assert steps_of(tmp_path / "c" / "Models") == [3] and steps_of(tmp_path / "a" / "Models") == [2]
    code = train.main(["--resume", str(tmp_path / "a" / "Models")])
    assert_user_error(capsys, code, "--resume", "is a folder")


# ---------------------------------------------------------------------------------------
# Saving never reports what it did not do
# ---------------------------------------------------------------------------------------
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
    monkeypatch.setattr(utils.torch, "save", full_disk_save)
    capsys.readouterr()
    code = train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "12"])
    assert_user_error(capsys, code, str(tmp_path / "Models" / "checkpoint_00000012.pt"), "No space left on device")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "Models").iterdir()) == ["checkpoint_00000006.pt"]  # no .tmp, no lock
    assert (tmp_path / "Models" / "checkpoint_00000006.pt").read_bytes() == before
    assert utils.load_checkpoint(tmp_path / "Models")[0]["step"] == 6


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     PermissionError(errno.EACCES, "Permission denied")])
def test_a_failed_save_removes_its_temporary_file_and_names_the_reason(tmp_path, monkeypatch, failure):
    path = utils.checkpoint_path(tmp_path, 1)
    utils.save_checkpoint({"step": 1}, path)

    def failing(obj, f, *a, **k):
        f.write(b"partial")
        raise failure

    monkeypatch.setattr(utils.torch, "save", failing)
    with pytest.raises(utils.UserError, match=f"cannot write checkpoint {re.escape(str(path))}: {failure.strerror}$"):
        utils.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_a_checkpoint_path_that_is_a_folder_is_a_one_line_error(tmp_path):
    path = utils.checkpoint_path(tmp_path, 3)
    path.mkdir()
    with pytest.raises(utils.UserError, match=f"cannot write checkpoint {re.escape(str(path))}"):
        utils.save_checkpoint({"step": 3}, path)
    assert list(tmp_path.glob("*.tmp")) == []


def test_concurrent_saves_use_their_own_temporary_files(tmp_path):
    path, errors = utils.checkpoint_path(tmp_path, 1), []

    def save(k):
        try:
            for _ in range(5):
                utils.save_checkpoint({"k": k, "w": torch.full((20000,), float(k))}, path)
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
    paths = [utils.checkpoint_path(tmp_path, s) for s in (99_999_999, 100_000_000, 5)]
    for p in paths:
        utils.save_checkpoint({"step": 1}, p)
    other = tmp_path / "checkpoint_00000001.pt"  # not one of the run's
    utils.save_checkpoint({}, other)
    kept = utils.prune_checkpoints(paths, 2)
    assert [p.name for p in kept] == ["checkpoint_99999999.pt", "checkpoint_100000000.pt"]
    assert [p.name for p in utils.list_checkpoints(tmp_path)] == [other.name] + [p.name for p in kept]
    assert utils.prune_checkpoints(kept, 0) == kept


def test_training_prunes_only_its_own_checkpoints(data, tmp_path):
    """--keep-checkpoints 1 after resuming an older checkpoint: the superseded later branch is kept
    aside, never pruned, and never taken for this run's."""
    assert train.main(smoke(data, tmp_path, "--max-steps", "8", "--keep-checkpoints", "0", *QUICK)) == 0
    assert steps_of(tmp_path / "Models") == [6, 8]
    older = tmp_path / "Models" / "checkpoint_00000006.pt"
    assert train.main(["--resume", str(older), "--max-steps", "7", "--keep-checkpoints", "1"]) == 0
    assert steps_of(tmp_path / "Models") == [7]
    aside = list((tmp_path / "Models" / utils.SUPERSEDED).glob("*/checkpoint_*.pt"))
    assert [p.name for p in aside] == ["checkpoint_00000008.pt"]


# ---------------------------------------------------------------------------------------
# Resume is robust, and exact
# ---------------------------------------------------------------------------------------
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
    state, _ = utils.load_checkpoint(tmp_path / "Models")
    assert state["step"] == 7 and steps_of(tmp_path / "Models") == [3, 6, 7]
    assert_same_weights(state, straight)


def test_resume_from_a_named_older_checkpoint_is_exact_and_moves_the_later_ones_aside(data, tmp_path, straight,
                                                                                   capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "3", *QUICK)) == 0
    assert train.main(["--resume", "--out-dir", str(tmp_path), "--max-steps", "5", "--seed", "9"]) == 0
    assert steps_of(tmp_path / "Models") == [3, 5]
    capsys.readouterr()
    older = tmp_path / "Models" / "checkpoint_00000003.pt"
    assert train.main(["--resume", str(older), "--max-steps", "7"]) == 0  # OUT_DIR: the folder above Models/
    assert "moved 1 checkpoint(s) newer than step 3" in capsys.readouterr().err
    state, _ = utils.load_checkpoint(tmp_path / "Models")
    assert steps_of(tmp_path / "Models") == [3, 6, 7]
    assert_same_weights(state, straight)


def test_resume_with_no_readable_checkpoint_is_one_line(data, tmp_path, capsys):
    models = tmp_path / "Models"
    models.mkdir()
    (models / "checkpoint_00000002.pt").write_bytes(b"")
    (models / "checkpoint_00000001.pt").write_text("hello")
    code = train.main(["--resume", "--out-dir", str(tmp_path)])
    assert_user_error(capsys, code, "no readable checkpoint", "checkpoint_00000002.pt is empty", "1 older")


# ---------------------------------------------------------------------------------------
# Every setting is finite and in range at the edge
# ---------------------------------------------------------------------------------------
SCRIPTS = {"train": (train.main, ""), "generate_images": (generate_images.main, "GEN_"),
           "evaluate": (evaluate.main, "EVALUATE_"), "bench": (bench.main, "")}


def float_settings(prefix):
    return [n for n in utils.setting_names(prefix) if isinstance(getattr(constants, n), float)]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_float_setting_refuses_nan_and_infinity(script, capsys):
    main, prefix = SCRIPTS[script]
    names = float_settings(prefix)
    assert names
    for name in names:
        for bad in ("nan", "inf", "-inf"):
            line = assert_user_error(capsys, main([f"{utils.flag_of(name)}={bad}"]), utils.flag_of(name))
            assert "finite" in line, line
    tuples = [n for n in utils.setting_names(prefix) if isinstance(getattr(constants, n), tuple)]
    for name in tuples:
        assert_user_error(capsys, main([utils.flag_of(name), "0.1,nan"]), utils.flag_of(name))


@pytest.mark.parametrize("main,argv,flag", [
    (train.main, ["--seed", str(2**64)], "--seed"),
    (train.main, ["--max-steps", "99999999999999999999"], "--max-steps"),
    (bench.main, ["--seed", str(2**63)], "--seed"),
    (evaluate.main, ["--seed", str(2**63)], "--seed"),
    (generate_images.main, ["--truncation", "1e308"], "--truncation"),
    (evaluate.main, ["--truncation", "1e308"], "--truncation"),
])
def test_integers_and_truncation_beyond_what_their_use_holds(capsys, main, argv, flag):
    assert_user_error(capsys, main(argv), flag)


@pytest.mark.parametrize("argv,flag", [
    (["--seeds", "99999999999999999999"], "--seeds"),
    (["--seeds", "1,-2"], "--seeds"),
    (["--mix-seeds", str(2**63), "--mode", "mixing"], "--mix-seeds"),
    (["--psis", "1,nan", "--mode", "truncation"], "--psis"),
    (["--psis", "1e308", "--mode", "truncation"], "--psis"),
])
def test_generate_number_lists_are_finite_and_in_range(capsys, uncond_run, tmp_path, argv, flag):
    code = generate_images.main(["--checkpoint", str(uncond_run / "Models"), "--out-dir", str(tmp_path), *argv])
    assert_user_error(capsys, code, flag)
    assert list(tmp_path.iterdir()) == []


def test_ema_kimg_nan_never_trains(data, tmp_path, capsys):
    assert_user_error(capsys, train.main(smoke(data, tmp_path, "--ema-kimg", "nan")), "--ema-kimg", "finite")
    assert not (tmp_path / "Models").exists()


def test_data_splits_must_name_an_existing_split(data, tmp_path, capsys):
    assert_user_error(capsys, train.main(smoke(data, tmp_path, "--data-splits", "")), "--data-splits")
    assert_user_error(capsys, train.main(smoke(data, tmp_path, "--data-splits", " , ")), "--data-splits")
    code = train.main(smoke(data, tmp_path, "--data-splits", "tset", *QUICK))
    assert_user_error(capsys, code, str(data / "tset"), "--data-splits")
    with pytest.raises(utils.UserError, match="--data-splits"):
        dataset.find_images(data, [])


def test_out_dir_on_a_file_is_refused_before_any_work(data, tmp_path, uncond_run, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code = train.main(smoke(data, afile, "--max-steps", "1"))
    assert_user_error(capsys, code, "--out-dir", str(afile))
    code = train.main(smoke(data, afile / "sub", "--max-steps", "1"))
    assert_user_error(capsys, code, "--out-dir", "is a file")
    code = generate_images.main(["--checkpoint", str(uncond_run / "Models"), "--out-dir", str(afile)])
    assert_user_error(capsys, code, "--out-dir", str(afile))
    code = evaluate.main(["--checkpoint", str(uncond_run / "Models"), "--out", str(afile / "x.json")])
    assert_user_error(capsys, code, "--out", "is a file")  # before the evaluation, not after it
    code = evaluate.main(["--checkpoint", str(uncond_run / "Models"), "--out", str(tmp_path)])
    assert_user_error(capsys, code, "--out", "is a folder")
    assert afile.read_text() == "x"


# ---------------------------------------------------------------------------------------
# Messages name real flags, and checkpoint errors say what the file is not
# ---------------------------------------------------------------------------------------
TOKENS = re.compile(r"\b(train|generate_images|evaluate|bench)\.py\b|\b(torchrun)\b|(?<![\w-])(--[a-z][a-z0-9-]*)")


def accepted_flags(script):
    prefix = SCRIPTS[script][1]
    extra = {"train": train.EXTRA_FLAGS, "bench": bench.EXTRA_FLAGS}.get(script, ())
    return set(utils.build_parser(prefix, "", extra)._option_string_actions)


def suggested_flags(text, script):
    """[(script, flag)] of a message: a flag belongs to the script named before it in its clause
    (`python train.py --preset demo`, `train.py's --data-splits`), else to the script that spoke;
    torchrun's flags are left out."""
    found = []
    for clause in re.split(r"[();]", text):
        owner = script
        for m in TOKENS.finditer(clause):
            if m[3] is None:
                owner = m[1] or m[2]
            elif owner != "torchrun":
                found.append((owner, m[3]))
    return found


def test_the_suggestion_parser_reads_clauses():
    text = "data folder not found: x (set --data-root, or try: python train.py --preset demo); train with --n"
    assert suggested_flags(text, "evaluate") == [("evaluate", "--data-root"), ("train", "--preset"),
                                                 ("evaluate", "--n")]
    assert suggested_flags("(lower torchrun's --nproc_per_node)", "train") == []


def test_every_flag_a_script_mentions_is_one_it_accepts():
    """Each script's own messages (every string in its source), by the rule of suggested_flags."""
    for script in SCRIPTS:
        for message in messages_in(REPO / f"{script}.py"):
            for owner, flag in suggested_flags(message, script):
                assert flag in accepted_flags(owner), (script, message)


def messages_in(path):
    """The text of each UserError, print and warning call in a source file, with `flag_of('NAME')`
    rendered as the flag and other interpolations as {}."""
    def text(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(text(v) for v in node.values)
        if isinstance(node, ast.FormattedValue):
            call = node.value
            if (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "flag_of"
                    and isinstance(call.args[0], ast.Constant)):
                return utils.flag_of(call.args[0].value)
            return "{}"
        if isinstance(node, ast.BinOp):
            return text(node.left) + text(node.right)
        return ""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("UserError", "print", "warn"):
            yield " ".join(text(a) for a in node.args)


def test_errors_from_shared_code_suggest_flags_of_the_script_that_raised_them(tmp_path, uncond_run, capsys):
    """The data and checkpoint errors every script can meet, raised through each script."""
    bad = tmp_path / "bad"
    write_images(bad / "AD", 3)
    write_images(bad / "NC", 3)
    (bad / "NC" / "broken.png").write_bytes(b"not a png")
    missing = tmp_path / "missing"
    checkpoint = str(uncond_run / "Models")
    runs = {
        "train": [["--preset", "smoke", "--data-root", str(root), "--out-dir", str(tmp_path / f"o{i}")]
                  for i, root in enumerate((bad, missing))] + [["--resume", "--out-dir", str(missing)]],
        "evaluate": [["--checkpoint", checkpoint, "--data-root", str(root), "--out", str(tmp_path / "e.json")]
                     for root in (bad, missing)] + [["--checkpoint", str(missing)]],
        "generate_images": [["--checkpoint", checkpoint, "--mode", "tsne", "--data-root", str(root),
                             "--out-dir", str(tmp_path / "g")] for root in (bad, missing)],
    }
    mentioned = set()
    for script, argvs in runs.items():
        for argv in argvs:
            line = assert_user_error(capsys, SCRIPTS[script][0](argv))
            for owner, flag in suggested_flags(line, script):
                assert flag in accepted_flags(owner), (script, line)
                mentioned.add(flag)
    assert {"--skip-bad-images", "--data-root", "--preset", "--out-dir"} <= mentioned


def test_skip_bad_images_works_where_it_is_suggested(tmp_path, uncond_run, capsys):
    bad = tmp_path / "bad"
    write_images(bad, 10)
    (bad / "broken.png").write_bytes(b"not a png")
    code = evaluate.main(["--checkpoint", str(uncond_run / "Models"), "--data-root", str(bad), "--n", "8",
                          "--out", str(tmp_path / "e.json"), "--skip-bad-images"])
    assert code == 0, capsys.readouterr().err
    code = generate_images.main(["--checkpoint", str(uncond_run / "Models"), "--mode", "tsne", "--data-root",
                                 str(bad), "--skip-bad-images", "--tsne-n", "10", "--tsne-real", "2",
                                 "--project-steps", "2", "--out-dir", str(tmp_path / "g")])
    assert code == 0, capsys.readouterr().err


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
    state, _ = utils.load_checkpoint(uncond_run / "Models")
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
    state, _ = utils.load_checkpoint(uncond_run / "Models")
    no_d = tmp_path / "no_d.pt"
    torch.save({k: v for k, v in state.items() if k != "D"}, no_d)
    assert generate_images.main(["--checkpoint", str(no_d), "--out-dir", str(tmp_path / "s"), "--n", "1"]) == 0
    code = generate_images.main(["--checkpoint", str(no_d), "--mode", "project", "--target", "x.png",
                                 "--out-dir", str(tmp_path / "p")])
    assert_user_error(capsys, code, str(no_d), "without D")
    code = train.main(["--resume", str(no_d), "--out-dir", str(tmp_path / "t")])
    assert_user_error(capsys, code, str(no_d), "without")


# ---------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------
def test_sigterm_while_loading_data_exits_143_and_writes_nothing(data, tmp_path, monkeypatch, capsys):
    real = dataset.load_image

    def load_then_terminate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset, "load_image", load_then_terminate)
    code = train.main(smoke(data, tmp_path, *QUICK))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "loading images" not in line]
    assert code == 128 + signal.SIGTERM
    assert err == ["SIGTERM before training started: stopped, no checkpoint written"]
    assert list(tmp_path.iterdir()) == []  # not even the Models/ folder its lock was in
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_sigterm_during_a_checkpoint_write_lets_it_finish(data, tmp_path, monkeypatch):
    """SIGTERM, twice, while the epoch's checkpoint is being written: it completes, then the run exits
    143 with it as its newest checkpoint."""
    real_save = utils.torch.save

    def save_under_signals(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(utils.torch, "save", save_under_signals)
    assert train.main(smoke(data, tmp_path, "--epochs", "5", *QUICK)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert steps_of(tmp_path / "Models") == [6, 7]  # the epoch's checkpoint, then the stop's, one iteration on
    assert utils.load_checkpoint(tmp_path / "Models")[0]["step"] == 7


def test_a_flat_folder_with_a_link_to_itself_is_flat(tmp_path):
    write_images(tmp_path / "flat", 3)
    (tmp_path / "flat" / "self").symlink_to(".", target_is_directory=True)
    (tmp_path / "flat" / "up").symlink_to("..", target_is_directory=True)
    files, labels, names = dataset.find_images(tmp_path / "flat")
    assert len(files) == 3 and names == []


def test_a_full_disk_while_writing_a_sample_grid_is_one_line(data, tmp_path, monkeypatch, capsys):
    def full(images, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(train, "save_grid", full)
    code = train.main(smoke(data, tmp_path, "--max-steps", "2", *QUICK))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1, err
    assert "reals.png" in err[0] and "No space left on device" in err[0]
    assert not (tmp_path / "Models" / utils.LOCK_FILE).exists()
