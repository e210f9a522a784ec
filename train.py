"""Train StyleGAN2 on brain MRI slices.

    python train.py                         # settings from constants.py
    python train.py --preset adni256 --data-root /data/ADNI/AD_NC
    python train.py --resume                # continue from the newest checkpoint in Models/

Every setting in constants.py is a flag (--help lists them). Ctrl-C or SIGTERM saves a checkpoint
and exits; --resume continues exactly where it stopped."""
import contextlib
import copy
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

import constants
from augment import AugmentPipe, ada_update, random_flips, random_rotation_and_jitter
from dataset import EpochSampler, load_slices, to_model_range
from evaluate import Evaluator, best_metric, heldout_slices, load_inception
from modules import Discriminator, Generator, at_growth_level
from ops import use_fast_kernels
from utils import (
    BEST_CHECKPOINT,
    CHECKPOINT_KEYS,
    SUPERSEDED,
    RunLock,
    UserError,
    all_reduce_mean,
    any_process,
    check_settings,
    checkpoint_path,
    checkpoint_settings,
    checkpoint_step,
    close_distributed,
    config_dict,
    d_logistic_loss,
    d_wgan_loss,
    describe_device,
    ema_beta,
    ema_update,
    flag_of,
    g_nonsaturating_loss,
    g_wgan_loss,
    gradient_penalty,
    growth_level,
    init_distributed,
    list_checkpoints,
    load_checkpoint,
    lr_factor,
    parse_settings,
    path_length_penalty,
    plot_losses,
    plot_metrics,
    process_rank,
    prune_checkpoints,
    r1_penalty,
    read_checkpoint,
    resolve_device,
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
                "CHANNEL_BASE", "CHANNEL_MAX", "CONDITIONAL", "MBSTD_GROUP", "SPECTRAL_NORM", "ATTENTION_RES")
TRAINING_KEYS = CHECKPOINT_KEYS + ("G", "D", "opt_G", "opt_D", "epoch", "epoch_nimg", "pl_mean", "rng")  # to resume
HISTORY_KEYS = ("loss_gen", "loss_critic", "gp", "plp", "real_score", "fake_score", "real_sign", "aug_p")
RUN_OUTPUTS = ("epoch_*.png", "step_*.png", "reals.png", "losses.png", "metrics.json", "metrics.png", "config.json")
EXTRA_FLAGS = [
    (("--preset",), dict(choices=sorted(constants.PRESETS), help="named set of settings from constants.PRESETS")),
    (("--resume",), dict(nargs="?", const=True, metavar="PATH",
                         help="continue from the newest readable checkpoint in OUT_DIR/Models, or from checkpoint "
                              "file PATH (the run's newer checkpoints move to Models/superseded/)")),
    (("--overwrite",), dict(action="store_true",
                            help="start a fresh run in an OUT_DIR that holds another run's checkpoints: delete "
                                 "them and its sample grids first")),
]


class Diverged(Exception):
    """A loss or gradient became NaN or infinite."""


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
    """-> (config, checkpoint state or None). A fresh run needs an OUT_DIR whose Models/ holds no
    other run's checkpoints (or --overwrite, which deletes them); --resume takes the checkpoint's
    settings as the base. The main process tidies Models/ (it holds the run's lock): unfinished
    temporary files go, and on resume the checkpoints newer than the one resumed move aside."""
    preset, resume = getattr(opts, "preset", None), getattr(opts, "resume", None)
    given = dict(given, OUT_DIR=str(out))
    models = out / "Models"
    if main_process:
        for tmp in models.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
    if not resume:
        cfg = resolve_settings(given, "", preset)
        cfg.preset = preset
        earlier = run_checkpoints(models)
        if earlier and not getattr(opts, "overwrite", False):
            raise UserError(f"{models} holds another run's checkpoints ({earlier[-1].name}): continue that run with "
                            "--resume, or start this one with another --out-dir (or --overwrite to delete them)")
        if earlier and main_process:
            remove_run(out, cfg)
        return cfg, None
    state, path = resume_checkpoint(models, resume)
    cfg = resolve_settings(given, "", preset, base=state["config"])
    trained = checkpoint_settings(state)  # settings newer than the checkpoint take their defaults
    for name in ARCHITECTURE:
        old, new = getattr(trained, name.lower()), getattr(cfg, name.lower())
        if old != new:
            raise UserError(f"{flag_of(name)} is {new!r} but {path} was trained with {old!r}; drop it to resume")
    cfg.preset = preset or state["config"].get("preset")
    if main_process:
        supersede_newer(models, state["step"])
    print(f"resuming from {path} (step {state['step']})")
    return cfg, state


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


def supersede_newer(models, step):
    """Move the checkpoints of Models/ newer than `step` (unreadable ones passed over, or the later
    branch when resuming an older checkpoint, best.pt included) to Models/superseded/<time>/: the
    run never mixes them with its own, and nothing is deleted."""
    newer = [p for p in list_checkpoints(models) if checkpoint_step(p) > step]
    if not newer:
        return
    best = models / BEST_CHECKPOINT
    if best.is_file() and best_step(best) > step:
        newer.append(best)
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    while (folder := models / SUPERSEDED / (stamp + (f"-{n}" if n else ""))).exists():
        n += 1
    folder.mkdir(parents=True)
    for p in newer:
        os.replace(p, folder / p.name)
    print(f"moved {len(newer)} checkpoint(s) newer than step {step} to {folder}", file=sys.stderr)


def best_step(path):
    """The step of best.pt (one that cannot be read counts as newer than any)."""
    try:
        return read_checkpoint(path)["step"]
    except (UserError, KeyError, TypeError):
        return math.inf


def remove_run(out, cfg):
    """--overwrite: delete the earlier run's checkpoints (superseded ones too), and the sample grids,
    plots and metrics train.py wrote at this resolution."""
    models, samples = out / "Models", out / "saved_examples" / f"{cfg.resolution}x{cfg.resolution}"
    doomed = run_checkpoints(models) + [p for pattern in RUN_OUTPUTS for p in samples.glob(pattern)]
    for p in doomed:
        p.unlink(missing_ok=True)
    shutil.rmtree(models / SUPERSEDED, ignore_errors=True)
    print(f"--overwrite: deleted {len(doomed)} files of the earlier run in {out}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# Models, optimisers, lazy regularisation
# ---------------------------------------------------------------------------------------
def reg_intervals(cfg):
    """Lazy regularisation as data: {network: iterations between its penalty (0: none)}."""
    d_weight = cfg.gp_lambda + cfg.wgan_r1_gamma if cfg.loss == "wgan-gp" else cfg.r1_gamma
    return {"G": cfg.pl_interval if cfg.pl_weight > 0 else 0, "D": cfg.d_reg_interval if d_weight > 0 else 0}


def lazy_ratio(interval):
    """A penalty every r steps takes 1/(r+1) of the optimiser steps: Adam's lr and betas use c = r/(r+1)."""
    return interval / (interval + 1) if interval else 1.0


def build_run(cfg, data, device):
    """Networks, EMA copy and optimisers for a fresh run."""
    num_classes = len(data.class_names) if cfg.conditional else 0
    if cfg.attention_res and not (8 <= cfg.attention_res <= cfg.resolution and cfg.attention_res.bit_count() == 1):
        raise UserError(f"--attention-res {cfg.attention_res}: use 0 or a power of two from 8 to --resolution "
                        f"{cfg.resolution}")
    model_args = dict(
        G=dict(z_dim=cfg.z_dim, w_dim=cfg.w_dim, mapping_layers=cfg.mapping_layers, resolution=cfg.resolution,
               img_channels=data.channels, num_classes=num_classes, channel_base=cfg.channel_base,
               channel_max=cfg.channel_max, mapping_lr_mult=cfg.mapping_lr_mult, w_avg_beta=cfg.w_avg_beta,
               attention_res=cfg.attention_res),
        D=dict(resolution=cfg.resolution, img_channels=data.channels, num_classes=num_classes,
               channel_base=cfg.channel_base, channel_max=cfg.channel_max, mbstd_group=cfg.mbstd_group,
               spectral_norm=cfg.spectral_norm, attention_res=cfg.attention_res))
    G = Generator(**model_args["G"]).to(device)
    D = Discriminator(**model_args["D"]).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    intervals = reg_intervals(cfg)
    betas = {net: tuple(b ** lazy_ratio(intervals[net]) for b in cfg.adam_betas) for net in "GD"}
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.g_lr, betas=betas["G"])
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.d_lr, betas=betas["D"])
    synthesis, D_main = compiled([G.synthesis, D], device) if cfg.compile else (G.synthesis, D)
    return SimpleNamespace(G=G, D=D, G_ema=G_ema, opt_G=opt_G, opt_D=opt_D, model_args=model_args,
                           synthesis=synthesis, D_main=D_main, amp=cfg.amp and device.type == "cuda",
                           augment=AugmentPipe() if cfg.augment != "none" else None,
                           aug_p=cfg.augment_p if cfg.augment != "none" else 0.0, ada_signs=[],
                           intervals=intervals, class_names=data.class_names, device=device,
                           pl_mean=torch.zeros([], device=device), step=0, epoch=0, epoch_step=0, nimg=0,
                           history={k: [] for k in HISTORY_KEYS}, metrics=[], last={}, board=None)


def compiled(modules, device):
    """torch.compile each module (sharing its parameters), or return them as they are, with a warning,
    where torch.compile does not work. The double-backward penalties always run the eager modules."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
    except Exception as e:  # no C compiler, no Triton, an unsupported platform, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        print(f"warning: --compile: torch.compile does not work here ({type(e).__name__}: {reason}); "
              "training runs eagerly", file=sys.stderr)
        return modules
    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile later runs eagerly
    return [torch.compile(m) for m in modules]


def set_learning_rates(run, cfg):
    factor = lr_factor(cfg, run.step, run.epoch)
    for opt, lr, net in ((run.opt_G, cfg.g_lr, "G"), (run.opt_D, cfg.d_lr, "D")):
        for group in opt.param_groups:
            group["lr"] = lr * lazy_ratio(run.intervals[net]) * factor


# ---------------------------------------------------------------------------------------
# One iteration: D main, D penalty (lazy), G main, path length (lazy), EMA
# ---------------------------------------------------------------------------------------
def optimizer_step(opt, loss):
    """Backward and step; returns the gradient norm (checked for NaN/inf with the losses)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = all_reduce_mean([p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None])
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    opt.step()
    return norm.detach()


def autocast(run):
    """bf16 autocast on CUDA with --amp; nothing otherwise."""
    return torch.autocast("cuda", torch.bfloat16) if run.amp else contextlib.nullcontext()


def generate(run, cfg, z, labels, update_w_avg=False):
    """G's training forward: mapping with style mixing, then the (compiled, autocast) synthesis;
    a growing generator (--progressive) runs eagerly, as its graph changes with the level."""
    ws = run.G.make_ws(z, labels, mixing_prob=cfg.style_mixing_prob, update_w_avg=update_w_avg)
    synthesis = run.synthesis if run.G.synthesis.level is None else run.G.synthesis
    with autocast(run):
        return synthesis(ws)


def set_growth_level(run, cfg):
    """--progressive: the growth level of G and G_ema after run.nimg images (None: fully grown)."""
    level = growth_level(run.nimg, cfg.progressive_kimg, cfg.resolution) if cfg.progressive else None
    run.G.synthesis.level = run.G_ema.synthesis.level = level


def augment(run, images):
    """The augmentation every image D sees goes through (--augment ada|fixed), with probability p."""
    return run.augment(images, run.aug_p) if run.augment is not None else images


def discriminate(run, images, labels):
    """D's main forward on augmented images (compiled, autocast), scores in float32."""
    with autocast(run):
        return run.D_main(augment(run, images), labels).float()


def overfitting_sign(real_pred, fake_pred, loss):
    """ADA's r_t term, E[sign(D(real))]; a WGAN critic has no fixed zero, so there the reals' scores
    are taken relative to the mean fake score."""
    zero = fake_pred.mean() if loss == "wgan-gp" else 0.0
    return (real_pred - zero).sign().mean().detach()


def d_step(run, cfg, real, labels, regularize):
    D = run.D
    z = torch.randn(len(real), cfg.z_dim, device=real.device)
    with torch.no_grad():
        fake = generate(run, cfg, z, labels).float()
    real_pred, fake_pred = discriminate(run, real, labels), discriminate(run, fake, labels)
    if cfg.loss == "wgan-gp":
        loss = d_wgan_loss(real_pred, fake_pred, cfg.drift)
    else:
        loss = d_logistic_loss(real_pred, fake_pred)
    stats = dict(loss_critic=loss.detach(), real_score=real_pred.mean().detach(),
                 fake_score=fake_pred.mean().detach(), grad_d=optimizer_step(run.opt_D, loss))
    if run.augment is not None:
        stats["real_sign"] = overfitting_sign(real_pred, fake_pred, cfg.loss)
    if regularize:
        total, shown = 0.0, None  # the penalty's loss, and the value logged as `gp`
        if cfg.loss == "wgan-gp" and cfg.gp_lambda > 0:
            gp = gradient_penalty(lambda x: D(augment(run, x), labels), real, fake)
            total, shown = gp * cfg.gp_lambda, gp
        r1_gamma = cfg.r1_gamma if cfg.loss == "logistic" else cfg.wgan_r1_gamma  # seed 002: R1 beside the GP
        if r1_gamma > 0:
            real = real.detach().requires_grad_(True)
            r1 = r1_penalty(D(augment(run, real), labels), real)
            total = total + r1 * (r1_gamma / 2)
            if shown is None:
                shown = r1
            else:  # beside the gradient penalty: logged on its own
                stats["r1"] = r1.detach()
        stats["grad_d_reg"] = optimizer_step(run.opt_D, total * run.intervals["D"])
        stats["gp"] = shown.detach()
    return stats


def g_step(run, cfg, labels, batch_size, regularize):
    G, D = run.G, run.D
    D.requires_grad_(False)
    z = torch.randn(batch_size, cfg.z_dim, device=run.device)
    fake_pred = discriminate(run, generate(run, cfg, z, labels, update_w_avg=True), labels)
    loss = g_wgan_loss(fake_pred) if cfg.loss == "wgan-gp" else g_nonsaturating_loss(fake_pred)
    stats = dict(loss_gen=loss.detach(), grad_g=optimizer_step(run.opt_G, loss))
    if regularize:
        n = max(1, batch_size // cfg.pl_batch_shrink)
        sub = labels[:n] if labels is not None else None
        ws = G.make_ws(torch.randn(n, cfg.z_dim, device=run.device), sub, mixing_prob=cfg.style_mixing_prob)
        penalty, run.pl_mean = path_length_penalty(G.synthesis(ws), ws, run.pl_mean, cfg.pl_decay)
        stats["grad_g_reg"] = optimizer_step(run.opt_G, penalty * cfg.pl_weight * run.intervals["G"])
        stats["plp"] = penalty.detach()
    D.requires_grad_(True)
    return stats


def train_step(run, cfg, data, idx):
    """One iteration on the batch of dataset indices `idx`; returns {name: float}."""
    real = random_flips(to_model_range(data.images[idx].to(run.device, non_blocking=True)), cfg.hflip, cfg.vflip)
    real = at_growth_level(random_rotation_and_jitter(real, cfg.rotate, cfg.jitter), run.G.synthesis.level)
    labels = data.labels[idx].to(run.device) if cfg.conditional else None
    set_learning_rates(run, cfg)
    due = {net: bool(r) and run.step % r == 0 for net, r in run.intervals.items()}
    stats = d_step(run, cfg, real, labels, due["D"])
    stats.update(g_step(run, cfg, labels, len(real), due["G"]))
    values = torch.stack([v.float() for v in stats.values()])
    all_reduce_mean([values, run.G.mapping.w_avg, run.pl_mean])  # several processes: their mean
    ema_update(run.G_ema, run.G, ema_beta(cfg.batch_size, cfg.ema_kimg, cfg.ema_rampup, run.nimg))
    values = dict(zip(stats, values.tolist()))  # one sync
    if cfg.augment == "ada":
        adapt_augmentation(run, cfg, values["real_sign"])
    values["aug_p"] = run.aug_p
    for name, value in values.items():
        if not math.isfinite(value):
            raise Diverged(f"non-finite {name} ({value}) at step {run.step}")
    return values


def adapt_augmentation(run, cfg, real_sign):
    """Every ADA_INTERVAL iterations, move p by the overfitting heuristic r_t of those iterations."""
    run.ada_signs.append(real_sign)
    if len(run.ada_signs) == cfg.ada_interval:
        rt = sum(run.ada_signs) / len(run.ada_signs)
        run.aug_p = ada_update(run.aug_p, rt, cfg.ada_target, cfg.ada_interval * cfg.batch_size, cfg.ada_kimg)
        run.ada_signs = []


# ---------------------------------------------------------------------------------------
# Checkpoints and samples
# ---------------------------------------------------------------------------------------
def checkpoint_state(run, cfg):
    """Everything needed to resume exactly, and to generate with no extra flags."""
    cuda = run.device.type == "cuda"
    return dict(
        version=1, config=config_dict(cfg), model_args=run.model_args, class_names=list(run.class_names),
        G=run.G.state_dict(), D=run.D.state_dict(), G_ema=run.G_ema.state_dict(),
        opt_G=run.opt_G.state_dict(), opt_D=run.opt_D.state_dict(),
        step=run.step, epoch=run.epoch, epoch_nimg=run.epoch_step * cfg.batch_size, nimg=run.nimg,
        pl_mean=run.pl_mean.detach().cpu(), augment_p=run.aug_p, ada_signs=list(run.ada_signs),
        history={k: torch.tensor(v, dtype=torch.float32) for k, v in run.history.items()}, metrics=run.metrics,
        rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if cuda else []))


def restore(run, state, cfg, data):
    if state["class_names"] != list(data.class_names) and cfg.conditional:
        raise UserError(f"--data-root classes {data.class_names} differ from the checkpoint's {state['class_names']}")
    for name in ("G", "D", "G_ema", "opt_G", "opt_D"):
        getattr(run, name).load_state_dict(state[name])
    run.step, run.epoch, run.nimg = state["step"], state["epoch"], state["nimg"]
    run.epoch_step = state["epoch_nimg"] // cfg.batch_size
    run.pl_mean = state["pl_mean"].to(run.device)
    if cfg.augment == "ada":  # p continues where it was (a fixed p is the setting's)
        run.aug_p, run.ada_signs = state.get("augment_p", cfg.augment_p), list(state.get("ada_signs", []))
    run.history = {k: state["history"][k].tolist() if k in state["history"] else [] for k in HISTORY_KEYS}
    run.metrics = list(state.get("metrics", []))
    torch.set_rng_state(state["rng"]["torch"])
    if run.device.type == "cuda" and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


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
    print(f"evaluation every {cfg.eval_every} epochs on {evaluator.n} images; Models/best.pt by {metric}")
    return evaluator, metric


def evaluate_now(run, cfg, evaluator, metric, save_best, samples):
    """Evaluate G_ema, log and plot the figures, and keep Models/best.pt by `metric` (lower is better)."""
    figures = evaluator(run.G_ema, run.device, D=run.D)
    previous = [m[metric] for m in run.metrics if metric in m]
    run.metrics.append(dict(epoch=run.epoch, step=run.step, nimg=run.nimg, **figures))
    printed = ("swd", "fid", "kid", "ms_ssim_fake", "precision", "recall", "d_overfit")
    shown = {k: v for k, v in figures.items() if k in printed}
    tqdm.write(f"epoch {run.epoch} evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    save_json(run.metrics, samples / "metrics.json")
    plot_metrics(run.metrics, samples / "metrics.png")
    if run.board is not None:
        for key, value in figures.items():
            run.board.add_scalar(f"metrics/{key}", value, run.step)
    if not previous or figures[metric] < min(previous):
        save_best()


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
def setup_device(cfg):
    """-> (rank, world_size, device): the device, the torchrun process group when there is one, and
    the fast CUDA settings (TF32 matrix products and convolutions, cuDNN's autotuner)."""
    rank, world_size, device = init_distributed(resolve_device(cfg.device))
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # one process speaks: rank 0
    if cfg.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly across {world_size} processes")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    use_fast_kernels(device, cfg.winograd)
    return rank, world_size, device


def cache_on_device(data, cfg, device):
    """CUDA: move the uint8 image cache into GPU memory (CACHE_ON_DEVICE, if under a quarter of it),
    else pin it, so batches never wait for the host."""
    if device.type != "cuda":
        return
    size = data.images.numel() * data.images.element_size()
    if cfg.cache_on_device and size < torch.cuda.get_device_properties(device).total_memory / 4:
        data.images, data.labels = data.images.to(device), data.labels.to(device)
        print(f"image cache: {size / 2**20:.0f} MB in GPU memory")
    else:
        data.images = data.images.pin_memory()


def train(cfg, state=None):
    """Train until EPOCHS (or MAX_STEPS) or a stop signal. Returns the exit status."""
    try:
        rank, world_size, device = setup_device(cfg)
        return train_on(cfg, state, rank, world_size, device)
    finally:
        close_distributed()


def train_on(cfg, state, rank, world_size, device):
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
    if state is not None:
        restore(run, state, cfg, data)
    set_growth_level(run, cfg)
    if world_size > 1:  # each process draws its own latents and flips from here on
        seed_everything(cfg.seed + 1_000_003 * rank + run.step)
    main_process = rank == 0
    evaluator, metric = make_evaluator(cfg, data, device) if main_process else (None, None)
    run.board = open_tensorboard(cfg) if main_process else None
    if run.epoch_step >= sampler.steps_per_epoch:
        run.epoch, run.epoch_step = run.epoch + 1, 0
    out = Path(cfg.out_dir)
    models, samples = out / "Models", out / "saved_examples" / f"{cfg.resolution}x{cfg.resolution}"
    if main_process:
        save_json(config_dict(cfg), samples / "config.json")
        save_reals(data, cfg, samples / "reals.png")
    cache_on_device(data, cfg, device)
    latents = fixed_latents(cfg, run.model_args["G"]["num_classes"], device)
    print(f"G {sum(p.numel() for p in run.G.parameters()) / 1e6:.2f}M params, "
          f"D {sum(p.numel() for p in run.D.parameters()) / 1e6:.2f}M params; "
          f"{sampler.steps_per_epoch} iterations per epoch; outputs in {models} and {samples}")

    kept = list_checkpoints(models)  # this run's checkpoints: Models/ holds no other run's (see settings)
    written = {"step": state["step"] if state is not None and checkpoint_path(models, state["step"]).is_file()
               else None}  # the step of the newest checkpoint in Models/ that holds this run's state

    def save():
        assert same_on_every_process([*run.G.parameters(), *run.D.parameters()]), "replicas diverged"
        path = checkpoint_path(models, run.step)
        if main_process and written["step"] != run.step:
            save_checkpoint(checkpoint_state(run, cfg), path)
            written["step"] = run.step
            kept[:] = prune_checkpoints(kept + [path], cfg.keep_checkpoints)
            plot_losses(run.history, samples / "losses.png")
        return path

    def save_best():
        save_checkpoint(checkpoint_state(run, cfg), models / BEST_CHECKPOINT)

    try:
        return train_loop(run, cfg, data, sampler, latents, evaluator, metric, save, save_best, samples,
                          main_process)
    finally:
        if run.board is not None:
            run.board.close()


def train_loop(run, cfg, data, sampler, latents, evaluator, metric, save, save_best, samples, main_process):
    """Epochs until EPOCHS, MAX_STEPS or a stop signal, with samples, evaluations and checkpoints
    (written by the main process)."""
    with StopSignal() as stop:
        finished = False
        while run.epoch < cfg.epochs and not finished and stop.signum is None:
            finished = run_epoch(run, cfg, data, sampler, stop)
            if run.epoch_step == sampler.steps_per_epoch:
                run.epoch, run.epoch_step = run.epoch + 1, 0
                if main_process and run.epoch % cfg.sample_every == 0:
                    save_samples(run, latents, samples / f"epoch_{run.epoch:04d}.png")
                if evaluator is not None and run.epoch % cfg.eval_every == 0:
                    evaluate_now(run, cfg, evaluator, metric, stop.writing_checkpoint()(save_best), samples)
                if run.epoch % cfg.checkpoint_every == 0:
                    with stop.writing_checkpoint():
                        save()
        if stop.signum is None and main_process:
            save_samples(run, latents, samples / f"step_{run.step:08d}.png")
        with stop.writing_checkpoint():
            path = save()
        if stop.signum is not None:
            if main_process:
                print(f"stopped at step {run.step}; checkpoint {path}; continue with --resume", file=sys.stderr)
            return 128 + stop.signum
    print(f"done: {run.step} iterations, {run.nimg} images; checkpoint {path}; samples and losses.png in {samples}")
    return 0


def run_epoch(run, cfg, data, sampler, stop):
    """Train over the rest of the current epoch; returns True when MAX_STEPS is reached."""
    bar = tqdm(total=sampler.steps_per_epoch, initial=run.epoch_step, desc=f"epoch {run.epoch + 1}/{cfg.epochs}",
               dynamic_ncols=True, file=sys.stdout)
    try:
        for idx in sampler.batches(run.epoch, run.epoch_step):
            if cfg.max_steps and run.step >= cfg.max_steps:
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
            if stop.seen(run.device):
                return False
        return bool(cfg.max_steps) and run.step >= cfg.max_steps
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
                cfg, state = settings(given, opts, out, main_process)
                return train(cfg, state)
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
