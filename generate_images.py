"""Generate brain slices from a trained checkpoint with its EMA generator.

    python generate_images.py                           # newest checkpoint in Models/, 16 images
    python generate_images.py --seeds 1,2,3 --truncation 0.7 --label AD

Writes one PNG per seed, a grid of them, and the training loss plot. The checkpoint carries its
own settings, so no architecture flag is needed. The same seed gives the same image."""
import sys
from pathlib import Path

import torch

from modules import Generator
from utils import (
    UserError,
    load_checkpoint,
    parse_settings,
    plot_losses,
    resolve_device,
    resolve_settings,
    save_grid,
    save_image,
)


def parse_seeds(cfg):
    if not cfg.seeds:
        return list(range(cfg.n))
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, got {cfg.seeds!r}") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds takes non-negative integers, got {cfg.seeds!r}")
    return seeds


def load_generator(state, device):
    """The EMA generator of a checkpoint, in eval mode."""
    G = Generator(**state["model_args"]["G"])
    G.load_state_dict(state["G_ema"])
    return G.to(device).eval().requires_grad_(False)


def seed_latents(seeds, z_dim):
    """One z per seed, drawn on the CPU so that a seed means the same z on every device."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


def labels_for(state, label, count):
    """Class indices for `count` images: --label, or alternating classes; None when unconditional."""
    names = state["class_names"]
    if not state["model_args"]["G"]["num_classes"]:
        if label:
            raise UserError(f"--label {label}: this checkpoint is unconditional (train with --conditional)")
        return None
    if label and label not in names:
        raise UserError(f"--label must be one of {', '.join(names)}, got {label!r}")
    index = torch.full([count], names.index(label)) if label else torch.arange(count) % len(names)
    return index.long()


@torch.no_grad()
def generate(G, z, labels, truncation, noise_mode, batch, device):
    """Images (N, C, R, R) in [-1, 1] for latents z, generated `batch` at a time."""
    out = []
    for i in range(0, len(z), batch):
        lab = labels[i:i + batch].to(device) if labels is not None else None
        out.append(G(z[i:i + batch].to(device), lab, truncation=truncation, noise_mode=noise_mode).cpu())
    return torch.cat(out)


def main(argv=None):
    try:
        given, _ = parse_settings(argv, "GEN_", __doc__)
        cfg = resolve_settings(given, "GEN_")
        device = resolve_device(cfg.device)
        state, path = load_checkpoint(cfg.checkpoint)
        seeds = parse_seeds(cfg)
        labels = labels_for(state, cfg.label, len(seeds))
        G = load_generator(state, device)
        images = generate(G, seed_latents(seeds, G.z_dim), labels, cfg.truncation, cfg.noise_mode, cfg.batch, device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out_dir)
    names = state["class_names"]
    for i, (seed, image) in enumerate(zip(seeds, images)):
        suffix = f"_{names[labels[i]]}" if labels is not None else ""
        save_image(image, out / f"seed{seed:04d}{suffix}.png")
    save_grid(images, out / "grid.png", ncol=8)
    plot_losses({k: v.tolist() for k, v in state["history"].items()}, out / "losses.png")
    print(f"{len(seeds)} images from {path} (step {state['step']}, truncation {cfg.truncation}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
