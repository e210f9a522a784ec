"""Train StyleGAN2 on brain MRI slices.

    python train.py                         # settings from constants.py
    python train.py --preset adni256 --data-root /data/ADNI/AD_NC
    python train.py --resume                # continue from the newest checkpoint in Models/

Every setting in constants.py is a flag (--help lists them). Ctrl-C or SIGTERM saves a checkpoint
and exits; --resume continues exactly where it stopped."""
import deps  # noqa: F401  (first: stops with one line when this Python lacks a package)

# isort: split
import contextlib
import signal
import sys

from tqdm import tqdm

import constants
from dataset import EpochSampler, cache_on_device, load_slices
from distributed import describe_device, joined, process_rank, seed_everything
from metrics import load_inception
from pretrained import init_networks
from run_folder import (
    RunLock,
    clear_for_fresh_run,
    earlier_run,
    last_grid_name,
    out_dir,
    remove_temporary,
    resume_checkpoint,
    samples_folder,
    supersede_newer,
)
from run_outputs import RunOutputs, make_evaluator, open_tensorboard, save_reals
from settings import (
    UserError,
    check_kept_on_resume,
    check_settings,
    checkpoint_settings,
    command,
    config_dict,
    parse_settings,
    resolve_settings,
    writable_folder,
)
from stop_signal import StopSignal, Terminated, terminate_before_training
from training import (
    HISTORY_KEYS,
    Diverged,
    build_run,
    initialise,
    measure_scanner_noise,
    restore,
    set_growth_level,
    train_step,
)
from utils import save_json

BAR_KEYS = ("gp", "r1", "loss_critic", "loss_gen", "pl_penalty")  # the progress bar's losses and penalties
EXTRA_FLAGS = [
    (("--preset",), dict(choices=sorted(constants.PRESETS), help="named set of settings from constants.PRESETS")),
    (("--resume",), dict(nargs="?", const=True, metavar="PATH",
                         help="continue from the newest readable checkpoint in OUT_DIR/Models, or from checkpoint "
                              "file PATH (the run's newer checkpoints move to Models/superseded/)")),
    (("--overwrite",), dict(action="store_true",
                            help="start a fresh run in an OUT_DIR that holds another run's checkpoints: delete "
                                 "them and its sample grids first")),
]


# ---------------------------------------------------------------------------------------
# Settings and the run's folder
# ---------------------------------------------------------------------------------------
def settings(given, opts, out, main_process=True):
    """-> (config, checkpoint state or None, initial networks or None). A fresh run needs an OUT_DIR
    whose Models/ holds no other run's checkpoints (or --overwrite, which deletes them); --resume
    takes the checkpoint's settings as the base; --init-from takes the source network's
    architecture. The main process tidies Models/ (it holds the run's lock)."""
    preset, resume = getattr(opts, "preset", None), getattr(opts, "resume", None)
    given = dict(given, OUT_DIR=str(out))
    models = out / "Models"
    if main_process:
        remove_temporary(models)
    if resume and getattr(opts, "overwrite", False):
        raise UserError("--resume continues the run in --out-dir and --overwrite deletes it: give one of them")
    if resume and "INIT_FROM" in given:
        raise UserError("--init-from starts a new run from a network; drop it to --resume this run")
    if not resume:
        cfg = resolve_settings(given, "", preset)
        cfg.preset = preset
        check_inception_weights(cfg)
        earlier = earlier_run(out, getattr(opts, "overwrite", False))
        init = init_networks(cfg, given) if cfg.init_from else None  # before --overwrite deletes anything
        if main_process:
            clear_for_fresh_run(out, cfg, earlier)
        return cfg, None, init
    state, path = resume_checkpoint(models, resume)
    cfg = resolve_settings(given, "", preset, base=state["config"])
    check_kept_on_resume(checkpoint_settings(state), cfg, path, given, preset)
    check_inception_weights(cfg)
    reached = length_trained(cfg, state["step"], state["nimg"], state["epoch"])
    if reached and wrapped_up(cfg, state, out):
        raise AlreadyTrained(f"nothing to train: {path} has already reached {reached}")
    cfg.preset = preset or state["config"].get("preset")
    if main_process:
        supersede_newer(out, state["step"], state["nimg"])
    print(f"resuming from {path} (step {state['step']})")
    return cfg, state, None


class AlreadyTrained(Exception):
    """--resume of a run whose length (--max-steps, --kimg or --epochs) is already trained."""


def length_trained(cfg, step, nimg, epoch):
    """The run length (MAX_STEPS, KIMG, or EPOCHS when KIMG is 0) reached at this point, as the flag that
    would lengthen it and its value, or None."""
    if cfg.max_steps and step >= cfg.max_steps:
        return f"its --max-steps {cfg.max_steps} (step {step}): give a larger one, or 0 for none, to train on"
    if cfg.kimg and nimg >= round(cfg.kimg * 1000):
        return f"its --kimg {cfg.kimg:g} ({nimg} images): give a larger one to train on"
    if not cfg.kimg and epoch >= cfg.epochs:
        return f"its --epochs {cfg.epochs} (epoch {epoch}): give a larger one to train on"
    return None


def wrapped_up(cfg, state, out):
    """Whether a run's end is on disk: its last grid and, with evaluations, its last evaluation. A run
    stopped by a signal in its last iteration has them still to do, and resuming it does them."""
    grid = samples_folder(out, cfg.resolution) / last_grid_name(state["step"])
    metrics = state.get("metrics") or []
    return grid.is_file() and (not cfg.eval_every or bool(metrics) and metrics[-1]["step"] == state["step"])


def check_inception_weights(cfg):
    """--inception-weights, read once before any work: a file that cannot serve is one line now, not
    after the data are loaded."""
    if cfg.eval_every:
        load_inception(cfg.inception_weights, "cpu")


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
def train(cfg, state=None, init=None):
    """Train until EPOCHS (or MAX_STEPS) or a stop signal, from scratch, from a checkpoint `state`
    (resume) or from the networks of `init` (--init-from). Returns the exit status."""
    with joined(cfg) as (rank, world_size, device):
        return train_on(cfg, state, rank, world_size, device, init)


def train_on(cfg, state, rank, world_size, device, init=None):
    print(f"device: {describe_device(device)}" + (f" x {world_size} processes" if world_size > 1 else ""))
    data = load_slices(cfg)
    print(f"data: {cfg.data_root}: {data.summary()}")
    if cfg.conditional and len(data.class_names) < 2:
        raise UserError(f"--conditional needs at least two class sub-folders in {cfg.data_root}")
    sampler = EpochSampler(len(data), cfg.batch_size, cfg.seed, rank, world_size)
    if sampler.steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the data set ({len(data)} images)")
    seed_everything(cfg.seed)  # the same initial networks in every process
    run = build_run(cfg, data, device)
    if init is not None:
        initialise(run, init, data, cfg.init_from)
    if state is not None:
        restore(run, state, cfg, data)
    else:
        measure_scanner_noise(run, data)
    set_growth_level(run, cfg)
    if world_size > 1:  # each process draws its own latents and flips from here on
        seed_everything(cfg.seed + 1_000_003 * rank + run.step)
    main_process = rank == 0
    run.board = open_tensorboard(cfg) if main_process else None
    if run.epoch_step >= sampler.steps_per_epoch:
        run.epoch, run.epoch_step = run.epoch + 1, 0
    outputs = RunOutputs(run, cfg, state, main_process, make_evaluator(cfg, data, device) if main_process else None)
    if main_process:
        save_json(config_dict(cfg), outputs.samples / "config.json")
        save_reals(data, cfg, outputs.samples / "reals.png")
    cache_on_device(data, cfg, device)
    print(f"G {sum(p.numel() for p in run.G.parameters()) / 1e6:.2f}M params, "
          f"D {sum(p.numel() for p in run.D.parameters()) / 1e6:.2f}M params; "
          f"{sampler.steps_per_epoch} iterations per epoch; outputs in {outputs.models} and {outputs.samples}")
    try:
        return train_loop(run, cfg, data, sampler, outputs)
    finally:
        if run.board is not None:
            run.board.close()


def length_reached(run, cfg):
    """The run's length reached (the epoch count moves on after an epoch's last iteration)."""
    return length_trained(cfg, run.step, run.nimg, run.epoch) is not None


def train_loop(run, cfg, data, sampler, outputs):
    """Epochs until EPOCHS (or KIMG), MAX_STEPS or a stop signal, with samples, evaluations,
    checkpoints and the logs."""
    with StopSignal() as stop:
        finished = False
        while (cfg.kimg or run.epoch < cfg.epochs) and not finished and stop.signum is None:
            finished = run_epoch(run, cfg, data, sampler, outputs, stop)
            if run.epoch_step == sampler.steps_per_epoch:
                run.epoch, run.epoch_step = run.epoch + 1, 0
                outputs.after_epoch(stop)
        if stop.signum is None:
            outputs.grid(last_grid_name(run.step))
            if cfg.eval_every:
                outputs.evaluate(stop)  # a finished run's last state is always evaluated
        outputs.tick()
        with stop.writing_checkpoint():
            path = outputs.checkpoint()
        if stop.signum is not None:
            if outputs.main_process:
                print(f"stopped at step {run.step}; checkpoint {path}; continue with --resume", file=sys.stderr)
            return 128 + stop.signum
    print(f"done: {run.step} iterations, {run.nimg} images; checkpoint {path}; samples and losses.png in "
          f"{outputs.samples}")
    return 0


def run_epoch(run, cfg, data, sampler, outputs, stop):
    """Train over the rest of the current epoch; returns True when KIMG or MAX_STEPS is reached."""
    total = sampler.steps_per_epoch
    bar = tqdm(total=total, initial=run.epoch_step, dynamic_ncols=True, file=sys.stdout,
               desc=f"epoch {run.epoch + 1}" + ("" if cfg.kimg else f"/{cfg.epochs}"))
    try:
        for idx in sampler.batches(run.epoch, run.epoch_step):
            if length_reached(run, cfg):
                return True
            values = train_step(run, cfg, data, idx)
            for key in HISTORY_KEYS:
                run.history[key].append(values.get(key, float("nan")))
            run.last.update({k: values[k] for k in BAR_KEYS if k in values})
            if cfg.augment != "none":
                run.last["p"] = values["aug_p"]
            if run.board is not None:
                for key, value in values.items():
                    run.board.add_scalar(f"train/{key}", value, run.step)
            bar.set_postfix({k: f"{v:.3g}" for k, v in run.last.items()}, refresh=False)
            bar.update()
            run.step, run.epoch_step, run.nimg = run.step + 1, run.epoch_step + 1, run.nimg + cfg.batch_size
            set_growth_level(run, cfg)
            outputs.after_step(stop)
            if stop.seen(run.device):
                return False
        return length_reached(run, cfg)
    finally:
        bar.close()


@command
def main(argv=None):
    try:
        with terminate_before_training():
            given, opts = parse_settings(argv, "", __doc__, EXTRA_FLAGS)
            check_settings(given)  # the flags themselves, before the run's folder is touched
            out = out_dir(given, opts)
            main_process = process_rank() == 0
            if main_process:
                writable_folder(out / "Models", "--out-dir", out)
            with RunLock(out / "Models") if main_process else contextlib.nullcontext():
                cfg, state, init = settings(given, opts, out, main_process)
                return train(cfg, state, init)
    except AlreadyTrained as e:  # a finished run resumed again (a requeued job): nothing to do, not an error
        if process_rank() == 0:
            print(e)
        return 0
    except Diverged as e:
        print(f"error: {e}; stopped without saving (the checkpoints already written were not touched)", file=sys.stderr)
        return 1
    except OSError as e:  # writing a sample grid, plot or metrics file: disk full, no permission
        print(f"error: cannot write {e.filename or 'an output file'}: {e.strerror or e} "
              "(the checkpoints already written were not touched)", file=sys.stderr)
        return 1
    except Terminated:
        print("\nSIGTERM before training started: stopped, no checkpoint written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C while stopping
        print("\ninterrupted; nothing saved (the checkpoints already written were not touched)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
