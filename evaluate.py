"""Measure how real and how diverse a generator's brain slices are.

    python evaluate.py --checkpoint Models --data-root data/demo/AD_NC
    python evaluate.py --checkpoint Models --inception-weights pt_inception-2015-12-05-6726825d.pth --cas

Compares the EMA generator of a checkpoint with real slices and prints a table; writes the
figures as JSON (--out) and as a Markdown table beside it. Metrics:
  swd            sliced Wasserstein distance of 7x7 Laplacian-pyramid patches, x1e3 (ProGAN); lower is better
  ms_ssim_fake   mean MS-SSIM of random pairs of generated images; near ms_ssim_real is good, higher is mode collapse
  ms_ssim_real   the same on real images
  fid, kid       Frechet / kernel Inception distance (needs --inception-weights); lower is better
  precision      share of generated images inside the real k-NN manifold (fidelity); higher is better
  recall         share of real images inside the generated k-NN manifold (coverage); higher is better
  knn_ratio      median k-NN radius of generated over real images: below 1 they crowd together (low recall)
  cas            (--cas) a ResNet-18 AD-vs-NC classifier trained on real, generated, and real + generated
                 slices, tested on the real test split: accuracy and AUC of each"""
import deps  # noqa: F401  (first: stops with one line when this Python lacks a package)

# isort: split
import sys
from pathlib import Path

from checkpoints import CHECKPOINT_KEYS, load_checkpoint, load_discriminator, load_generator
from dataset import load_slices, to_model_range
from distributed import resolve_device
from metrics import (
    FID_SKIPPED,
    MEMO_SIZE,
    Evaluator,
    classification_scores,
    heldout_slices,
    load_inception,
    sample_images,
)
from ops import use_fast_kernels
from settings import UserError, checkpoint_settings, command, parse_settings, resolve_settings, writable_file
from utils import save_json, save_text

# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
MEMORISATION_FIGURE = "memorisation.png"  # beside --out: the closest generated/training pairs
DESCRIPTIONS = {
    "swd": "sliced Wasserstein distance x1e3, mean over pyramid levels (lower is better)",
    "ms_ssim_fake": "MS-SSIM of random generated pairs (close to real is good; higher: less diverse)",
    "ms_ssim_real": "MS-SSIM of random real pairs",
    "fid": "Frechet Inception distance (lower is better)",
    "kid": "kernel Inception distance (lower is better)",
    "kid_std": "standard deviation of KID over subsets",
    "precision": "share of generated images on the real manifold (higher is better)",
    "recall": "share of real images on the generated manifold (higher is better)",
    "knn_ratio": "median k-NN radius of generated over real images (below 1: they crowd, recall falls; "
                 "above 1: they spread wider than the data, precision falls)",
    "d_real": "D's mean score on training slices (no augmentation)",
    "d_fake": "D's mean score on generated slices",
    "d_heldout": "D's mean score on held-out real slices (DATA_ROOT/test)",
    "d_overfit": "(d_real - d_heldout) / (d_real - d_fake): 0 D generalises, 1 D memorised the training set",
    "nn_dist_fake": "mean RMS distance from a generated slice to its nearest training slice (pixels, [-1, 1])",
    "nn_dist_heldout": "mean RMS distance from a held-out real slice to its nearest training slice",
    "copy_rate": "share of generated slices nearer a training slice than 99% of held-out slices are (copies)",
    "authenticity": "share of generated slices farther from their nearest training slice than its own "
                    "nearest neighbour is (Alaa et al. 2022; higher is better)",
    "swd_heldout": "swd of the held-out real slices (DATA_ROOT/test): what a generator of new subjects reaches",
    "ms_ssim_heldout": "ms_ssim of random held-out real pairs",
    "precision_heldout": "precision of the held-out real slices (at their number, not --n)",
    "recall_heldout": "recall of the held-out real slices (at their number): about the most a generator "
                      "of new subjects, not copies, can reach",
    "nn_dist_fake_d": "nn_dist_fake in the discriminator's feature space (its units)",
    "nn_dist_heldout_d": "nn_dist_heldout in the discriminator's feature space",
    "copy_rate_d": "copy_rate in the discriminator's feature space",
    "authenticity_d": "authenticity in the discriminator's feature space",
}


FEATURE_SPACES = {"inception": "Inception-v3's 2048 pool features", "pixels16": "16x16 thumbnails (no weights)"}


def describe(key):
    level = key.removeprefix("swd_").removesuffix("_heldout")
    if key.startswith("swd_") and level.isdigit():
        return (f"SWD x1e3 at the {level}x{level} pyramid level"
                + (" of the held-out real slices" if key.endswith("_heldout") else ""))
    return DESCRIPTIONS.get(key, "")


def markdown_table(results):
    """The figures of evaluate.py's results as a Markdown table."""
    rows = ["| metric | value | meaning |", "|---|---|---|"]
    for key in results["metric_names"]:
        rows.append(f"| {key} | {results[key]:.4g} | {describe(key)} |")
    for name, scores in results.get("cas", {}).items():
        rows.append(f"| CAS, trained on {name} | accuracy {scores['accuracy']:.3f}, AUC {scores['auc']:.3f} | "
                    f"ResNet-18 trained on {name} slices, tested on the real test split |")
    rows += ["", f"Precision, recall and knn_ratio in {FEATURE_SPACES[results['features']]}; the memorisation "
             f"audit in pixels at up to {MEMO_SIZE}x{MEMO_SIZE} (and in D's features: _d)."]
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------
def cas_data(cfg, train_cfg, G, train, device):
    """(train, test, generated) image/label pairs for the classification accuracy score."""
    if not G.num_classes:
        raise UserError("--cas needs a conditional checkpoint (train one with python train.py --conditional)")
    test_dir = Path(train_cfg.data_root) / "test"
    if not test_dir.is_dir():
        raise UserError(f"--cas tests on real held-out slices: {test_dir} not found (DATA_ROOT/test/<class>/)")
    test = load_slices(train_cfg, splits=["test"])
    if test.class_names != train.class_names:
        raise UserError(f"{test_dir} classes {test.class_names} differ from the training classes {train.class_names}")
    fake = sample_images(G, train.labels, len(train), cfg.seed + 2, device, cfg.truncation, cfg.batch)
    return ((to_model_range(train.images), train.labels), (to_model_range(test.images), test.labels),
            (fake, train.labels))


def evaluate(cfg):
    """Every figure for one checkpoint, as a flat dict (the JSON written by main)."""
    device = resolve_device(cfg.device)
    use_fast_kernels(device)
    inception = load_inception(cfg.inception_weights, device)  # before any other work: a bad file is one line
    state, path = load_checkpoint(cfg.checkpoint, CHECKPOINT_KEYS + ("D",))
    train_cfg = checkpoint_settings(state, cfg.data_root, cfg.skip_bad_images)
    G, D = load_generator(state, device), load_discriminator(state, device)
    data = load_slices(train_cfg)
    cas = cas_data(cfg, train_cfg, G, data, device) if cfg.cas else None
    heldout = heldout_slices(train_cfg, data)
    evaluator = Evaluator(data.images, data.labels, cfg.n, cfg.seed, inception, cfg.batch, heldout)
    metrics = evaluator(G, device, cfg.truncation, D)
    evaluator.save_memorisation_figure(Path(cfg.out).with_name(MEMORISATION_FIGURE))
    results = dict(checkpoint=str(path), step=state["step"], nimg=state["nimg"], data_root=train_cfg.data_root,
                   n=evaluator.n, seed=cfg.seed, truncation=cfg.truncation, features=evaluator.feature_space,
                   metric_names=list(metrics), **metrics)
    if cas is not None:
        results["cas"] = classification_scores(*cas, len(data.class_names), cfg.cas_epochs, cfg.seed, device)
    return results


@command
def main(argv=None):
    given, _ = parse_settings(argv, "EVALUATE_", __doc__)
    cfg = resolve_settings(given, "EVALUATE_")
    writable_file(cfg.out, "--out")
    writable_file(Path(cfg.out).with_suffix(".md"), "--out")
    results = evaluate(cfg)
    table = markdown_table(results)
    out = Path(cfg.out)
    save_json(results, out)
    save_text(table, out.with_suffix(".md"))
    print(f"{results['checkpoint']} (step {results['step']}), {results['n']} generated vs {results['n']} real "
          f"images from {results['data_root']}:\n{table}written {out} and {out.with_suffix('.md')}")
    if "fid" not in results:
        print(FID_SKIPPED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
