"""Train StyleGAN2 on brain MRI slices.

    python train.py                         # settings from constants.py
    python train.py --preset adni256 --data-root /data/ADNI/AD_NC
    python train.py --resume                # continue from the newest checkpoint in Models/

Every setting in constants.py is a flag (--help lists them). Ctrl-C or SIGTERM saves a checkpoint
and exits; --resume continues exactly where it stopped."""
import deps  # noqa: F401, I001  (first: stops with one line when this Python lacks a package)
import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

import constants
from dataset import EpochSampler, load_slices, to_model_range
from metrics import Evaluator, best_metric, heldout_slices, is_new_best, load_inception
from pretrained import describe, load_pretrained
from training import (
    HISTORY_KEYS,
    TRAINING_KEYS,
    Diverged,
    build_run,
    cache_on_device,
    checkpoint_state,
    initialise,
    restore,
    set_growth_level,
    setup_device,
    train_step,
)
from utils import (
    BEST_CHECKPOINT,
    SUPERSEDED,
    RunLock,
    UserError,
    any_process,
    append_jsonl,
    check_settings,
    checkpoint_path,
    checkpoint_settings,
    checkpoint_step,
    close_distributed,
    config_dict,
    describe_device,
    flag_of,
    list_checkpoints,
    load_checkpoint,
    parse_settings,
    peak_memory_mb,
    plot_losses,
    plot_metrics,
    process_rank,
    prune_checkpoints,
    read_checkpoint,
    read_jsonl,
    resolve_settings,
    same_on_every_process,
    save_checkpoint,
    save_grid,
    save_json,
    seed_everything,
    writable_folder,
)

# Settings that define the network's shape: a resumed run must keep them.
ARCHITECTURE = ("RESOLUTION", "IMAGE_MODE", "Z_DIM", "W_DIM", "MAPPING_LAYERS", "MAPPING_LR_MULT",
                "CHANNEL_BASE", "CHANNEL_MAX", "CONDITIONAL", "MBSTD_GROUP", "SPECTRAL_NORM", "ATTENTION_RES",
                "STYLE_OP", "RESAMPLE", "CONV_CLAMP")
KEPT_ON_RESUME = ARCHITECTURE + ("FREEZE_D",)  # also fixes which parameters D's optimiser holds
RUN_OUTPUTS = ("epoch_*.png", "step_*.png", "fakes_*.png", "reals.png", "losses.png", "metrics.json", "metrics.png",
               "memorisation.png", "config.json")
LOGS = ("stats.jsonl", "metrics.jsonl")  # in OUT_DIR: a line per tick, a line per evaluation
EXTRA_FLAGS = [
    (("--preset",), dict(choices=sorted(constants.PRESETS), help="named set of settings from constants.PRESETS")),
    (("--resume",), dict(nargs="?", const=True, metavar="PATH",
                         help="continue from the newest readable checkpoint in OUT_DIR/Models, or from checkpoint "
                              "file PATH (the run's newer checkpoints move to Models/superseded/)")),
    (("--overwrite",), dict(action="store_true",
                            help="start a fresh run in an OUT_DIR that holds another run's checkpoints: delete "
                                 "them and its sample grids first")),
]


class Terminated(BaseException):
    """SIGTERM before training started (a BaseException, like KeyboardInterrupt: nothing catches it)."""


# ---------------------------------------------------------------------------------------
# Settings and the run's folder
# ---------------------------------------------------------------------------------------
def run_folder(given, opts):
    """OUT_DIR: --out-dir, the preset's, or for --resume PATH the folder whose Models/ holds PATH."""
    preset_dir = constants.PRESETS.get(getattr(opts, "preset", None), {}).get("OUT_DIR")
    resume = getattr(opts, "resume", None)
    if "OUT_DIR" in given or preset_dir:
        return Path(given.get("OUT_DIR", preset_dir))
    if isinstance(resume, str) and Path(resume).parent.name == "Models":
        return Path(resume).parent.parent
    return Path(constants.OUT_DIR)


def settings(given, opts, out, main_process=True):
    """-> (config, checkpoint state or None, initial networks or None). A fresh run needs an OUT_DIR
    whose Models/ holds no other run's checkpoints (or --overwrite, which deletes them); --resume
    takes the checkpoint's settings as the base; --init-from takes the source network's
    architecture. The main process tidies Models/ (it holds the run's lock): unfinished temporary
    files go, and on resume the checkpoints newer than the one resumed move aside."""
    preset, resume = getattr(opts, "preset", None), getattr(opts, "resume", None)
    given = dict(given, OUT_DIR=str(out))
    models = out / "Models"
    if main_process:
        for tmp in models.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
    if resume and "INIT_FROM" in given:
        raise UserError("--init-from starts a new run from a network; drop it to --resume this run")
    if not resume:
        cfg = resolve_settings(given, "", preset)
        cfg.preset = preset
        earlier = run_checkpoints(models)
        if earlier and not getattr(opts, "overwrite", False):
            raise UserError(f"{models} holds another run's checkpoints ({earlier[-1].name}): continue that run with "
                            "--resume, or start this one with another --out-dir (or --overwrite to delete them)")
        init = initial_networks(cfg, given) if cfg.init_from else None
        if earlier and main_process:
            remove_run(out, cfg)
        if main_process:  # logs of a run that left no checkpoint
            for name in LOGS:
                (out / name).unlink(missing_ok=True)
        return cfg, None, init
    state, path = resume_checkpoint(models, resume)
    cfg = resolve_settings(given, "", preset, base=state["config"])
    trained = checkpoint_settings(state)  # settings newer than the checkpoint take their defaults
    for name in KEPT_ON_RESUME:
        old, new = getattr(trained, name.lower()), getattr(cfg, name.lower())
        if old != new:
            raise UserError(f"{flag_of(name)} is {new!r} but {path} was trained with {old!r}; drop it to resume")
    cfg.preset = preset or state["config"].get("preset")
    if main_process:
        supersede_newer(out, state["step"], state["nimg"])
    print(f"resuming from {path} (step {state['step']})")
    return cfg, state, None


def initial_networks(cfg, given):
    """--init-from: the source network as a checkpoint of this toolkit (1-channel for gray data), its
    architecture settings set in `cfg`; a flag given that contradicts them is refused."""
    source, fmt = load_pretrained(cfg.init_from, "gray" if cfg.image_mode == "L" else "keep")
    channels = source["model_args"]["G"]["img_channels"]
    if channels != (1 if cfg.image_mode == "L" else 3):
        raise UserError(f"--image-mode {cfg.image_mode} needs a {'3' if cfg.image_mode == 'RGB' else '1'}-channel "
                        f"network, but --init-from {cfg.init_from} has {channels} channel(s)")
    arch = checkpoint_settings(source)
    for name in ARCHITECTURE:
        theirs = getattr(arch, name.lower())
        if name != "IMAGE_MODE" and name in given and given[name] != theirs:
            raise UserError(f"{flag_of(name)} is {given[name]!r} but --init-from {cfg.init_from} has {theirs!r}; "
                            "drop it (the architecture comes from the network)")
        if name != "IMAGE_MODE":
            setattr(cfg, name.lower(), theirs)
    print(f"initialising from {cfg.init_from} ({fmt}): {describe(source)}")
    return source


def run_checkpoints(models):
    """The checkpoints a run left in Models/ (best.pt last)."""
    best = models / BEST_CHECKPOINT
    return list_checkpoints(models) + ([best] if best.is_file() else [])


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
    if path.resolve().parent != models.resolve() and run_checkpoints(models):
        raise UserError(f"{models} holds another run's checkpoints: resume {path} with another --out-dir")
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


def remove_run(out, cfg):
    """--overwrite: delete the earlier run's checkpoints (superseded ones too), its logs, and the
    sample grids, plots and metrics train.py wrote at this resolution."""
    models, samples = out / "Models", out / "saved_examples" / f"{cfg.resolution}x{cfg.resolution}"
    doomed = run_checkpoints(models) + [p for pattern in RUN_OUTPUTS for p in samples.glob(pattern)]
    doomed += [out / name for name in LOGS if (out / name).is_file()]
    for p in doomed:
        p.unlink(missing_ok=True)
    shutil.rmtree(models / SUPERSEDED, ignore_errors=True)
    print(f"--overwrite: deleted {len(doomed)} files of the earlier run in {out}", file=sys.stderr)


def fixed_latents(cfg, num_classes, device):
    """The latents of every sample grid: the same for every grid of a run (seeded by SEED)."""
    z = torch.randn(cfg.sample_count, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    labels = (torch.arange(cfg.sample_count) * num_classes // cfg.sample_count).to(device) if num_classes else None
    return z, labels


@torch.no_grad()
def save_samples(run, latents, path):
    z, labels = latents
    images = run.G_ema(z, labels, noise_mode="const")
    save_grid(images, path, ncol=8)
    if run.board is not None:
        from torchvision.utils import make_grid
        run.board.add_image("samples", make_grid((images.cpu().clamp(-1, 1) + 1) / 2, nrow=8), run.step)


def save_reals(data, cfg, path):
    """A grid of training slices as the model sees them (a seeded choice, class by class)."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.sample_count]
    pick = pick[torch.argsort(data.labels[pick], stable=True)]
    save_grid(to_model_range(data.images[pick]), path, ncol=8)


# ---------------------------------------------------------------------------------------
# Evaluation during training and TensorBoard
# ---------------------------------------------------------------------------------------
def make_evaluator(cfg, data, device):
    """(Evaluator with the real-image statistics, name of the metric that picks best.pt), or (None, None)."""
    if not cfg.eval_every:
        return None, None
    inception = load_inception(cfg.inception_weights, device)
    metric = best_metric(cfg.eval_metric, inception)
    evaluator = Evaluator(data.images, data.labels, min(cfg.eval_n, len(data)), cfg.seed, inception,
                          heldout=heldout_slices(cfg, data))
    every = f"{cfg.snapshot_kimg:g} kimg" if cfg.snapshot_kimg else f"{cfg.eval_every} epochs"
    print(f"evaluation every {every} on {evaluator.n} images; Models/best.pt by {metric}")
    return evaluator, metric


def evaluate_now(run, cfg, evaluator, metric, save_best, samples):
    """Evaluate G_ema, log (OUT_DIR/metrics.jsonl) and plot the figures, and keep Models/best.pt by
    `metric` (lower is better) among the evaluations that copy little enough (--eval-max-copy-rate)."""
    figures = evaluator(run.G_ema, run.device, D=run.D)
    new_best = is_new_best(run.metrics, figures, metric, cfg.eval_max_copy_rate)
    run.metrics.append(dict(epoch=run.epoch, step=run.step, nimg=run.nimg, **figures))
    append_jsonl(dict(kimg=run.nimg / 1000, nimg=run.nimg, step=run.step, epoch=run.epoch, time_s=run.seconds,
                      train_s=run.seconds - run.maintenance_seconds, **figures), Path(cfg.out_dir) / "metrics.jsonl")
    printed = ("swd", "fid", "kid", "ms_ssim_fake", "precision", "recall", "d_overfit", "copy_rate")
    shown = {k: v for k, v in figures.items() if k in printed}
    tqdm.write(f"kimg {run.nimg / 1000:g} (epoch {run.epoch}) evaluation: "
               + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    save_json(run.metrics, samples / "metrics.json")
    plot_metrics(run.metrics, samples / "metrics.png")
    evaluator.save_memorisation_figure(samples / "memorisation.png")
    if run.board is not None:
        for key, value in figures.items():
            run.board.add_scalar(f"metrics/{key}", value, run.step)
    if new_best:
        save_best()
    elif figures.get("copy_rate", 0.0) > cfg.eval_max_copy_rate:
        tqdm.write(f"not kept as best.pt: copy_rate {figures['copy_rate']:.3g} is above --eval-max-copy-rate "
                   f"{cfg.eval_max_copy_rate:g}")


def open_tensorboard(cfg):
    """A SummaryWriter on OUT_DIR/runs when --tensorboard, else None."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(Path(cfg.out_dir) / "runs"))


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag checked after each iteration (by every process at the same
    iteration: `signum` is set once any process has seen one). A repeated SIGTERM changes nothing;
    a second SIGINT (Ctrl-C twice) stops at once, except while a checkpoint is being written."""

    def __init__(self):
        self.signum, self.received, self.previous, self.writing = None, None, {}, False

    def seen(self, device):
        if any_process(self.received is not None, device):
            self.signum = self.received or signal.SIGTERM
        return self.signum is not None

    @contextlib.contextmanager
    def writing_checkpoint(self):
        """A checkpoint write that a second Ctrl-C does not cut short."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this iteration", file=sys.stderr)
        elif signum == signal.SIGINT and not self.writing:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def terminate_before_training():
    """SIGTERM outside the training loop (loading data, building the networks) raises Terminated;
    repeats are ignored. The loop's StopSignal takes over while it runs."""
    def handle(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
def train(cfg, state=None, init=None):
    """Train until EPOCHS (or MAX_STEPS) or a stop signal, from scratch, from a checkpoint `state`
    (resume) or from the networks of `init` (--init-from). Returns the exit status."""
    try:
        rank, world_size, device = setup_device(cfg)
        return train_on(cfg, state, rank, world_size, device, init)
    finally:
        close_distributed()


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
        initialise(run, init, data)
    if state is not None:
        restore(run, state, cfg, data)
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


class TrainingStats:
    """OUT_DIR/stats.jsonl: a line every TICK_KIMG (and at the end) with the wall time, the speed
    (sec_per_kimg and img_per_s leave out maintenance_s: grids, evaluations, checkpoints), the means
    over the tick of the losses and penalties, ADA's r_t, augmentation p, learning rates, peak memory."""

    def __init__(self, run, path):
        self.run, self.path = run, path
        self.origin = time.perf_counter() - run.seconds  # wall time continues across resumes
        self.mark()

    def seconds(self):
        return time.perf_counter() - self.origin

    def mark(self):
        self.time, self.nimg, self.index, self.maintenance = (self.seconds(), self.run.nimg,
                                                              len(self.run.history["loss_gen"]), 0.0)

    @contextlib.contextmanager
    def maintaining(self):
        """Time spent outside training iterations."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.maintenance += spent
            self.run.maintenance_seconds += spent

    def write(self):
        run = self.run
        if run.nimg == self.nimg:
            return
        now = self.seconds()
        busy, kimg = max(now - self.time - self.maintenance, 1e-9), (run.nimg - self.nimg) / 1000
        line = dict(kimg=run.nimg / 1000, nimg=run.nimg, step=run.step, epoch=run.epoch, time_s=now,
                    train_s=now - run.maintenance_seconds, sec_per_kimg=busy / kimg, img_per_s=1000 * kimg / busy,
                    maintenance_s=self.maintenance)
        for key in HISTORY_KEYS:
            values = [v for v in run.history[key][self.index:] if math.isfinite(v)]
            name = "r_t" if key == "real_sign" else key
            line[name] = (values[-1] if key == "aug_p" else sum(values) / len(values)) if values else None
        line.update(lr_G=run.opt_G.param_groups[0]["lr"], lr_D=run.opt_D.param_groups[0]["lr"],
                    mem_mb=peak_memory_mb(run.device))
        append_jsonl(line, self.path)
        self.mark()


def crossed(nimg, batch, kimg):
    """Whether the last batch (of `batch` images) took the count `nimg` past a multiple of `kimg` thousand."""
    every = round(kimg * 1000)
    return every > 0 and nimg // every > (nimg - batch) // every


def length_reached(run, cfg):
    """KIMG (when set) or MAX_STEPS reached; EPOCHS is the loop's own condition."""
    return (bool(cfg.kimg) and run.nimg >= round(cfg.kimg * 1000)) or (bool(cfg.max_steps)
                                                                       and run.step >= cfg.max_steps)


class RunOutputs:
    """What a run writes to OUT_DIR (the main process only): sample grids from fixed latents,
    checkpoints (pruned to the run's own newest), evaluations and best.pt, the loss plot, and the
    stats.jsonl and metrics.jsonl logs. Snapshots come by epochs (SAMPLE_EVERY, CHECKPOINT_EVERY,
    EVAL_EVERY), or with SNAPSHOT_KIMG every that many thousand images."""

    def __init__(self, run, cfg, state, main_process, evaluation=None):
        out = Path(cfg.out_dir)
        self.models, self.samples = out / "Models", out / "saved_examples" / f"{cfg.resolution}x{cfg.resolution}"
        self.run, self.cfg, self.main_process = run, cfg, main_process
        self.evaluator, self.metric = evaluation or (None, None)
        self.latents = fixed_latents(cfg, run.model_args["G"]["num_classes"], run.device)
        self.kept = list_checkpoints(self.models)  # the run's checkpoints: Models/ holds no other run's
        resumed = state is not None and checkpoint_path(self.models, state["step"]).is_file()
        self.written = state["step"] if resumed else None  # the step the newest checkpoint holds
        self.stats = TrainingStats(run, out / "stats.jsonl")

    def grid(self, name):
        if self.main_process:
            with self.stats.maintaining():
                save_samples(self.run, self.latents, self.samples / name)

    def checkpoint(self):
        """Write checkpoint_<step>.pt (once per step), prune, plot the losses; returns its path."""
        run = self.run
        assert same_on_every_process([*run.G.parameters(), *run.D.parameters()]), "replicas diverged"
        path = checkpoint_path(self.models, run.step)
        if self.main_process and self.written != run.step:
            with self.stats.maintaining():
                run.seconds = self.stats.seconds()
                save_checkpoint(checkpoint_state(run, self.cfg), path)
                self.written = run.step
                self.kept = prune_checkpoints(self.kept + [path], self.cfg.keep_checkpoints)
                plot_losses(run.history, self.samples / "losses.png")
        return path

    def evaluate(self, stop):
        """Evaluate G_ema (once per step) and keep best.pt (a write that a second Ctrl-C does not cut short)."""
        if self.evaluator is None or (self.run.metrics and self.run.metrics[-1]["step"] == self.run.step):
            return
        best = stop.writing_checkpoint()(lambda: save_checkpoint(checkpoint_state(self.run, self.cfg),
                                                                 self.models / BEST_CHECKPOINT))
        with self.stats.maintaining():
            self.run.seconds = self.stats.seconds()
            evaluate_now(self.run, self.cfg, self.evaluator, self.metric, best, self.samples)

    def tick(self):
        if self.main_process:
            self.stats.write()

    def snapshot(self, stop, grid=True, evaluate=True, checkpoint=True, name=None):
        """A sample grid, an evaluation and a checkpoint, each when asked for."""
        if grid:
            self.grid(name or f"fakes_{self.run.nimg // 1000:06d}.png")
        if evaluate:
            self.evaluate(stop)
        if checkpoint:
            with stop.writing_checkpoint():
                self.checkpoint()

    def after_epoch(self, stop):
        epoch, cfg = self.run.epoch, self.cfg
        if not cfg.snapshot_kimg:
            self.snapshot(stop, epoch % cfg.sample_every == 0, bool(cfg.eval_every) and epoch % cfg.eval_every == 0,
                          epoch % cfg.checkpoint_every == 0, name=f"epoch_{epoch:04d}.png")

    def after_step(self, stop):
        run, cfg = self.run, self.cfg
        if crossed(run.nimg, cfg.batch_size, cfg.tick_kimg):
            self.tick()
        if crossed(run.nimg, cfg.batch_size, cfg.snapshot_kimg):
            self.snapshot(stop, evaluate=bool(cfg.eval_every))


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
            outputs.grid(f"step_{run.step:08d}.png")
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
            run.last.update({k: values[k] for k in ("gp", "loss_critic", "loss_gen", "plp") if k in values})
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


def main(argv=None):
    try:
        with terminate_before_training():
            given, opts = parse_settings(argv, "", __doc__, EXTRA_FLAGS)
            check_settings(given)  # the flags themselves, before the run's folder is touched
            out = run_folder(given, opts)
            main_process = process_rank() == 0
            if main_process:
                writable_folder(out / "Models", "--out-dir", out)
            with RunLock(out / "Models") if main_process else contextlib.nullcontext():
                cfg, state, init = settings(given, opts, out, main_process)
                return train(cfg, state, init)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}; stopped without saving (the last checkpoint is intact)", file=sys.stderr)
        return 1
    except OSError as e:  # writing a sample grid, plot or metrics file: disk full, no permission
        print(f"error: cannot write {e.filename or 'an output file'}: {e.strerror or e} "
              "(the checkpoints already written are intact)", file=sys.stderr)
        return 1
    except Terminated:
        print("\nSIGTERM before training started: stopped, no checkpoint written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C while stopping
        print("\ninterrupted; nothing saved (checkpoints already written are intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
