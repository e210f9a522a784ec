"""One StyleGAN2 training run's state and iteration: the networks, their EMA copy and optimisers
(with lazy regularisation's Adam settings), one iteration (D main, D penalty, G main, path length,
EMA, the augmentation probability), the learning-rate schedule, and the checkpoint state that
resumes it exactly. train.py drives it; bench.py times it."""
import contextlib
import copy
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from augment import AugmentPipe, AugmentProbability, random_flips, random_rotation_and_jitter
from checkpoints import make_checkpoint
from dataset import to_model_range
from distributed import all_reduce_mean
from losses import Objective, mode_seeking_penalty, path_length_penalty
from modules import Discriminator, DiscriminatorBlock, Generator, at_growth_level, growth_level
from ops import fused_epilogue
from settings import UserError, model_args_of

HISTORY_KEYS = ("loss_gen", "loss_critic", "gp", "r1", "pl_penalty", "mode_seeking", "real_score", "fake_score",
                "real_sign", "aug_p")


class Diverged(Exception):
    """A loss or gradient became NaN or infinite."""



# ---------------------------------------------------------------------------------------
# Models, optimisers, lazy regularisation
# ---------------------------------------------------------------------------------------
def reg_intervals(cfg):
    """Lazy regularisation as data: {network: iterations between its penalty (0: none)}."""
    d_penalty = Objective.from_settings(cfg).has_d_penalty
    return {"G": cfg.pl_interval if cfg.pl_weight > 0 else 0, "D": cfg.d_reg_interval if d_penalty else 0}


def lazy_ratio(interval):
    """A penalty every r steps takes 1/(r+1) of the optimiser steps: Adam's lr and betas use c = r/(r+1)."""
    return interval / (interval + 1) if interval else 1.0


@dataclass
class TrainingRun:
    """Everything a run changes as it trains (and its checkpoints keep)."""
    G: nn.Module  # the generator being trained
    D: nn.Module  # the discriminator
    G_ema: nn.Module  # the moving average of G: samples, evaluations, generate_images.py
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    model_args: dict  # the networks' constructor arguments, kept in checkpoints
    objective: Objective  # the chosen loss: D's and G's losses and D's penalty
    synthesis: nn.Module  # G.synthesis, or its torch.compile'd form (--compile)
    D_main: nn.Module  # D, or its compiled form: the main D forward passes
    amp: bool  # bf16 autocast of the forward passes (CUDA with --amp)
    intervals: dict  # {"G" | "D": iterations between its lazy penalty, 0: none}
    class_names: list
    device: torch.device
    augment: nn.Module | None  # the ADA pipeline (--augment ada|fixed), or None
    aug: AugmentProbability  # its probability p (fixed, or adapted by ADA)
    pl_mean: torch.Tensor  # running mean path length
    step: int = 0  # iterations done
    epoch: int = 0
    epoch_step: int = 0  # iterations done in the current epoch
    nimg: int = 0  # real images shown to D
    seconds: float = 0.0  # wall time of training so far, across resumes (stats.jsonl)
    maintenance_seconds: float = 0.0  # the part of it spent on grids, evaluations and checkpoints
    history: dict = field(default_factory=lambda: {k: [] for k in HISTORY_KEYS})  # per-iteration losses
    metrics: list = field(default_factory=list)  # evaluations during training
    last: dict = field(default_factory=dict)  # the latest loss values (progress bar)
    board: object = None  # TensorBoard writer (--tensorboard)


def build_run(cfg, data, device):
    """Networks, EMA copy and optimisers for a fresh run."""
    num_classes = len(data.class_names) if cfg.conditional else 0
    if cfg.attention_res and not (8 <= cfg.attention_res <= cfg.resolution and cfg.attention_res.bit_count() == 1):
        raise UserError(f"--attention-res {cfg.attention_res}: use 0 or a power of two from 8 to --resolution "
                        f"{cfg.resolution}")
    model_args = model_args_of(cfg, data.channels, num_classes)
    G = Generator(**model_args["G"]).to(device)
    D = Discriminator(**model_args["D"]).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    for p in frozen_d_parameters(D, cfg.freeze_d):
        p.requires_grad_(False)
    intervals = reg_intervals(cfg)
    betas = {net: tuple(b ** lazy_ratio(intervals[net]) for b in cfg.adam_betas) for net in "GD"}
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.g_lr, betas=betas["G"], fused=True)
    opt_D = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], lr=cfg.d_lr, betas=betas["D"], fused=True)
    eager = [D] if fused_epilogue(device) else []  # on the CPU D's fused kernels beat its compiled form (docs/speed.md)
    synthesis, D_main = compiled([G.synthesis, D], device, eager) if cfg.compile else (G.synthesis, D)
    return TrainingRun(G=G, D=D, G_ema=G_ema, opt_G=opt_G, opt_D=opt_D, model_args=model_args,
                       objective=Objective.from_settings(cfg), synthesis=synthesis,
                       D_main=D_main, amp=cfg.amp and device.type == "cuda", intervals=intervals,
                       class_names=list(data.class_names), device=device,
                       augment=AugmentPipe() if cfg.augment != "none" else None,
                       aug=AugmentProbability.from_settings(cfg),
                       pl_mean=torch.zeros([], device=device))


def frozen_d_parameters(D, n):
    """The parameters --freeze-d N keeps fixed (FreezeD): D's from-image layer and its N
    highest-resolution residual blocks (with a self-attention block before one of them)."""
    blocks = sum(isinstance(m, DiscriminatorBlock) for m in D.blocks)
    if n > blocks:
        raise UserError(f"--freeze-d {n}: this discriminator has {blocks} blocks")
    frozen, count = ([D.from_img] if n else []), 0
    for m in D.blocks:
        if count == n:
            break
        frozen.append(m)
        count += isinstance(m, DiscriminatorBlock)
    return [p for m in frozen for p in m.parameters()]


def initialise(run, init, data, init_from=""):
    """--init-from: G, G_ema and (when the source has one) D take the source network's weights; a
    lower-resolution source gives the layers it has (its growth continues from its resolution).
    Scanner noise the source lacks is added (measured later), and the source's is left out when the
    run has none."""
    num_classes = run.model_args["G"]["num_classes"]
    if num_classes and num_classes != len(data.class_names):
        raise UserError(f"--init-from is a network of {num_classes} classes; the data have {len(data.class_names)}")
    source_res = init["model_args"]["G"]["resolution"]
    noise = run.G.synthesis.scanner_noise is not None
    for name in ("G", "G_ema"):
        source = {k: v for k, v in init[name].items() if noise or not k.startswith("synthesis.scanner_noise.")}
        load_grown(getattr(run, name), source, lambda k: k, init_from)
    if "D" in init and source_res < run.model_args["G"]["resolution"]:  # grown: the higher blocks new
        load_grown(run.D, init["D"], grown_d_key(run.D, source_res), init_from)
    elif "D" in init:
        load_d_weights(run.D, init["D"])
    if "D" not in init:
        print("the source network has no discriminator: D starts from scratch")


def measure_scanner_noise(run, data):
    """A new run's scanner noise (--scanner-noise) at the noise levels of its training slices."""
    layers = [net.synthesis.scanner_noise for net in (run.G, run.G_ema) if net.synthesis.scanner_noise is not None]
    if layers:
        levels = layers[0].measure(data.images)
        layers[1].levels.copy_(levels)
        print(f"scanner noise: Rician, sd {levels[0]:.4f} to {levels[-1]:.4f} (median {levels.median():.4f}, "
              "0..1 intensity units), measured in the training slices")


def grown_d_key(D, source_res):
    """Where a lower-resolution discriminator's parameter sits in D: its blocks below D's blocks for
    the higher resolutions, its from-image conv as D's entry at its resolution."""
    offset = D.starts[source_res]

    def key(name):
        head, _, rest = name.partition(".")
        if head == "from_img":
            return f"from_img_low.{source_res}.{rest}"
        if head == "blocks":
            index, _, rest = rest.partition(".")
            return f"blocks.{int(index) + offset}.{rest}"
        return name
    return key


def load_grown(net, source, key, init_from):
    """net's parameters and buffers from a lower-resolution network's state (names mapped by `key`);
    the layers only net has keep their initial values. A layer whose shape differs is refused."""
    own = net.state_dict()
    for name, value in source.items():
        mine = key(name)
        if mine not in own or own[mine].shape != value.shape:
            found = tuple(own[mine].shape) if mine in own else "nothing"
            raise UserError(f"--init-from {init_from}: its {name} {tuple(value.shape)} does not fit this network's "
                            f"{mine} ({found}); grow it with its own --channel-base, --channel-max and a "
                            "--channel-min no wider than its layers")
        own[mine] = value
    net.load_state_dict(own)


def load_d_weights(D, state):
    """D's weights from another network's: a growing D (--progressive) keeps its own lower
    from-image convs where the source has none, and a fixed D leaves out a growing source's."""
    own = D.state_dict()
    lower = {k: v for k, v in own.items() if k.startswith("from_img_low.")}
    D.load_state_dict({**lower, **{k: v for k, v in state.items() if not k.startswith("from_img_low.") or k in own}})


def compiled(modules, device, eager=()):
    """torch.compile each module but those in `eager` (sharing their parameters), or return them as they are, with
    a warning, where torch.compile does not work. The double-backward penalties always run the eager modules."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
    except Exception as e:  # no C compiler, no Triton, an unsupported platform, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        print(f"warning: --compile: torch.compile does not work here ({type(e).__name__}: {reason}); "
              "training runs eagerly", file=sys.stderr)
        return modules
    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile later runs eagerly
    return [m if m in eager else torch.compile(m) for m in modules]


def set_learning_rates(run, cfg):
    factor = lr_factor(cfg, run.step, run.epoch)
    for opt, lr, net in ((run.opt_G, cfg.g_lr, "G"), (run.opt_D, cfg.d_lr, "D")):
        for group in opt.param_groups:
            group["lr"] = lr * lazy_ratio(run.intervals[net]) * factor


# ---------------------------------------------------------------------------------------
# The moving average of G, and the learning-rate schedule (a pure function of the position in
# training, so that resume is exact)
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


def lr_factor(cfg, step, epoch):
    """Multiplier of the base learning rate at iteration `step` of epoch `epoch` (0-based)."""
    if cfg.lr_schedule == "cyclic":  # triangular: low -> high over LR_CYCLE_STEPS, then back
        phase = (step / cfg.lr_cycle_steps) % 2
        return cfg.lr_cycle_min + (1 - cfg.lr_cycle_min) * (1 - abs(phase - 1))
    if cfg.lr_schedule == "step":
        return cfg.lr_step_factor ** (epoch // cfg.lr_step_epochs)
    return 1.0


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


def generate_fakes(run, cfg, z, labels, update_w_avg=False):
    """G's training forward: mapping with style mixing, then the (compiled, autocast) synthesis;
    a growing generator (--progressive) runs eagerly, as its graph changes with the level."""
    ws = run.G.make_ws(z, labels, mixing_prob=cfg.style_mixing_prob, update_w_avg=update_w_avg)
    if run.G.synthesis.level is not None:  # at the resolution the growth has reached
        with autocast(run):
            return run.G.synthesis(ws, full_size=False)
    with autocast(run):
        return run.synthesis(ws)


def set_growth_level(run, cfg):
    """--progressive: the growth level of G, G_ema and D after run.nimg images (None: fully grown)."""
    level = growth_level(run.nimg, cfg.progressive_kimg, cfg.resolution, cfg.progressive_start,
                         cfg.progressive_hold_kimg) if cfg.progressive else None
    run.G.synthesis.level = run.G_ema.synthesis.level = run.D.level = level


def augment(run, images):
    """The augmentation every image D sees goes through (--augment ada|fixed), with probability p."""
    return run.augment(images, run.aug.p) if run.augment is not None else images


def discriminate(run, images, labels, batches=1):
    """D's main forward on augmented images (compiled, autocast), scores in float32; `batches` equal
    batches one after the other, each with its own minibatch-std groups. A growing D runs eagerly."""
    D = run.D_main if run.D.level is None else run.D
    with autocast(run):
        return D(augment(run, images), labels, batches).float()


def d_step(run, cfg, real, labels, regularize):
    """D's main step on a real batch and a generated one, then (when due) its lazy penalty."""
    z = torch.randn(len(real), cfg.z_dim, device=real.device)
    with torch.no_grad():
        fake = generate_fakes(run, cfg, z, labels).float()
    both = torch.cat([labels, labels]) if labels is not None else None
    real_pred, fake_pred = discriminate(run, torch.cat([real, fake]), both, batches=2).chunk(2)  # one pass
    loss = run.objective.d_loss(real_pred, fake_pred)
    stats = dict(loss_critic=loss.detach(), real_score=real_pred.mean().detach(),
                 fake_score=fake_pred.mean().detach(), grad_d=optimizer_step(run.opt_D, loss))
    if run.augment is not None:
        stats["real_sign"] = run.objective.real_sign(real_pred, fake_pred)
    if regularize:
        penalty, logged = run.objective.d_penalty(lambda x: run.D(augment(run, x), labels), real, fake,
                                                  r1_scale(cfg, real.shape[-1]))
        stats["grad_d_reg"] = optimizer_step(run.opt_D, penalty * run.intervals["D"])
        stats.update(logged)
    return stats


def r1_scale(cfg, resolution):
    """R1's weight at the resolution D sees, relative to R1_GAMMA: (resolution / R1_GAMMA_RES) to the
    power R1_GAMMA_POWER (1 when R1_GAMMA_RES is 0). The square keeps one strength of regularisation
    per pixel area (StyleGAN2-ADA); a negative power leaves a growing D freer at the high resolutions."""
    return (resolution / cfg.r1_gamma_res) ** cfg.r1_gamma_power if cfg.r1_gamma_res else 1.0


def mode_seeking_weight(cfg, level):
    """Mode seeking's weight for G at growth `level` (None: full resolution): MODE_SEEKING_FULL
    once G draws at full resolution when it is set (>= 0), else MODE_SEEKING."""
    return cfg.mode_seeking_full if level is None and cfg.mode_seeking_full >= 0 else cfg.mode_seeking


def g_step(run, cfg, labels, batch_size, regularize):
    """G's main step, then (when due) the path-length penalty on a fraction of the batch."""
    G, D = run.G, run.D
    D.requires_grad_(False)  # G's step needs no D gradients; D's trainable parameters get theirs back below
    z = torch.randn(batch_size, cfg.z_dim, device=run.device)
    fake = generate_fakes(run, cfg, z, labels, update_w_avg=True)
    fake_pred = discriminate(run, fake, labels)
    loss = run.objective.g_loss(fake_pred)
    stats = dict(loss_gen=loss.detach())
    weight = mode_seeking_weight(cfg, G.synthesis.level)
    if weight > 0:
        penalty = mode_seeking_penalty(fake, z)
        loss = loss + penalty * weight
        stats["mode_seeking"] = penalty.detach()
    stats["grad_g"] = optimizer_step(run.opt_G, loss)
    if regularize:
        n = max(1, batch_size // cfg.pl_batch_shrink)
        sub = labels[:n] if labels is not None else None
        ws = G.make_ws(torch.randn(n, cfg.z_dim, device=run.device), sub, mixing_prob=cfg.style_mixing_prob)
        penalty, run.pl_mean = path_length_penalty(G.synthesis(ws, full_size=False), ws, run.pl_mean,
                                                   cfg.pl_decay)
        stats["grad_g_reg"] = optimizer_step(run.opt_G, penalty * cfg.pl_weight * run.intervals["G"])
        stats["pl_penalty"] = penalty.detach()
    for group in run.opt_D.param_groups:  # --freeze-d's fixed parameters stay without gradients
        for p in group["params"]:
            p.requires_grad_(True)
    return stats


def train_step(run, cfg, data, idx):
    """One iteration on the batch of dataset indices `idx`; returns {name: float}."""
    real = random_flips(to_model_range(data.images[idx].to(run.device, non_blocking=True)), cfg.hflip, cfg.vflip)
    real = at_growth_level(random_rotation_and_jitter(real, cfg.rotate, cfg.jitter), run.G.synthesis.level,
                           full_size=False)
    labels = data.labels[idx].to(run.device) if cfg.conditional else None
    set_learning_rates(run, cfg)
    due = {net: bool(r) and run.step % r == 0 for net, r in run.intervals.items()}
    stats = d_step(run, cfg, real, labels, due["D"])
    stats.update(g_step(run, cfg, labels, len(real), due["G"]))
    values = torch.stack([v.float() for v in stats.values()])
    all_reduce_mean([values, run.G.mapping.w_avg, run.pl_mean])  # several processes: their mean
    ema_update(run.G_ema, run.G, ema_beta(cfg.batch_size, cfg.ema_kimg, cfg.ema_rampup, run.nimg))
    values = dict(zip(stats, values.tolist()))  # one sync
    if "real_sign" in values:  # with augmentation: ADA moves p by it
        run.aug.update(values["real_sign"])
    values["aug_p"] = run.aug.p
    for name, value in values.items():
        if not math.isfinite(value):
            raise Diverged(f"non-finite {name} ({value}) at step {run.step}")
    return values


# ---------------------------------------------------------------------------------------
# The checkpoint of a run, and resuming from one
# ---------------------------------------------------------------------------------------
def checkpoint_state(run, cfg):
    """Everything needed to resume exactly, and to generate with no extra flags."""
    cuda = run.device.type == "cuda"
    states = {name: getattr(run, name).state_dict() for name in ("G", "D", "G_ema", "opt_G", "opt_D")}
    history = {k: torch.tensor(v, dtype=torch.float32) for k, v in run.history.items()}
    return make_checkpoint(cfg, run.model_args, run.class_names, states, history, step=run.step, epoch=run.epoch,
                           nimg=run.nimg, metrics=run.metrics, epoch_nimg=run.epoch_step * cfg.batch_size,
                           seconds=run.seconds, maintenance_seconds=run.maintenance_seconds,
                           pl_mean=run.pl_mean.detach().cpu(), **run.aug.state_dict(),
                           rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if cuda else []))


def history_of(state):
    """A checkpoint's per-iteration history under today's keys: older checkpoints logged the
    path-length penalty as `plp`, and R1 as `gp` under the logistic loss."""
    history = dict(state["history"])
    if "plp" in history:
        history["pl_penalty"] = history.pop("plp")
    if "gp" in history and "r1" not in history and state["config"].get("loss") == "logistic":
        history["r1"] = history.pop("gp")
    return history


def restore(run, state, cfg, data):
    if state["class_names"] != list(data.class_names) and cfg.conditional:
        raise UserError(f"--data-root classes {data.class_names} differ from the checkpoint's {state['class_names']}")
    if cfg.progressive and not any(k.startswith("from_img_low.") for k in state["D"]):
        raise UserError("this --progressive checkpoint is from before the discriminator grew with the generator: "
                        "start a new run from it with --init-from")
    for name in ("G", "D", "G_ema", "opt_G", "opt_D"):
        getattr(run, name).load_state_dict(state[name])
    run.step, run.epoch, run.nimg = state["step"], state["epoch"], state["nimg"]
    run.seconds = float(state.get("seconds", 0.0))
    run.maintenance_seconds = float(state.get("maintenance_seconds", 0.0))
    run.epoch_step = state["epoch_nimg"] // cfg.batch_size
    run.pl_mean = state["pl_mean"].to(run.device)
    run.aug.load_state_dict(state)
    history = history_of(state)
    steps = len(history["loss_gen"])  # a key the checkpoint lacks is NaN up to now
    run.history = {k: history[k].tolist() if k in history else [math.nan] * steps for k in HISTORY_KEYS}
    run.metrics = list(state.get("metrics", []))
    torch.set_rng_state(state["rng"]["torch"])
    if run.device.type == "cuda" and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
