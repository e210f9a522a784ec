"""A training run's folder, OUT_DIR: one run per folder, held by a lock while it writes; a fresh
run refuses another run's checkpoints (or deletes them with --overwrite); a resumed run picks its
checkpoint and moves what was written after it to Models/superseded/, never deleting it."""
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import constants
from checkpoints import (
    BEST_CHECKPOINT,
    TRAINING_KEYS,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
)
from settings import UserError
from utils import append_jsonl, read_jsonl

LOCK_FILE = "train.lock"  # in OUT_DIR/Models while a train.py run writes there
SUPERSEDED = "superseded"  # Models/superseded/<time>/: what a run wrote after the checkpoint it resumed from
RUN_OUTPUTS = ("epoch_*.png", "step_*.png", "fakes_*.png", "reals.png", "losses.png", "metrics.json", "metrics.png",
               "memorisation.png", "config.json")  # in OUT_DIR/saved_examples/<R>x<R>
LOGS = ("stats.jsonl", "metrics.jsonl")  # in OUT_DIR: a line per tick, a line per evaluation


def out_dir(given, opts):
    """OUT_DIR: --out-dir, the preset's, or for --resume PATH the folder whose Models/ holds PATH."""
    preset_dir = constants.PRESETS.get(getattr(opts, "preset", None), {}).get("OUT_DIR")
    resume = getattr(opts, "resume", None)
    if "OUT_DIR" in given or preset_dir:
        return Path(given.get("OUT_DIR", preset_dir))
    if isinstance(resume, str) and Path(resume).parent.name == "Models":
        return Path(resume).parent.parent
    return Path(constants.OUT_DIR)


def remove_temporary(models):
    """Unfinished temporary files of a run that was killed while writing a checkpoint."""
    for tmp in Path(models).glob("*.tmp"):
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# A fresh run
# ---------------------------------------------------------------------------------------
def earlier_run(out, overwrite):
    """What another run left in OUT_DIR (run_files): a UserError unless --overwrite."""
    earlier = run_files(out)
    if earlier and not overwrite:
        checkpoints = [p for p in earlier if p.suffix == ".pt"]
        named = (checkpoints or earlier)[-1 if checkpoints else 0]  # the newest checkpoint, else the first log
        more = f" and {len(earlier) - 1} more" if len(earlier) > 1 else ""
        raise UserError(f"{out} holds another run's checkpoints or logs ({named.relative_to(out)}{more}): continue "
                        "that run with --resume, or start this one with another --out-dir (or --overwrite to "
                        "delete them)")
    return earlier


def clear_for_fresh_run(out, cfg, earlier):
    """--overwrite: delete what an earlier run left."""
    if earlier:
        remove_run(out, cfg)


def run_files(out):
    """The files that make OUT_DIR a used folder: every checkpoint file in Models/ (checkpoint_*.pt by
    step, any other *.pt, best.pt last) and the run's logs."""
    models = Path(out) / "Models"
    others = sorted(p for p in models.glob("*.pt") if checkpoint_step(p) is None and p.name != BEST_CHECKPOINT)
    best = [models / BEST_CHECKPOINT] if (models / BEST_CHECKPOINT).is_file() else []
    logs = [Path(out) / name for name in LOGS if (Path(out) / name).is_file()]
    return list_checkpoints(models) + [p for p in others if p.is_file()] + best + logs


def samples_folder(out, resolution):
    """OUT_DIR/saved_examples/<R>x<R>: a run's sample grids, plots and metrics at that resolution."""
    return Path(out) / "saved_examples" / f"{resolution}x{resolution}"


def last_grid_name(step):
    """The sample grid a run draws when it has trained its length (step_NNNNNNNN.png)."""
    return f"step_{step:08d}.png"


def remove_run(out, cfg):
    """--overwrite: delete the earlier run's checkpoints (superseded ones too), its logs, and the
    sample grids, plots and metrics train.py wrote at this resolution."""
    models, samples = out / "Models", samples_folder(out, cfg.resolution)
    doomed = run_files(out) + [p for pattern in RUN_OUTPUTS for p in samples.glob(pattern)]
    for p in doomed:
        p.unlink(missing_ok=True)
    shutil.rmtree(models / SUPERSEDED, ignore_errors=True)
    print(f"--overwrite: deleted {len(doomed)} files of the earlier run in {out}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# A resumed run
# ---------------------------------------------------------------------------------------
def resume_checkpoint(models, resume):
    """(state, path) to resume from: --resume PATH, or the newest readable checkpoint in Models/."""
    if resume is True:
        if not list_checkpoints(models):
            raise UserError(f"--resume: no checkpoint in {models} (set --out-dir to the run's folder)")
        return load_checkpoint(models, TRAINING_KEYS)
    path = Path(resume)
    if path.is_dir():
        raise UserError(f"--resume {path} is a folder: give a checkpoint file, or use --resume --out-dir FOLDER "
                        "for the newest checkpoint of the run in FOLDER")
    state, path = load_checkpoint(path, TRAINING_KEYS)
    if path.resolve().parent != models.resolve() and run_files(models.parent):
        raise UserError(f"{models.parent} holds another run's checkpoints or logs: resume {path} with another "
                        "--out-dir")
    return state, path


def supersede_newer(out, step, nimg):
    """Move what the run wrote after the checkpoint it resumes from to Models/superseded/<time>/: the
    checkpoints newer than `step` (unreadable ones passed over, or the later branch when resuming an
    older checkpoint, best.pt included), and the logs, whose lines up to `nimg` images stay in OUT_DIR.
    The run never mixes them with its own, and nothing is deleted."""
    models = out / "Models"
    newer = [p for p in list_checkpoints(models) if checkpoint_step(p) > step]
    best = models / BEST_CHECKPOINT
    if newer and best.is_file() and best_step(best) > step:
        newer.append(best)
    logs = {out / name: read_jsonl(out / name) for name in LOGS if (out / name).is_file()}
    logs = {path: lines for path, lines in logs.items() if any(line.get("nimg", 0) > nimg for line in lines)}
    if not newer and not logs:
        return
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    while (folder := models / SUPERSEDED / (stamp + (f"-{n}" if n else ""))).exists():
        n += 1
    folder.mkdir(parents=True)
    for p in newer + list(logs):
        os.replace(p, folder / p.name)
    for path, lines in logs.items():
        for line in lines:
            if line.get("nimg", 0) <= nimg:
                append_jsonl(line, path)
    print(f"moved {len(newer)} checkpoint(s) newer than step {step}" + (" and the later lines of "
          + ", ".join(p.name for p in logs) if logs else "") + f" to {folder}", file=sys.stderr)


def best_step(path):
    """The step of best.pt (one that cannot be read counts as newer than any)."""
    try:
        return read_checkpoint(path)["step"]
    except (UserError, KeyError, TypeError):
        return math.inf


# ---------------------------------------------------------------------------------------
# The lock: one run writes to a folder at a time
# ---------------------------------------------------------------------------------------
class RunLock:
    """One train.py run writes to OUT_DIR/Models at a time. The lock is the kernel's flock on the
    Models/ folder itself (released when its process ends, however it ends), so deleting a file
    cannot let a second run in; Models/train.lock records the holder (PID and host) for the
    messages. Where the file system has no flock (some NFS and Lustre mounts) the recorded PID
    decides, checked on this host; a lock from another host is taken as held."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd, self.created = None, False

    def __enter__(self):
        try:
            self.created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {self.folder} ({e.strerror})") from None
        try:
            self.fd = os.open(self.folder, os.O_RDONLY)
        except OSError:  # a folder cannot be opened (Windows): the recorded PID decides
            self.fd = None
        held, owner = (_try_flock(self.fd) if self.fd is not None else None), self.recorded()
        if held is False or (held is None and _owner_alive(owner)):
            self.release()
            pid, host = (owner + ["?", "?"])[:2]
            who = f"PID {pid} on {host}" if owner else "its PID not recorded"
            raise UserError(f"another training run ({who}) is writing to {self.folder}: let it finish, or use "
                            "another --out-dir" + ("" if held is False else f" (if no run is writing there, "
                                                                            f"delete {self.path})"))
        if owner and owner[0] != str(os.getpid()):
            pid, host = (owner + ["?"])[:2]
            why = "no process holds the folder's lock" if held else "that process is no longer running on this host"
            print(f"taking over {self.path}, left by PID {pid} on {host}: {why}", file=sys.stderr)
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        os.replace(tmp, self.path)
        return self

    def recorded(self):
        """[PID, host] from the lock file, [] when there is none."""
        try:
            return self.path.read_text(errors="replace").split()[:2]
        except OSError:
            return []

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __exit__(self, *exc):
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.release()
        if self.created and not any(self.folder.iterdir()):  # a run that stopped before writing
            self.folder.rmdir()


def _try_flock(fd):
    """True: this process now holds the flock of `fd`; False: another process does; None: no flock here."""
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    except (ImportError, OSError):  # Windows, or a file system without flock (some NFS, Lustre mounts)
        return None
    return True


def _owner_alive(owner):
    """Whether the process recorded in a lock file (["PID", "HOST"]) may still run: unknown hosts and
    systems count as alive."""
    if len(owner) < 2 or not owner[0].isdigit():
        return False
    if owner[1] != socket.gethostname() or os.name != "posix":
        return True
    try:
        os.kill(int(owner[0]), 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but another user's
        return True
    return True
