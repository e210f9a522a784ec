"""What a training run writes as it goes (the main process only): sample grids from fixed latents,
checkpoints pruned to the run's newest, evaluations with Models/best.pt, the loss and metric plots,
the stats.jsonl and metrics.jsonl logs, and TensorBoard's. Snapshots come by epochs (SAMPLE_EVERY,
CHECKPOINT_EVERY, EVAL_EVERY), or with SNAPSHOT_KIMG every that many thousand images."""
import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoints import BEST_CHECKPOINT, checkpoint_path, list_checkpoints, prune_checkpoints, save_checkpoint
from dataset import to_model_range
from distributed import peak_memory_mb, same_on_every_process
from metrics import FID_SKIPPED, Evaluator, best_metric, heldout_slices, is_new_best, load_inception
from run_folder import samples_folder
from settings import UserError
from training import HISTORY_KEYS, checkpoint_state
from utils import append_jsonl, plot_losses, plot_metrics, save_grid, save_json


class RunOutputs:
    """A run's outputs in OUT_DIR, written when the loop calls after_step, after_epoch and snapshot."""

    def __init__(self, run, cfg, state, main_process, evaluation=None):
        out = Path(cfg.out_dir)
        self.models, self.samples = out / "Models", samples_folder(out, cfg.resolution)
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


def make_evaluator(cfg, data, device):
    """(Evaluator with the real-image statistics, name of the metric that picks best.pt), or (None, None)."""
    if not cfg.eval_every:
        return None, None
    inception = load_inception(cfg.inception_weights, device)
    if inception is None:
        print(FID_SKIPPED)
    metric = best_metric(cfg.eval_metric, inception)
    evaluator = Evaluator(data.images, data.labels, min(cfg.eval_n, len(data)), cfg.seed, inception,
                          heldout=heldout_slices(cfg, data))
    every = f"{cfg.snapshot_kimg:g} kimg" if cfg.snapshot_kimg else f"{cfg.eval_every} epochs"
    print(f"evaluation every {every} on {evaluator.n} images (precision/recall in {evaluator.feature_space} "
          f"features); Models/best.pt by {metric}")
    return evaluator, metric


def evaluate_now(run, cfg, evaluator, metric, save_best, samples):
    """Evaluate G_ema, log (OUT_DIR/metrics.jsonl) and plot the figures, and keep Models/best.pt by
    `metric` (lower is better) among the evaluations that copy little enough (--eval-max-copy-rate)."""
    figures = evaluator(run.G_ema, run.device, D=run.D)
    new_best = is_new_best(run.metrics, figures, metric, cfg.eval_max_copy_rate)
    run.metrics.append(dict(epoch=run.epoch, step=run.step, nimg=run.nimg, **figures))
    append_jsonl(dict(kimg=run.nimg / 1000, nimg=run.nimg, step=run.step, epoch=run.epoch, time_s=run.seconds,
                      train_s=run.seconds - run.maintenance_seconds, features=evaluator.feature_space, **figures),
                 Path(cfg.out_dir) / "metrics.jsonl")
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
