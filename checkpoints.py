"""Checkpoints: the one format (built here for training runs and for networks converted from
elsewhere, its version checked on reading), atomic writes, safe reads (weights_only: nothing in a
file runs), the newest readable checkpoint of a folder, pruning, and the networks of a checkpoint."""
import hashlib
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path

import torch

from modules import Discriminator, Generator, growth_level
from settings import UserError, checkpoint_settings, config_dict

VERSION = 1  # of the format: a checkpoint of a newer one is refused with a message, not misread
CHECKPOINT_GLOB = "checkpoint_*.pt"
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)\.pt")
BEST_CHECKPOINT = "best.pt"
CHECKPOINT_KEYS = ("G_ema", "model_args", "config", "class_names", "step", "nimg", "history")  # to generate
CHECKSUM = "checksum"  # the key of the content checksum in a checkpoint file
TRAINING_KEYS = CHECKPOINT_KEYS + ("G", "D", "opt_G", "opt_D", "epoch", "epoch_nimg", "pl_mean", "rng")  # to resume


def make_checkpoint(cfg, model_args, class_names, states, history, step=0, epoch=0, nimg=0, metrics=(), **extra):
    """The checkpoint dict: settings, the networks' constructor arguments and `states` (G_ema; G, D
    and the optimisers' when there are), the position in training, the loss `history` ({key: tensor})
    and evaluations; `extra` holds what only a training run has (RNG states, ...) or a converted
    network's source."""
    return dict(version=VERSION, config=config_dict(cfg), model_args=model_args, class_names=list(class_names),
                **states, step=step, epoch=epoch, nimg=nimg, history=history, metrics=list(metrics), **extra)


# ---------------------------------------------------------------------------------------
# A run's checkpoint files: names, atomic writes, pruning
# ---------------------------------------------------------------------------------------
def checkpoint_path(models_dir, step):
    return Path(models_dir) / f"checkpoint_{step:08d}.pt"


def checkpoint_step(path):
    """The step in a checkpoint's file name (checkpoint_00000120.pt -> 120); None for other names."""
    m = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(m[1]) if m else None


def list_checkpoints(models_dir):
    """The checkpoint_*.pt files of a folder, oldest to newest by step."""
    folder = Path(models_dir)
    found = [p for p in folder.glob(CHECKPOINT_GLOB) if checkpoint_step(p) is not None] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def content_checksum(obj):
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes and every other value's
    repr, dictionaries in key order. Stored in the file by save_checkpoint and checked by
    read_checkpoint, so that damage inside the tensors (which torch.load does not notice) is found."""
    digest = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            digest.update(b"{")
            for key in sorted(x, key=repr):
                digest.update(repr(key).encode())
                feed(x[key])
            digest.update(b"}")
        elif isinstance(x, (list, tuple)):
            digest.update(b"[" if isinstance(x, list) else b"(")
            for v in x:
                feed(v)
            digest.update(b"]")
        else:
            digest.update(repr(x).encode())

    feed(obj)
    return digest.hexdigest()


def save_checkpoint(state, path):
    """Write `state` (with its content checksum) to a temporary file of this process's own, fsync, then
    rename it over `path`. A failed write (disk full, no permission, ...) removes the temporary file,
    leaves `path` and every other file as they were, and raises a UserError naming the path and the
    OS's reason."""
    path = Path(path)
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if k != CHECKSUM}
        state[CHECKSUM] = content_checksum(state)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise UserError(f"cannot write checkpoint {path}: {_os_reason(e)}") from None
        raise
    _sync_folder(path.parent)
    return path


def _sync_folder(folder):
    """fsync a folder, so that a rename in it survives a power cut (POSIX; elsewhere nothing)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_reason(exc):
    """The OS's reason behind a failed write (torch.save reports one as a RuntimeError whose context
    is the OSError), else the exception's first line."""
    cause = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.strerror:
        return cause.strerror
    return _first_line(exc)


def _first_line(exc):
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def prune_checkpoints(paths, keep):
    """Delete all but the newest `keep` (by step) of `paths`, a run's own checkpoints (0: keep all).
    Returns the kept paths, oldest first."""
    paths = sorted(set(paths), key=checkpoint_step)
    if keep <= 0 or len(paths) <= keep:
        return paths
    for old in paths[:-keep]:
        old.unlink(missing_ok=True)
    return paths[-keep:]


# ---------------------------------------------------------------------------------------
# Reading: nothing in a file runs
# ---------------------------------------------------------------------------------------
def file_format(path, foreign="is not a PyTorch checkpoint"):
    """'zip' (torch.save's format) or 'pickle' (torch's legacy format, or a network pickle) from a
    file's first bytes; a UserError for a missing, empty or damaged file, or one of neither kind
    (`foreign` says what it is not)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise UserError(f"{path} is empty, not a PyTorch checkpoint")
    if head == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path} is an incomplete PyTorch checkpoint (truncated or damaged)")
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    raise UserError(f"{path} {foreign}")


def read_checkpoint(path):
    """Load one checkpoint file with weights_only=True, so nothing in it runs, and verify its content
    checksum when it has one; a file that is not a readable PyTorch checkpoint of tensors and plain
    data, or is damaged, is a UserError saying so."""
    zipped = file_format(path) == "zip"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notes of the weights-only unpickler
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise UserError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)})") from None
        if zipped:
            raise UserError(f"{path} contains Python objects other than tensors, refused for safety "
                            "(nothing in it was run)") from None
        raise UserError(f"{path} is a Python pickle, not a checkpoint of this toolkit, refused for safety "
                        "(nothing in it was run; python convert.py converts NVlabs network pickles)") from None
    except Exception as e:  # noqa: BLE001 - any other unreadable file gets the same one-line error
        reason = _first_line(e)
        raise UserError(f"{path} is not a readable PyTorch checkpoint"
                        + ("" if "weights_only" in reason else f" ({reason})")) from None
    if isinstance(state, dict) and CHECKSUM in state:  # written by save_checkpoint: verify it
        stored = state.pop(CHECKSUM)
        if content_checksum(state) != stored:
            raise UserError(f"{path} is damaged: its contents differ from the checksum written with them")
    return state


def check_checkpoint(state, path, need=CHECKPOINT_KEYS):
    """A UserError unless `state` is a checkpoint dict of this toolkit holding every key of `need`."""
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint of this toolkit (it holds a {type(state).__name__}, not a dict)")
    if not isinstance(state.get("version", 1), int) or state.get("version", 1) > VERSION:
        raise UserError(f"{path} is a checkpoint of format {state['version']!r}, newer than this toolkit reads "
                        f"({VERSION}): update the toolkit")
    missing = [k for k in need if k not in state]
    if missing and "g_ema" in state:
        raise UserError(f"{path} is a stylegan2-pytorch (rosinality) checkpoint: python convert.py makes it one of "
                        "this toolkit's")
    if missing and ("G_ema" in missing or "model_args" in missing):
        held = ", ".join(map(str, list(state)[:6])) + (", ..." if len(state) > 6 else "")
        raise UserError(f"{path} is a checkpoint without {missing[0]}, not one this toolkit wrote "
                        f"(it holds: {held or 'nothing'})")
    if missing:
        raise UserError(f"{path} is a checkpoint without {', '.join(missing)}, which this needs")
    return state


def load_checkpoint(path, need=CHECKPOINT_KEYS):
    """(state, path) of a checkpoint file, or of the newest readable checkpoint in a folder: each
    unreadable newer one passed over is named in a warning line on stderr. Nothing in a file runs."""
    path = Path(path)
    if not path.is_dir():
        return check_checkpoint(read_checkpoint(path), path, need), path
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"no checkpoint ({CHECKPOINT_GLOB}) in {path}")
    passed = []
    for candidate in reversed(found):
        try:
            state = check_checkpoint(read_checkpoint(candidate), candidate, need)
        except UserError as e:
            passed.append(str(e))
            continue
        for reason in passed:
            print(f"warning: passing over an unreadable newer checkpoint: {reason}", file=sys.stderr)
        return state, candidate
    more = f" (and {len(found) - 1} older ones)" if len(found) > 1 else ""
    raise UserError(f"no readable checkpoint in {path}: {passed[0]}{more}")


# ---------------------------------------------------------------------------------------
# The networks of a checkpoint
# ---------------------------------------------------------------------------------------
def load_network(cls, state, name, args):
    """Network `name` (G_ema or D) of a checkpoint, in eval mode; a UserError if it does not fit the
    checkpoint's model_args."""
    try:
        net = cls(**args)
        net.load_state_dict(state[name])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the checkpoint's {name} does not fit its model_args ({reason})") from None
    return net.eval().requires_grad_(False)


def load_generator(state, device):
    """The EMA generator of a checkpoint, in eval mode (at its growth level if --progressive was
    still fading in resolutions)."""
    G = load_network(Generator, state, "G_ema", state["model_args"]["G"])
    G.synthesis.level = checkpoint_growth_level(state)
    return G.to(device)


def load_discriminator(state, device):
    """The discriminator of a checkpoint, in eval mode (its features are the projector's perceptual
    space), at the checkpoint's growth level like its generator."""
    D = load_network(Discriminator, state, "D", state["model_args"]["D"])
    D.level = checkpoint_growth_level(state)
    return D.to(device)


def checkpoint_growth_level(state):
    """The growth level a checkpoint was trained at (None: not progressive, or fully grown)."""
    cfg = checkpoint_settings(state)
    if not cfg.progressive:
        return None
    return growth_level(state["nimg"], cfg.progressive_kimg, cfg.resolution, cfg.progressive_start,
                        cfg.progressive_hold_kimg)
