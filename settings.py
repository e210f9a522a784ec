"""Settings: constants.py -> one flag per setting -> a checked config namespace; which settings
define the networks' architecture; the checks of output paths given on the command line; and the
one way a script reports bad input (UserError: one line on stderr, exit status 2)."""
import argparse
import ast
import functools
import io
import math
import os
import signal
import sys
import tokenize
from pathlib import Path
from types import SimpleNamespace

import constants
import deps

INT64_MAX = 2**63 - 1  # the largest integer a setting may hold (torch and NumPy take int64)
SCRIPT_PREFIXES = ("GEN_", "EVALUATE_", "CONVERT_", "EXPLORE_")  # generate_images, evaluate, convert, explore
# Settings that define the networks' shape: a resumed run must keep them, --init-from takes them from its network.
ARCHITECTURE = ("RESOLUTION", "IMAGE_MODE", "Z_DIM", "W_DIM", "MAPPING_LAYERS", "MAPPING_LR_MULT",
                "CHANNEL_BASE", "CHANNEL_MAX", "CONDITIONAL", "MBSTD_GROUP", "SPECTRAL_NORM", "ATTENTION_RES",
                "STYLE_OP", "RESAMPLE", "CONV_CLAMP", "CHANNEL_MIN", "SCANNER_NOISE")
KEPT_ON_RESUME = ARCHITECTURE + ("FREEZE_D", "PROGRESSIVE")  # also fix D's parameters and which its optimiser holds


class UserError(Exception):
    """Bad input or settings: reported as one line on stderr, exit status 2, no traceback."""


def command(main):
    """A script's main(argv) -> exit status: a UserError becomes one `error:` line on stderr and 2, and
    a failed write (disk full, no permission) one line and 1."""
    @functools.wraps(main)
    def run(argv=None):
        if signal.getsignal(signal.SIGINT) is deps.interrupted_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is KeyboardInterrupt again
        try:
            return main(argv)
        except UserError as e:
            report(f"error: {e}")
            return 2
        except OSError as e:
            report(f"error: cannot write {e.filename or 'an output file'}: {e.strerror or e}")
            return 1
    return run


def report(line):
    """One line on stderr, from one process: under torchrun every process fails alike, and rank 0 says so."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


# ---------------------------------------------------------------------------------------
# constants.py -> argparse flags -> a config namespace
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


def build_parser(prefix, description, extra=(), settings=True):
    """A parser with one flag per setting (of the script of `prefix`; none when not `settings`);
    `extra` is a list of (flags, kwargs) for the script's other options."""
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = setting_comments()
    for flags, kwargs in extra:
        parser.add_argument(*flags, **kwargs)
    for name in setting_names(prefix) if settings else ():
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
    for name in ("RESOLUTION", "PROGRESSIVE_START"):
        res = values.get(name)
        if res is not None and res & (res - 1):
            raise UserError(f"{flag_of(name)} must be a power of two, got {res}")
    if values.get("PROGRESSIVE_START", 4) > values.get("RESOLUTION", values.get("PROGRESSIVE_START", 4)):
        raise UserError(f"--progressive-start {values['PROGRESSIVE_START']} is above --resolution "
                        f"{values['RESOLUTION']}")
    if -1 < values.get("MODE_SEEKING_FULL", -1) < 0:
        raise UserError(f"--mode-seeking-full must be -1 (the --mode-seeking weight) or >= 0, "
                        f"got {values['MODE_SEEKING_FULL']!r}")
    if "ADAM_BETAS" in values and len(values["ADAM_BETAS"]) != 2:
        raise UserError(f"--adam-betas needs two comma-separated numbers, got {values['ADAM_BETAS']!r}")
    if "SLICE_RANGE" in values:
        check_slice_range(values["SLICE_RANGE"])
    if "DATA_SPLITS" in values:
        splits = [s.strip() for s in values["DATA_SPLITS"].split(",") if s.strip()]
        if not splits:
            raise UserError(f"--data-splits must name at least one split folder, such as train; "
                            f"got {values['DATA_SPLITS']!r}")
        twice = sorted({s for s in splits if splits.count(s) > 1})
        if twice:
            raise UserError(f"--data-splits names {twice[0]} twice: each split is read once")
    if "DATA_ROOT" in values and not str(values["DATA_ROOT"]).strip():
        raise UserError("--data-root is empty: give the data folder (or leave it out for constants.py's)")
    kimg, batch = values.get("KIMG", 0), values.get("BATCH_SIZE")
    if kimg and batch and kimg * 1000 < batch:
        raise UserError(f"--kimg {kimg:g} is less than one batch ({batch} images); give at least {batch / 1000:g}")


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


def check_kept_on_resume(trained, cfg, path, given=(), preset=None):
    """A UserError when a resumed run's settings `cfg` change one that the checkpoint `path`, trained
    with `trained`, fixes (KEPT_ON_RESUME); one the flags `given` did not set came from `preset`."""
    for name in KEPT_ON_RESUME:
        old, new = getattr(trained, name.lower()), getattr(cfg, name.lower())
        if old != new and name not in given and preset:
            raise UserError(f"--preset {preset} sets {flag_of(name)} {new!r} but {path} was trained with {old!r}; "
                            "resume without --preset (the run keeps its own settings)")
        if old != new:
            raise UserError(f"{flag_of(name)} is {new!r} but {path} was trained with {old!r}; drop it to resume")


def model_args_of(cfg, img_channels, num_classes):
    """The networks' constructor arguments for settings `cfg` (kept in checkpoints as model_args)."""
    shared = dict(resolution=cfg.resolution, img_channels=img_channels, num_classes=num_classes,
                  channel_base=cfg.channel_base, channel_max=cfg.channel_max, attention_res=cfg.attention_res,
                  resample=cfg.resample, conv_clamp=cfg.conv_clamp)
    if cfg.channel_min:  # kept out of model_args when unused, as in checkpoints from before it existed
        shared["channel_min"] = cfg.channel_min
    G = dict(scanner_noise=True) if cfg.scanner_noise else {}  # likewise
    D = dict(shared, mbstd_group=cfg.mbstd_group, spectral_norm=cfg.spectral_norm)
    if cfg.progressive:
        D["grow"] = True
    return dict(G=dict(shared, z_dim=cfg.z_dim, w_dim=cfg.w_dim, mapping_layers=cfg.mapping_layers,
                       mapping_lr_mult=cfg.mapping_lr_mult, w_avg_beta=cfg.w_avg_beta, style_op=cfg.style_op, **G), D=D)


# ---------------------------------------------------------------------------------------
# Output paths, checked before any work
# ---------------------------------------------------------------------------------------
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
