"""Generate brain slices from a trained checkpoint's EMA generator, and explore its latent space.

    python generate_images.py                                       # 16 samples, newest checkpoint in Models/
    python generate_images.py --seeds 1,2,3 --truncation 0.7 --label AD
    python generate_images.py --mode mixing --seeds 0,1,2,3 --mix-seeds 10,11,12,13,14 --mix-layers 0-3
    python generate_images.py --mode interpolate --interp classes --seeds 0,1,2    # AD -> NC at fixed z
    python generate_images.py --mode tsne --data-root data/demo/AD_NC
    python generate_images.py --mode truncation --psis 1,0.7,0.5,0
    python generate_images.py --mode project --target slice.png
    python generate_images.py --mode losses

Modes (--mode):
  samples      one PNG per seed, a grid of them and the training loss plot
  mixing       style-mixing grid: the row seeds give the styles of --mix-layers, the column seeds the rest
  interpolate  a strip PNG and a GIF along a path through seeds, or from AD to NC at each seed's z,
               linear in W or spherical in Z (--space)
  tsne         t-SNE and PCA of w per class (and of real slices projected into W with --data-root),
               with a linear classifier's cross-validated accuracy on w
  truncation   the same seeds at each truncation psi (--psis), per class
  project      the w (or W+) and noise maps whose image best matches --target; PSNR and SSIM of the result
  losses       the checkpoint's training loss plot (and evaluation metrics plot)
The checkpoint carries its own settings, so no architecture flag is needed. The same seed gives the same image."""
import deps  # noqa: F401  (first: stops with one line when this Python lacks a package)

# isort: split
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import CHECKPOINT_KEYS, load_checkpoint, load_discriminator, load_generator
from constants import RANGES
from dataset import load_image, load_slices, to_model_range
from distributed import resolve_device
from latent import lerp, mix_styles, separability, slerp
from ops import use_fast_kernels
from projector import project, reconstruction_scores
from sampling import images_from_latents, mapped, seed_latents, synthesize
from settings import (
    INT64_MAX,
    UserError,
    checkpoint_settings,
    command,
    parse_settings,
    resolve_settings,
    writable_folder,
)
from utils import (
    plot_losses,
    plot_metrics,
    pyplot,
    read_jsonl,
    save_array,
    save_figure,
    save_gif,
    save_grid,
    save_image,
    save_json,
    save_labelled_grid,
    stats_history,
)

GRID_MAX = 64  # images in --mode samples' grid.png
NEED_D = ("project", "tsne")  # modes that use the checkpoint's discriminator (tsne: with --data-root)
CLASS_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")


# ---------------------------------------------------------------------------------------
# Checkpoint, seeds, labels, latents
# ---------------------------------------------------------------------------------------
def parse_numbers(text, kind, flag, high=INT64_MAX):
    """Comma-separated finite numbers of type `kind` (int or float) from 0 to `high`."""
    noun = "integers" if kind is int else "numbers"
    try:
        values = [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated {noun}, got {text!r}") from None
    if not values or not all(0 <= v <= high for v in values):  # NaN fails every comparison
        limit = "2^63 - 1" if high == INT64_MAX else f"{high:g}"
        raise UserError(f"{flag} takes {noun} from 0 to {limit}, got {text!r}")
    return values


def parse_seeds(text, default=(), flag="--seeds"):
    """Seeds from a comma list; `default` (a range stays a range: --n can be large) when empty."""
    return parse_numbers(text, int, flag) if text else (default if isinstance(default, range) else list(default))


def class_index(state, label):
    """The index of class `label` (a name), with a clear error for unconditional checkpoints and unknown names."""
    names = state["class_names"]
    if not state["model_args"]["G"]["num_classes"]:
        raise UserError(f"--label {label}: this checkpoint is unconditional "
                        "(train one with python train.py --conditional)")
    if label not in names:
        raise UserError(f"--label must be one of {', '.join(names)}, got {label!r}")
    return names.index(label)


def labels_for(state, label, count, start=0):
    """Class indices for images start..start+count-1: --label, or alternating classes; None when
    unconditional."""
    if label:
        return torch.full([count], class_index(state, label), dtype=torch.long)
    if not state["model_args"]["G"]["num_classes"]:
        return None
    return torch.arange(start, start + count) % len(state["class_names"])


def require_classes(G, what):
    if not G.num_classes:
        raise UserError(f"{what} needs a conditional checkpoint (train one with python train.py --conditional)")


# ---------------------------------------------------------------------------------------
# samples, truncation, losses
# ---------------------------------------------------------------------------------------
def latents_file(path, z_dim):
    """--z-file: an (N, z_dim) array of finite numbers in a .npy file, as float32 latents."""
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--z-file {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--z-file {path} is not a NumPy .npy array of numbers ({str(e).splitlines()[0]})") from None
    if z.ndim != 2 or z.shape[1] != z_dim or not len(z) or z.dtype.kind not in "biuf":
        raise UserError(f"--z-file {path} holds a {z.dtype} array of shape {list(z.shape)}; this generator needs "
                        f"N x {z_dim} numbers")
    if not np.isfinite(z).all():
        raise UserError(f"--z-file {path} holds NaN or infinite values")
    return torch.from_numpy(z.astype(np.float32))


def w_file(path, G):
    """--w-file: per-layer styles (num_ws, w_dim) from explore.py's exported JSON ("w") or a .npy of one
    w (w_dim) or of per-layer styles."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            w = np.asarray(json.loads(path.read_text())["w"], dtype=np.float64)
        else:
            w = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--w-file {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--w-file {path} is neither explore.py's export nor a .npy array of numbers "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    w_dim = G.mapping.w_avg.shape[1]
    if w.dtype.kind not in "biuf" or w.shape not in ((w_dim,), (G.num_ws, w_dim)) or not np.isfinite(w).all():
        raise UserError(f"--w-file {path} holds {w.dtype} of shape {list(w.shape)}; this generator needs {w_dim} or "
                        f"{G.num_ws} x {w_dim} finite numbers")
    w = torch.from_numpy(w.astype(np.float32))
    return (w[None].expand(G.num_ws, -1) if w.dim() == 1 else w)[None]


def run_samples(cfg, state, G, device, out):
    """seedNNNN.png (or zNNNN.png for --z-file) per image, written a batch at a time as they are drawn
    (memory bounded by --batch, however large --n), grid.png of the first GRID_MAX, losses.png; or
    the one image of --w-file (NAME.png, after the file)."""
    if cfg.w_file:
        image = synthesize(G, w_file(cfg.w_file, G), cfg.noise_mode, 1, device)[0]
        save_image(image, out / f"{Path(cfg.w_file).stem}.png")
        return f"the image of {cfg.w_file} (noise {cfg.noise_mode})"
    if cfg.z_file:
        z_all = latents_file(cfg.z_file, G.z_dim)
        count, names = len(z_all), lambda i: f"z{i:04d}"
    else:
        seeds = parse_seeds(cfg.seeds, range(cfg.n))
        count, names = len(seeds), lambda i: f"seed{seeds[i]:04d}"
    classes, shown = state["class_names"], []
    batches = range(0, count, cfg.batch)
    for start in tqdm(batches, desc="images", unit="batch", disable=len(batches) < 4, file=sys.stdout):
        stop = min(start + cfg.batch, count)
        z = z_all[start:stop] if cfg.z_file else seed_latents(seeds[start:stop], G.z_dim)
        labels = labels_for(state, cfg.label, stop - start, start)
        images = images_from_latents(G, z, labels, cfg.truncation, cfg.noise_mode, cfg.batch, device)
        paths = [out / (names(start + i) + (f"_{classes[labels[i]]}" if labels is not None else "") + ".png")
                 for i in range(len(images))]
        for image, path in zip(images, paths):
            save_image(image, path)
        shown.extend(images[:max(GRID_MAX - len(shown), 0)])
        if start == 0:
            check_room(out, count - stop, paths)
    save_grid(torch.stack(shown), out / "grid.png", ncol=8)
    plot_losses(state["history"], out / "losses.png")
    return f"{count} images (truncation {cfg.truncation})"


def check_room(out, left, written):
    """After the first batch: a UserError when `left` more images like the `written` ones would not fit
    on the disk of `out`."""
    need = sum(p.stat().st_size for p in written) / len(written) * left * 1.05
    free = shutil.disk_usage(out).free
    if need > free:
        raise UserError(f"--n: the {left} images still to write need about {need / 2**30:.1f} GB and {out} has "
                        f"{free / 2**30:.1f} GB free (lower --n, or free space)")


def truncation_grid(cfg, state, G, device, seeds):
    """Images (rows, seeds, C, R, R) for each class (or --label) at each psi, and the row labels."""
    psis = parse_numbers(cfg.psis, float, "--psis", RANGES["GEN_TRUNCATION"][1])
    classes = [cfg.label] if cfg.label else (state["class_names"] if G.num_classes else [""])
    z = seed_latents(seeds, G.z_dim)
    images, rows = [], []
    for name in classes:
        labels = labels_for(state, name, len(seeds))
        for psi in psis:
            images.append(images_from_latents(G, z, labels, psi, cfg.noise_mode, cfg.batch, device))
            rows.append(f"{name} ψ = {psi:g}".strip())
    return torch.stack(images), rows


def run_truncation(cfg, state, G, device, out):
    seeds = parse_seeds(cfg.seeds, range(8))
    images, rows = truncation_grid(cfg, state, G, device, seeds)
    save_labelled_grid(images.flatten(0, 1), out / "truncation.png", len(seeds), rows, [str(s) for s in seeds],
                       title="truncation: w = w_avg + ψ (w - w_avg); columns are seeds")
    return f"truncation grid: {len(rows)} rows x {len(seeds)} seeds"


def losses_from_logs(stats, out):
    """--mode losses --checkpoint RUN/stats.jsonl: the plots from a run's logs, also while it trains
    (its metrics.jsonl beside it gives metrics.png)."""
    if not stats.is_file():
        raise UserError(f"--checkpoint {stats}: no such file")
    lines = [line for line in read_jsonl(stats) if "kimg" in line]
    if not lines:
        raise UserError(f"--checkpoint {stats}: no statistics in it yet (train.py writes a line every --tick-kimg)")
    history, kimg = stats_history(lines)
    plot_losses(history, out / "losses.png", x=kimg, xlabel="thousands of real images shown to D")
    written = "losses.png"
    metrics_log = stats.with_name("metrics.jsonl")
    metrics = read_jsonl(metrics_log) if metrics_log.is_file() else []
    if metrics:
        plot_metrics(metrics, out / "metrics.png")
        written += " and metrics.png"
    return f"{written} from {len(lines)} lines of {stats} -> {out}"


def run_losses(cfg, state, G, device, out):
    plot_losses(state["history"], out / "losses.png")
    written = "losses.png"
    if state.get("metrics"):
        plot_metrics(state["metrics"], out / "metrics.png")
        written += " and metrics.png"
    return written


# ---------------------------------------------------------------------------------------
# Style mixing
# ---------------------------------------------------------------------------------------
def parse_layers(text, num_ws):
    """'A-B' (or 'A') -> style layer indices A..B, checked against the model's number of styles."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise UserError(f"--mix-layers takes a layer range START-END such as 0-3, got {text!r}")
    first, last = int(m[1]), int(m[2] if m[2] else m[1])
    if not first <= last < num_ws:
        raise UserError(f"--mix-layers {text}: this model has style layers 0-{num_ws - 1} (two per resolution)")
    return list(range(first, last + 1))


def run_mixing(cfg, state, G, device, out):
    """Figure 3 of the StyleGAN paper: column images on top, row images on the left, their mixes inside."""
    rows, cols = parse_seeds(cfg.seeds, range(4)), parse_seeds(cfg.mix_seeds, flag="--mix-seeds")
    if not cols:
        raise UserError("--mix-seeds needs at least one seed")
    layers = parse_layers(cfg.mix_layers, G.num_ws)
    w_rows = mapped(G, seed_latents(rows, G.z_dim), labels_for(state, cfg.label, len(rows)), cfg.truncation, device)
    w_cols = mapped(G, seed_latents(cols, G.z_dim), labels_for(state, cfg.label, len(cols)), cfg.truncation, device)
    mixed = synthesize(G, mix_styles(w_rows, w_cols, layers, G.num_ws).flatten(0, 1), cfg.noise_mode, cfg.batch, device)
    row_images, col_images = (synthesize(G, w, cfg.noise_mode, cfg.batch, device) for w in (w_rows, w_cols))
    tiles = [torch.full_like(row_images[:1], -1), col_images]
    for i in range(len(rows)):
        tiles += [row_images[i:i + 1], mixed[i * len(cols):(i + 1) * len(cols)]]
    save_grid(torch.cat(tiles), out / "mixing.png", ncol=len(cols) + 1)
    return f"style mixing {len(rows)} x {len(cols)}, row styles at layers {layers[0]}-{layers[-1]} of {G.num_ws}"


# ---------------------------------------------------------------------------------------
# Interpolation
# ---------------------------------------------------------------------------------------


def seed_path_ws(G, state, cfg, seeds, frames, device):
    """w (1, P, w_dim) along the path through the seeds, `frames` per segment (segments share end points)."""
    label = labels_for(state, cfg.label, 1)  # one class for the whole path
    z = seed_latents(seeds, G.z_dim)
    t = torch.linspace(0, 1, frames)
    if cfg.space == "w":
        w = mapped(G, z, label.expand(len(z)) if label is not None else None, cfg.truncation, device)
        segments = lerp(w[:-1], w[1:], t)  # (S-1, F, w_dim)
    else:
        zs = slerp(z[:-1], z[1:], t).flatten(0, 1)  # ((S-1) F, z_dim)
        w = mapped(G, zs, label.expand(len(zs)) if label is not None else None, cfg.truncation, device)
        segments = w.reshape(len(seeds) - 1, frames, -1)
    return torch.cat([segments[0]] + [s[1:] for s in segments[1:]])[None]


def class_path_ws(G, cfg, seeds, frames, device):
    """w (S, F, w_dim) from the first class to the second at each seed's z: linear in W between the two
    class-conditioned w, or (--space z) linear in the class embedding fed to the mapping network."""
    z = seed_latents(seeds, G.z_dim)
    t = torch.linspace(0, 1, frames)
    if cfg.space == "w":
        w0, w1 = (mapped(G, z, torch.full([len(seeds)], k), cfg.truncation, device) for k in (0, 1))
        return lerp(w0, w1, t)
    onehot = torch.eye(G.num_classes)
    weights = lerp(onehot[:1], onehot[1:2], t)[0]  # (F, K)
    zs = z.repeat_interleave(frames, 0)
    w = mapped(G, zs, weights.repeat(len(seeds), 1), cfg.truncation, device)
    return w.reshape(len(seeds), frames, -1)


def run_interpolate(cfg, state, G, device, out):
    seeds = parse_seeds(cfg.seeds, range(2))
    if cfg.interp == "classes":
        require_classes(G, "--interp classes")
        ws = class_path_ws(G, cfg, seeds, cfg.frames, device)
        names = state["class_names"]
        what = f"{names[0]} -> {names[1]} at seeds {','.join(map(str, seeds))}"
    else:
        if len(seeds) < 2:
            raise UserError(f"--interp seeds needs at least two --seeds, got {cfg.seeds!r}")
        ws = seed_path_ws(G, state, cfg, seeds, cfg.frames, device)
        what = f"seeds {' -> '.join(map(str, seeds))}"
    rows, steps = ws.shape[:2]
    images = synthesize(G, ws.flatten(0, 1), cfg.noise_mode, cfg.batch, device)  # (rows * steps, C, R, R)
    save_grid(images, out / "interpolation.png", ncol=steps)
    frames = images.reshape(rows, steps, *images.shape[1:])  # (rows, steps, C, R, R)
    save_gif(frames.transpose(0, 1), out / "interpolation.gif", ncol=rows)
    if cfg.interp == "classes":  # per seed: first class, second class, and their difference (grey = 0)
        first, last = frames[:, 0].clamp(-1, 1), frames[:, -1].clamp(-1, 1)  # as the PNGs show them
        table = torch.stack([first, last, (last - first).clamp(-1, 1)], 1)  # (rows, 3, C, R, R)
        save_grid(table.flatten(0, 1), out / "class_difference.png", ncol=3)
    return f"interpolation {what}, {steps} frames in {cfg.space.upper()}"


# ---------------------------------------------------------------------------------------
# Projection of real slices into W (projector.py)
# ---------------------------------------------------------------------------------------
def load_target(path, train_cfg):
    """The real slice to project, prepared as training prepared its data -> (1, C, R, R) in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--target: image not found: {path}")
    try:
        array = load_image(path, train_cfg.resolution, train_cfg.image_mode, train_cfg.resize_mode)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return to_model_range(torch.from_numpy(array.copy()))[None]


def run_project(cfg, state, G, device, out):
    if not cfg.target:
        raise UserError("--mode project needs --target IMAGE (a real slice)")
    target = load_target(cfg.target, checkpoint_settings(state))
    weights = None
    if G.num_classes:
        weights = (F.one_hot(torch.tensor([class_index(state, cfg.label)]), G.num_classes).float() if cfg.label
                   else torch.full([1, G.num_classes], 1 / G.num_classes))
    result = project(G, load_discriminator(state, device), target, weights, cfg, device, snapshots=cfg.frames)
    psnr, ssim = (float(v[0]) for v in reconstruction_scores(result["images"], target))
    stem = out / Path(cfg.target).stem
    save_image(target[0], f"{stem}_target.png")
    save_image(result["images"][0], f"{stem}_projected.png")
    steps = torch.cat(result["snapshots"] + [target])
    save_grid(steps, f"{stem}_steps.png", ncol=len(steps))
    save_gif(torch.stack([torch.cat([s, target]) for s in result["snapshots"]]), f"{stem}_steps.gif", ncol=2)
    w = result["ws"][0, 0] if cfg.project_space == "w" else result["ws"][0]
    save_array(f"{stem}_w.npy", w.numpy())
    save_array(f"{stem}_noise.npz", *[m[0, 0].numpy() for m in result["noise"]])
    report = dict(target=str(cfg.target), space=cfg.project_space, steps=cfg.project_steps, psnr_db=psnr, ssim=ssim,
                  pixel_mse_start=float(result["pixel_start"][0]), pixel_mse_end=float(result["pixel_end"][0]))
    save_json(report, f"{stem}_projection.json")
    return (f"projected {cfg.target} in {cfg.project_space.upper()} ({cfg.project_steps} steps): PSNR {psnr:.2f} dB, "
            f"SSIM {ssim:.3f}, pixel MSE {report['pixel_mse_start']:.4f} -> {report['pixel_mse_end']:.4f}")


# ---------------------------------------------------------------------------------------
# Style-space plot
# ---------------------------------------------------------------------------------------


def projected_reals(cfg, state, G, device):
    """w of --tsne-real real slices per class from --data-root, projected into W -> (w (M, w_dim), classes (M,))."""
    data = load_slices(checkpoint_settings(state, cfg.data_root, cfg.skip_bad_images))
    names = data.class_names or [""]
    if G.num_classes and data.class_names != state["class_names"]:
        raise UserError(f"--data-root classes {data.class_names} differ from the model's {state['class_names']}")
    pick = []
    for k in range(len(names)):
        members = torch.nonzero(data.labels == k)[:, 0]
        order = torch.randperm(len(members), generator=torch.Generator().manual_seed(k))
        pick.append(members[order[:cfg.tsne_real]])
    pick = torch.cat(pick)
    targets, classes = to_model_range(data.images[pick]), data.labels[pick]
    D, ws = load_discriminator(state, device), []
    for i in range(0, len(pick), cfg.batch):
        batch = classes[i:i + cfg.batch]
        weights = F.one_hot(batch, G.num_classes).float() if G.num_classes else None
        ws.append(project(G, D, targets[i:i + cfg.batch], weights, cfg, device)["ws"][:, 0])
        print(f"projected {min(i + cfg.batch, len(pick))}/{len(pick)} real slices", flush=True)
    return torch.cat(ws).numpy(), classes.numpy(), names


def plot_style_space(points, path, title):
    """t-SNE and PCA panels of w; `points` is a list of (w (M, w_dim), label, colour, marker)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    w = np.concatenate([p[0] for p in points])
    tsne = TSNE(2, perplexity=min(30.0, (len(w) - 1) / 3), init="pca", random_state=0)
    embeddings = [("t-SNE", tsne.fit_transform(w)), ("PCA", PCA(2, random_state=0).fit_transform(w))]
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 5.5))
    for ax, (name, xy) in zip(axes, embeddings):
        start = 0
        for pts, label, colour, marker in points:
            part = xy[start:start + len(pts)]
            start += len(pts)
            big = marker != "."
            ax.scatter(part[:, 0], part[:, 1], s=40 if big else 8, c=colour, marker=marker,
                       alpha=0.9 if big else 0.45, label=label, linewidths=1.2 if big else 0)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def run_tsne(cfg, state, G, device, out):
    names = state["class_names"] if G.num_classes else [""]
    z = seed_latents(range(cfg.tsne_n), G.z_dim)
    points, report, gen_w = [], dict(generated_per_class=cfg.tsne_n), []
    for k, name in enumerate(names):
        labels = torch.full([cfg.tsne_n], k) if G.num_classes else None
        gen_w.append(mapped(G, z, labels, 1.0, device).numpy())
        colour = CLASS_COLOURS[k % len(CLASS_COLOURS)] if G.num_classes else "0.5"
        points.append((gen_w[-1], f"{name} generated".strip(), colour, "."))
    lines = []
    if G.num_classes:
        acc, chance = separability(np.concatenate(gen_w), np.repeat(np.arange(len(names)), cfg.tsne_n))
        report["generated"] = dict(accuracy=acc, chance=chance)
        lines.append(f"generated w: {acc:.3f} (chance {chance:.3f})")
    if cfg.data_root:
        real_w, real_classes, real_names = projected_reals(cfg, state, G, device)
        for k, name in enumerate(real_names):
            points.append((real_w[real_classes == k], f"{name} real, projected".strip(),
                           CLASS_COLOURS[k % len(CLASS_COLOURS)], "x"))
        report["real_projected_per_class"] = cfg.tsne_real
        if len(real_names) > 1:
            acc, chance = separability(real_w, real_classes)
            report["real_projected"] = dict(accuracy=acc, chance=chance)
            lines.append(f"projected real w: {acc:.3f} (chance {chance:.3f})")
    title = "style space W" + (f" - linear classifier, 5-fold accuracy: {'; '.join(lines)}" if lines else "")
    plot_style_space(points, out / "style_space.png", title)
    save_json(report, out / "style_space.json")
    return f"{title} (style_space.png)"


MODES = dict(samples=run_samples, mixing=run_mixing, interpolate=run_interpolate, tsne=run_tsne,
             truncation=run_truncation, project=run_project, losses=run_losses)


@command
def main(argv=None):
    given, _ = parse_settings(argv, "GEN_", __doc__)
    cfg = resolve_settings(given, "GEN_")
    device = resolve_device(cfg.device)
    use_fast_kernels(device)
    out = writable_folder(cfg.out_dir, "--out-dir")
    if cfg.mode == "losses" and str(cfg.checkpoint).endswith(".jsonl"):
        print(losses_from_logs(Path(cfg.checkpoint), out))
        return 0
    state, path = load_checkpoint(cfg.checkpoint, CHECKPOINT_KEYS + (("D",) if cfg.mode in NEED_D else ()))
    G = load_generator(state, device)
    if cfg.label and cfg.mode not in ("samples", "mixing", "interpolate", "truncation", "project"):
        raise UserError(f"--label is not used by --mode {cfg.mode}")
    if cfg.z_file and (cfg.mode != "samples" or cfg.seeds):
        raise UserError("--z-file takes the place of --seeds in --mode samples")
    if cfg.w_file and (cfg.mode != "samples" or cfg.seeds or cfg.z_file):
        raise UserError("--w-file takes the place of --seeds and --z-file in --mode samples")
    if cfg.label:
        class_index(state, cfg.label)
    summary = MODES[cfg.mode](cfg, state, G, device, out)
    print(f"{summary}; from {path} (step {state['step']}) -> {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
