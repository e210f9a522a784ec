"""Settings and command line, losses and penalties, EMA, seeding, checkpoints, image grids and plots."""
import argparse
import ast
import io
import json
import math
import os
import pickle
import random
import re
import resource
import socket
import sys
import tokenize
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import constants
from modules import Discriminator, Generator

CHECKPOINT_GLOB = "checkpoint_*.pt"
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)\.pt")
BEST_CHECKPOINT = "best.pt"
LOCK_FILE = "train.lock"  # in OUT_DIR/Models while a train.py run writes there
SUPERSEDED = "superseded"  # Models/superseded/<time>/: checkpoints newer than the one a run resumed from
INT64_MAX = 2**63 - 1  # the largest integer a setting may hold (torch and NumPy take int64)
SCRIPT_PREFIXES = ("GEN_", "EVALUATE_", "CONVERT_")  # generate_images.py, evaluate.py, convert.py; the rest: train.py


class UserError(Exception):
    """Bad input or settings: reported as one line on stderr, exit status 2, no traceback."""


# ---------------------------------------------------------------------------------------
# Settings: constants.py -> argparse flags -> a config namespace
# ---------------------------------------------------------------------------------------
def setting_comments():
    """{NAME: comment} for each `NAME = value  # comment` line of constants.py (the --help text)."""
    source = Path(constants.__file__).read_text()
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    names = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = comments.get(node.lineno, "")
    return names


def setting_names(prefix):
    """Names of the settings of one script: GEN_* for generate_images.py, EVALUATE_* for evaluate.py,
    the rest for train.py."""
    return [n for n, v in vars(constants).items()
            if n.isupper() and not isinstance(v, dict) and n.startswith(prefix)
            and (prefix or not n.startswith(SCRIPT_PREFIXES))]


def flag_of(name):
    """DATA_ROOT -> --data-root; GEN_SEEDS -> --seeds; EVALUATE_N -> --n."""
    return "--" + _strip_script_prefix(name).lower().replace("_", "-")


def _strip_script_prefix(name):
    for prefix in SCRIPT_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def _float_tuple(text):
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line) instead of printing the usage and exiting."""

    def error(self, message):
        raise UserError(message)


def build_parser(prefix, description, extra=()):
    """A parser with one flag per setting; `extra` is a list of (flags, kwargs) for non-settings."""
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = setting_comments()
    for flags, kwargs in extra:
        parser.add_argument(*flags, **kwargs)
    for name in setting_names(prefix):
        default = getattr(constants, name)
        kwargs = dict(dest=name, help=f"{helps.get(name, '')} (default: {default!r})")
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs.update(type=_float_tuple, metavar="A,B")
        else:
            kwargs.update(type=type(default), metavar=type(default).__name__.upper())
        if name in constants.CHOICES:
            kwargs.update(choices=constants.CHOICES[name], metavar=None)
        parser.add_argument(flag_of(name), **kwargs)
    return parser


def check_settings(values):
    """Raise UserError naming the flag for a value out of range. `values`: {NAME: value}. Numbers must
    be finite, and integers fit in 64 bits, whatever their range."""
    for name, value in values.items():
        low, high = constants.RANGES.get(name, (None, None))
        for v in (value if isinstance(value, tuple) else (value,)):
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{flag_of(name)} must be a finite number, got {value!r}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT64_MAX:
                raise UserError(f"{flag_of(name)} must be below 2^63, got {value!r}")
            if (low is not None and v < low) or (high is not None and v > high):
                bounds = f"between {low} and {high}" if high is not None else f">= {low}"
                raise UserError(f"{flag_of(name)} must be {bounds}, got {value!r}")
    res = values.get("RESOLUTION")
    if res is not None and res & (res - 1):
        raise UserError(f"--resolution must be a power of two, got {res}")
    if "ADAM_BETAS" in values and len(values["ADAM_BETAS"]) != 2:
        raise UserError(f"--adam-betas needs two comma-separated numbers, got {values['ADAM_BETAS']!r}")
    if "SLICE_RANGE" in values:
        check_slice_range(values["SLICE_RANGE"])
    if "DATA_SPLITS" in values and not any(s.strip() for s in values["DATA_SPLITS"].split(",")):
        raise UserError(f"--data-splits must name at least one split folder, such as train; "
                        f"got {values['DATA_SPLITS']!r}")


def check_slice_range(slice_range):
    """(lo, hi) fractions of a volume's height with 0 <= lo < hi <= 1, else a UserError."""
    try:
        lo, hi = (float(v) for v in slice_range)
    except (TypeError, ValueError):
        raise UserError(f"{flag_of('SLICE_RANGE')} needs two numbers LO,HI, got {slice_range!r}") from None
    if not 0 <= lo < hi <= 1:
        raise UserError(f"{flag_of('SLICE_RANGE')} must be two fractions of the volume height with "
                        f"0 <= LO < HI <= 1, got {lo:g},{hi:g}")
    return lo, hi


def parse_settings(argv, prefix, description, extra=()):
    """Parse argv into (settings {NAME: value} given explicitly, other options namespace)."""
    args = vars(build_parser(prefix, description, extra).parse_args(argv))
    names = set(setting_names(prefix))
    given = {k: v for k, v in args.items() if k in names}
    others = SimpleNamespace(**{k: v for k, v in args.items() if k not in names})
    return given, others


def resolve_settings(given, prefix, preset=None, base=None):
    """Defaults (or `base`) <- preset <- explicit flags; checked; returned as a lower-case namespace."""
    values = {n: getattr(constants, n) for n in setting_names(prefix)}
    values.update({k.upper(): v for k, v in (base or {}).items() if k.upper() in values})
    if preset is not None:
        values.update(constants.PRESETS[preset])
    values.update(given)
    check_settings(values)
    return SimpleNamespace(**{_strip_script_prefix(k).lower(): v for k, v in values.items()})


def checkpoint_settings(state, data_root="", skip_bad_images=False):
    """A checkpoint's training settings (resolution, image mode, ...), with `data_root` when given
    and unreadable images skipped when asked."""
    given = dict(DATA_ROOT=data_root) if data_root else {}
    if skip_bad_images:
        given["SKIP_BAD_IMAGES"] = True
    return resolve_settings(given, "", base=state["config"])


def config_dict(cfg):
    """A plain dict of a config namespace (for checkpoints and JSON)."""
    return dict(vars(cfg))


def save_json(obj, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=list) + "\n")


def append_jsonl(record, path):
    """Append `record` as one JSON line (non-finite numbers as null), flushed at once: a file that
    `tail -f` and pandas.read_json(path, lines=True) read while the run goes on."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(path, "a+b") as f:
        cut = f.tell() > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"  # a run killed mid-line
        f.write((("\n" if cut else "") + json.dumps(clean) + "\n").encode())


def stats_history(lines):
    """stats.jsonl's ticks as plot_losses' (history, x): the tick means, against kimg."""
    keys = {"real_sign": "r_t"}
    history = {k: [np.nan if line.get(keys.get(k, k)) is None else line[keys.get(k, k)] for line in lines]
               for k in ("loss_gen", "loss_critic", "aug_p", "real_sign")}
    return history, [line["kimg"] for line in lines]


def read_jsonl(path):
    """The records of a JSON-lines file; a line cut short (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def peak_memory_mb(device):
    """CUDA: the most memory tensors took; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def writable_folder(path, flag, given=None):
    """Check, before any work, that the output folder `path` exists or can be created there, and can
    be written to; else a UserError naming `flag` and the value `given` to it (a file in the way, no
    permission)."""
    path = Path(path)
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {given or path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {given or path}: {existing} is not writable")
    return path


def writable_file(path, flag):
    """Check, before any work, that the output file `path` can be written (its folder created)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} is not writable")
    return writable_folder(path.parent, flag, path) / path.name


def resolve_device(name, flag="--device"):
    """'auto' -> cuda when present, else cpu; asking for CUDA without one is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} cuda: CUDA is not available on this machine (use {flag} cpu)")
    return torch.device(name)


def describe_device(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# Several processes (torchrun): helpers that do nothing in a single process
# ---------------------------------------------------------------------------------------
def process_rank():
    """This process's rank under torchrun (0 when there is a single process), known before joining."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def init_distributed(device):
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, Gloo on CPU).
    Returns (rank, world_size, device): each process takes the GPU of its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}: this node has only {torch.cuda.device_count()} GPUs "
                            "(lower torchrun's --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=(
        device if device.type == "cuda" else None))
    return rank, world_size, device


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_mean(tensors):
    """Average each tensor of a list over the processes, in place, with one flat all-reduce."""
    if distributed() and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors]).div_(torch.distributed.get_world_size())
        torch.distributed.all_reduce(flat)
        torch._foreach_copy_(tensors, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]),
                                                                     tensors)])
    return tensors


def same_on_every_process(tensors):
    """True when the tensors hold the same values in every process (the replicas stay in step)."""
    if not distributed():
        return True
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    fingerprint = torch.stack([flat.sum(), flat.square().sum(), -flat.sum(), -flat.square().sum()])
    torch.distributed.all_reduce(fingerprint, op=torch.distributed.ReduceOp.MAX)
    return bool((fingerprint[:2] == -fingerprint[2:]).all())


def any_process(flag, device):
    """True on every process when `flag` is true on any (a stop signal seen by one process stops all)."""
    if not distributed():
        return flag
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def close_distributed():
    if distributed():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Progressive training
# ---------------------------------------------------------------------------------------
def growth_level(nimg, kimg, resolution):
    """Progressive training's level after `nimg` images (None once every resolution is in): each
    resolution above 4x4 takes `kimg` thousand images, the first half at the level below, the
    second half fading in (level k-1 -> k); level k shows resolutions up to 4 * 2^k."""
    top = int(math.log2(resolution)) - 2
    t = nimg / (kimg * 1000)
    stage = math.floor(t)
    level = stage + min(max(2 * (t - stage) - 1, 0.0), 1.0)
    return None if level >= top else level


def checkpoint_growth_level(state):
    """The growth level a checkpoint was trained at (None: not progressive, or fully grown)."""
    cfg = checkpoint_settings(state)
    return growth_level(state["nimg"], cfg.progressive_kimg, cfg.resolution) if cfg.progressive else None


# ---------------------------------------------------------------------------------------
# Exponential moving average of the generator
# ---------------------------------------------------------------------------------------
def ema_beta(batch_size, ema_kimg, rampup, nimg):
    """Per-step decay of a moving average with a half-life of `ema_kimg` thousand images,
    ramped up to at most `rampup` x the images seen so far."""
    ema_nimg = ema_kimg * 1000
    if rampup > 0:
        ema_nimg = min(ema_nimg, nimg * rampup)
    return 0.5 ** (batch_size / max(ema_nimg, 1e-8))


@torch.no_grad()
def ema_update(ema_model, model, beta):
    """ema <- beta * ema + (1 - beta) * model for parameters; buffers are copied."""
    ema_params = list(ema_model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - beta)
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.copy_(b)


# ---------------------------------------------------------------------------------------
# Learning-rate schedules (a pure function of the position in training, so resume is exact)
# ---------------------------------------------------------------------------------------
def lr_factor(cfg, step, epoch):
    """Multiplier of the base learning rate at iteration `step` of epoch `epoch` (0-based)."""
    if cfg.lr_schedule == "cyclic":  # triangular: low -> high over LR_CYCLE_STEPS, then back
        phase = (step / cfg.lr_cycle_steps) % 2
        return cfg.lr_cycle_min + (1 - cfg.lr_cycle_min) * (1 - abs(phase - 1))
    if cfg.lr_schedule == "step":
        return cfg.lr_step_factor ** (epoch // cfg.lr_step_epochs)
    return 1.0


# ---------------------------------------------------------------------------------------
# Checkpoints: atomic writes, safe reads, newest readable, one run per folder
# ---------------------------------------------------------------------------------------
CHECKPOINT_KEYS = ("G_ema", "model_args", "config", "class_names", "step", "nimg", "history")  # to generate


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


def save_checkpoint(state, path):
    """Write `state` to a temporary file of this process's own, fsync, then rename it over `path`.
    A failed write (disk full, no permission, ...) removes the temporary file, leaves `path` and
    every other file as they were, and raises a UserError naming the path and the OS's reason."""
    path = Path(path)
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


def prune_checkpoints(paths, keep):
    """Delete all but the newest `keep` (by step) of `paths`, a run's own checkpoints (0: keep all).
    Returns the kept paths, oldest first."""
    paths = sorted(set(paths), key=checkpoint_step)
    if keep <= 0 or len(paths) <= keep:
        return paths
    for old in paths[:-keep]:
        old.unlink(missing_ok=True)
    return paths[-keep:]


def read_checkpoint(path):
    """Load one checkpoint file with weights_only=True, so nothing in it runs; a file that is not a
    readable PyTorch checkpoint of tensors and plain data is a UserError saying what it is not."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    zipped = head == b"PK\x03\x04"  # torch.save's format is a zip archive
    if not head:
        raise UserError(f"{path} is empty, not a PyTorch checkpoint")
    if zipped and not zipfile.is_zipfile(path):
        raise UserError(f"{path} is an incomplete PyTorch checkpoint (truncated or damaged)")
    if not zipped and head[:1] != b"\x80":  # nor a pickle (torch's legacy format)
        raise UserError(f"{path} is not a PyTorch checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notes of the weights-only unpickler
            return torch.load(path, map_location="cpu", weights_only=True)
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


def check_checkpoint(state, path, need=CHECKPOINT_KEYS):
    """A UserError unless `state` is a checkpoint dict of this toolkit holding every key of `need`."""
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint of this toolkit (it holds a {type(state).__name__}, not a dict)")
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


class RunLock:
    """OUT_DIR/Models/train.lock, held while one train.py run writes there. A second run into the
    folder stops with a UserError naming the owner; a lock left by a process that died is taken
    over, with a line saying so. The kernel's flock (released when its process dies) decides where
    the file system has it; elsewhere the PID recorded in the file, checked on this host."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_FILE
        self.fd, self.created = None, False

    def __enter__(self):
        me = f"{os.getpid()} {socket.gethostname()}"
        try:
            self.created = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {self.path.parent} ({e.strerror})") from None
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                held, owner = _try_flock(fd), os.read(fd, 4096).decode(errors="replace").split()
                if held is False or (held is None and _owner_alive(owner)):
                    pid, host = (owner + ["?", "?"])[:2]
                    raise UserError(f"another training run (PID {pid} on {host}) is writing to {self.path.parent}: "
                                    f"let it finish, or use another --out-dir (if no run is writing there, "
                                    f"delete {self.path})")
                if _same_file(fd, self.path):  # not unlinked by an owner that was releasing it
                    self.fd = fd
            finally:
                if self.fd is None:
                    os.close(fd)
        if owner and owner[0] != str(os.getpid()):
            pid, host = (owner + ["?"])[:2]
            print(f"taking over {self.path}, left by PID {pid} on {host}, which is no longer running", file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, f"{me}\n".encode())
        return self

    def __exit__(self, *exc):
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
        if self.created and not any(self.path.parent.iterdir()):  # a run that stopped before writing
            self.path.parent.rmdir()


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


def _same_file(fd, path):
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------
# A generator (and discriminator) from a checkpoint, and images from latents
# ---------------------------------------------------------------------------------------
def model_args_of(cfg, img_channels, num_classes):
    """The networks' constructor arguments for settings `cfg` (kept in checkpoints as model_args)."""
    shared = dict(resolution=cfg.resolution, img_channels=img_channels, num_classes=num_classes,
                  channel_base=cfg.channel_base, channel_max=cfg.channel_max, attention_res=cfg.attention_res,
                  resample=cfg.resample, conv_clamp=cfg.conv_clamp)
    return dict(G=dict(shared, z_dim=cfg.z_dim, w_dim=cfg.w_dim, mapping_layers=cfg.mapping_layers,
                       mapping_lr_mult=cfg.mapping_lr_mult, w_avg_beta=cfg.w_avg_beta, style_op=cfg.style_op),
                D=dict(shared, mbstd_group=cfg.mbstd_group, spectral_norm=cfg.spectral_norm))


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
    """The discriminator of a checkpoint, in eval mode (its features are the projector's perceptual space)."""
    return load_network(Discriminator, state, "D", state["model_args"]["D"]).to(device)


def seed_latents(seeds, z_dim):
    """One z per seed, drawn on the CPU so that a seed means the same z on every device."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def mapped(G, z, labels, truncation, device):
    """z (N, z_dim) and labels (indices, or (N, K) class weights) -> w (N, w_dim) on the CPU."""
    return G.mapping(z.to(device), labels.to(device) if labels is not None else None, truncation).cpu()


@torch.no_grad()
def synthesize(G, ws, noise_mode, batch, device):
    """Images (N, C, R, R) in [-1, 1] on the CPU from w (N, w_dim) or per-layer styles (N, num_ws, w_dim)."""
    if ws.dim() == 2:
        ws = ws[:, None].expand(-1, G.num_ws, -1)
    return torch.cat([G.synthesis(ws[i:i + batch].to(device), noise_mode).cpu() for i in range(0, len(ws), batch)])


@torch.no_grad()
def images_from_latents(G, z, labels, truncation, noise_mode, batch, device):
    """Images (N, C, R, R) in [-1, 1] for latents z, generated `batch` at a time."""
    out = []
    for i in range(0, len(z), batch):
        lab = labels[i:i + batch].to(device) if labels is not None else None
        out.append(G(z[i:i + batch].to(device), lab, truncation=truncation, noise_mode=noise_mode).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------
# Images and plots
# ---------------------------------------------------------------------------------------
def quantize_uint8(images):
    """(N, C, H, W) floats in [-1, 1] -> the same shape in uint8 [0, 255] (on the CPU), as a PNG stores them."""
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_uint8(images):
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 array."""
    return quantize_uint8(images).permute(0, 2, 3, 1).numpy()


def save_image(image, path):
    """Save one (C, H, W) image in [-1, 1] as PNG (grayscale when C == 1)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _pil(to_uint8(image[None])[0]).save(path)


def grid_array(images, ncol=8, pad=2):
    """Tile (N, C, H, W) images in [-1, 1] into one (H', W', C) uint8 array with `ncol` columns."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = min(ncol, n)
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = arr[i]
    return grid


def _pil(array):
    from PIL import Image
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def save_grid(images, path, ncol=8, pad=2):
    """Tile (N, C, H, W) images in [-1, 1] into one PNG with `ncol` columns."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _pil(grid_array(images, ncol, pad)).save(path)


def save_gif(frames, path, ncol=8, duration_ms=120, bounce=True):
    """An animated GIF from frames (F, N, C, H, W) in [-1, 1]: each frame tiles its N images; with
    `bounce` it plays forward then back, so the loop has no jump."""
    order = list(range(len(frames))) + (list(range(len(frames) - 2, 0, -1)) if bounce else [])
    pictures = [_pil(grid_array(frames[i], ncol)) for i in order]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    """Write a Matplotlib figure (creating its folder) and close it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def save_labelled_grid(images, path, ncol, row_labels, col_labels=(), title=""):
    """A grid of (N, C, H, W) images in [-1, 1] with a label left of each row (and above each column)."""
    plt = pyplot()
    grid = grid_array(images, ncol)
    h, pad = images.shape[-2], 2
    fig, ax = plt.subplots(figsize=(2 + grid.shape[1] / 64, 0.6 + grid.shape[0] / 64))
    ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    centres = [pad + i * (h + pad) + h / 2 for i in range(max(len(row_labels), len(col_labels)))]
    ax.set_yticks(centres[:len(row_labels)], row_labels)
    ax.set_xticks(centres[:len(col_labels)], col_labels)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10, pad=20 if col_labels else 6)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def smooth(values, window):
    """Moving average that ignores NaN (steps where a penalty was not computed)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    kernel = np.ones(window)
    num = np.convolve(np.where(ok, v, 0), kernel, mode="same")
    den = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def plot_losses(history, path, x=None, xlabel="iteration"):
    """Generator and discriminator losses per iteration (or against `x`: the kimg of stats.jsonl's
    ticks), raw (faint) and smoothed, one panel each; with augmentation, a third panel of its
    probability p and ADA's overfitting heuristic r_t."""
    plt = pyplot()
    panels = [("loss_gen", "generator loss"), ("loss_critic", "discriminator loss")]
    augmented = any(v > 0 for v in history.get("aug_p", []))
    fig, axes = plt.subplots(len(panels) + augmented, 1, figsize=(9, 6 + 2.5 * augmented), sharex=True)
    for ax, (key, title) in zip(axes, panels):
        values = np.asarray(history.get(key, []), dtype=np.float64)
        steps = np.arange(1, len(values) + 1) if x is None else np.asarray(x, dtype=np.float64)
        if len(values):
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="per iteration")
            ax.plot(steps, smooth(values, max(1, len(values) // 50)), color="tab:blue", label="smoothed")
            ax.legend(loc="upper right")
        else:  # a converted network, or a run before its first iteration
            ax.text(0.5, 0.5, "no training iterations recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_ylabel("loss")
    if augmented:
        ax = axes[-1]
        lines = (("aug_p", "p", "tab:green"), ("real_sign", "r_t = E[sign D(real)], smoothed", "tab:gray"))
        for key, label, color in lines:
            values = np.asarray(history.get(key, []), dtype=np.float64)
            if key == "real_sign" and len(values):
                values = smooth(values, max(1, len(values) // 50))
            ax.plot(np.arange(1, len(values) + 1) if x is None else np.asarray(x), values, color=color, label=label)
        ax.set_title("augmentation")
        ax.legend(loc="upper left")
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout()
    save_figure(fig, path)


def plot_metrics(metrics, path):
    """Evaluation figures over training (one panel per metric group) against thousands of images seen."""
    plt = pyplot()
    levels = sorted({k for m in metrics for k in m if k.startswith("swd_") and k[4:].isdigit()},
                    key=lambda k: -int(k[4:]))
    panels = [(["swd", *levels, "swd_heldout"], "sliced Wasserstein distance x1e3"),
              (["ms_ssim_fake", "ms_ssim_real", "ms_ssim_heldout"], "MS-SSIM of random pairs (diversity)"),
              (["precision", "recall", "precision_heldout", "recall_heldout", "knn_ratio"],
               "precision, recall, k-NN radius ratio"),
              (["fid"], "FID"), (["kid"], "KID"),
              (["d_real", "d_heldout", "d_fake"], "D's mean score: training reals, held-out reals, fakes")]
    panels = [(keys, title) for keys, title in panels if any(k in m for m in metrics for k in keys)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (keys, title) in zip(axes[:, 0], panels):
        for key in keys:
            points = [(m["nimg"] / 1000, m[key]) for m in metrics if m.get(key) is not None]
            if not points:
                continue
            style = (dict(linewidth=1.0, linestyle="--") if key.endswith("_heldout") and key != "d_heldout" else
                     dict(linewidth=0.8, alpha=0.6) if key in levels else dict(linewidth=1.6, marker="o"))
            ax.plot(*zip(*points), label=key, **style)
        ax.set_title(title)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("thousands of real images shown to D")
    fig.tight_layout()
    save_figure(fig, path)
