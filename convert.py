"""Convert a network trained elsewhere into a checkpoint of this toolkit.

    python convert.py network-snapshot-001000.pkl Models/ffhq256.pt              # NVlabs StyleGAN2-ADA pickle
    python convert.py 550000.pt Models/rosinality.pt --channels keep             # rosinality stylegan2-pytorch

Reads an NVlabs pickle with a restricted unpickler (nothing in it runs: the source code such
pickles embed is never executed or imported), or a rosinality checkpoint with
torch.load(weights_only=True), maps G, G_ema and D onto this toolkit's networks and writes an
ordinary checkpoint (generate_images.py, evaluate.py and train.py --init-from take it). RGB
networks become 1-channel ones (--channels gray, the default; the data of this toolkit are gray).
A network this toolkit has no architecture for is refused with one line naming the first tensor
that does not map."""
import deps  # noqa: F401  (first: stops with one line when this Python lacks a package)

# isort: split
import sys
from pathlib import Path

from checkpoints import save_checkpoint
from pretrained import describe, load_pretrained
from settings import UserError, command, parse_settings, resolve_settings, writable_file

EXTRA_FLAGS = [
    (("input",), dict(metavar="IN", help="NVlabs .pkl, rosinality .pt, or a checkpoint of this toolkit")),
    (("output",), dict(metavar="OUT", help="the checkpoint to write (.pt)")),
    (("--overwrite",), dict(action="store_true", help="replace OUT if it exists")),
]


@command
def main(argv=None):
    given, opts = parse_settings(argv, "CONVERT_", __doc__, EXTRA_FLAGS)
    cfg = resolve_settings(given, "CONVERT_")
    out = Path(opts.output)
    if out.exists() and not getattr(opts, "overwrite", False):
        raise UserError(f"{out} exists: choose another OUT, or pass --overwrite to replace it")
    writable_file(out, "OUT")
    ckpt, fmt = load_pretrained(opts.input, cfg.channels)
    save_checkpoint(ckpt, out)
    print(f"{opts.input} ({fmt}) -> {out}: {describe(ckpt)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
