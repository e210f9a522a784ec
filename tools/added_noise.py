"""How much of a checkpoint's gap to the real slices is the scanner noise it does not draw: the
evaluation of its generated slices as they are, then with --scanner-noise's Rician noise at each
fixed --sd added on the brain's pixels, against the same training and held-out slices.

python tools/added_noise.py --checkpoint RUN/Models [--sd 0.02] [--n 1000]
A diagnostic, not a generator: the noise is added after the network, where nothing learned it.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoints import CHECKPOINT_KEYS, load_checkpoint, load_generator  # noqa: E402
from dataset import load_slices  # noqa: E402
from metrics import Evaluator, heldout_slices, sample_images  # noqa: E402
from modules import ScannerNoise  # noqa: E402
from settings import checkpoint_settings  # noqa: E402

KEYS = ("swd_256", "swd_128", "swd_64", "swd", "ms_ssim_fake", "precision", "recall", "copy_rate")


def rician(images, sd, seed):
    """Images in [-1, 1] with ScannerNoise's Rician noise of `sd` (in 0..1 units) on the brain's pixels."""
    layer = ScannerNoise(images.shape[-1], images.shape[1])
    layer.levels.fill_(sd)
    torch.manual_seed(seed)
    with torch.no_grad():
        return layer(images).clamp(-1, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sd", type=float, nargs="+", default=[0.02])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    state, path = load_checkpoint(args.checkpoint, CHECKPOINT_KEYS)
    cfg = checkpoint_settings(state)
    device = torch.device("cpu")
    G = load_generator(state, device)
    data = load_slices(cfg)
    evaluator = Evaluator(data.images, data.labels, args.n, args.seed, heldout=heldout_slices(cfg, data))
    fake = sample_images(G, evaluator.labels, evaluator.n, args.seed + 1, device)  # as evaluate.py draws them
    print(f"{path}: held-out", {k: round(v, 4) for k, v in evaluator.heldout_figures.items()})
    for sd, images in [(0.0, fake)] + [(sd, rician(fake, sd, args.seed)) for sd in args.sd]:
        out = evaluator.compare(images)
        print(f"noise sd {sd:g}:", {k: round(out[k], 4) for k in KEYS if k in out})


if __name__ == "__main__":
    main()
