"""Brain-slice data: the ADNI layout (AD_NC/{train,test}/{AD,NC}/*.jpeg), any folder of class
sub-folders, or a flat folder of images (OASIS PNG slices, trained unconditionally).

Every image is decoded once at start (which also finds corrupt files before training), made
grayscale, padded to square (or stretched) and resized, and kept as a uint8 tensor in memory.
Random flips and the conversion to [-1, 1] happen on the training device, per batch."""
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from utils import UserError, flag_of

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def is_image_file(path):
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def images_in(folder, recursive):
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if is_image_file(p))


def subfolders(folder):
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_images(root, splits=("train",)):
    """Return (files, labels, class_names). `root` may hold split folders (train/test), class
    sub-folders, or images directly (flat: one unnamed class, class_names == [])."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root} (set {flag_of('DATA_ROOT')})")
    split_dirs = [root / s for s in splits if (root / s).is_dir()]
    missing = [root / s for s in splits if not (root / s).is_dir()]
    if split_dirs and missing:
        raise UserError(f"split folder not found: {missing[0]} (set {flag_of('DATA_SPLITS')})")
    tops = split_dirs or [root]
    layouts = [_scan(top) for top in tops]
    class_names = sorted({name for names, _ in layouts for name in names})
    if len({tuple(names) for names, _ in layouts}) > 1:
        raise UserError(f"the split folders of {root} have different class sub-folders")
    files, labels = [], []
    for names, groups in layouts:
        for name, group in zip(names or [""], groups):
            files += group
            labels += [class_names.index(name) if name else 0] * len(group)
    return files, labels, class_names


def _scan(top):
    """(class names, [files per class]) of one folder; flat folders have no class names."""
    flat = images_in(top, recursive=False)
    classes = subfolders(top)
    if flat:
        if any(images_in(c, recursive=True) for c in classes):
            raise UserError(f"{top} holds both images and class sub-folders with images; use one layout")
        return [], [flat]
    if not classes:
        raise UserError(f"no images found in {top}")
    groups = [images_in(c, recursive=True) for c in classes]
    for c, group in zip(classes, groups):
        if not group:
            raise UserError(f"class folder has no images: {c}")
    return [c.name for c in classes], groups


def load_image(path, resolution, mode="L", resize_mode="pad"):
    """Decode one image to a (C, R, R) uint8 array: grayscale (or RGB), square, resized."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit or float slices: rescale to 0..255
            arr = np.asarray(img, dtype=np.float64)
            arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-12) * 255
            img = Image.fromarray(arr.round().astype(np.uint8))
        img = img.convert(mode)
    if resize_mode == "pad" and img.width != img.height:
        side = max(img.size)
        img = ImageOps.pad(img, (side, side), color=0, centering=(0.5, 0.5))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@dataclass
class SliceDataset:
    """All slices in memory: images (N, C, R, R) uint8, labels (N,) int64, class names."""
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list
    skipped: int = 0

    def __len__(self):
        return len(self.images)

    @property
    def channels(self):
        return self.images.shape[1]

    def summary(self):
        counts = torch.bincount(self.labels, minlength=max(len(self.class_names), 1)).tolist()
        classes = ", ".join(f"{n} {c}" for n, c in zip(self.class_names, counts)) or "no classes (flat folder)"
        skipped = f"; skipped {self.skipped} unreadable" if self.skipped else ""
        return f"{len(self)} images, {classes}, {self.images.shape[-1]}x{self.images.shape[-1]}{skipped}"


def load_dataset(root, splits, resolution, mode="L", resize_mode="pad", skip_bad=False, threads=2, progress=True):
    """Find and decode every image under `root`. A corrupt file stops with a UserError naming it,
    unless `skip_bad`, which skips and counts such files."""
    files, labels, class_names = find_images(root, splits)

    def decode(path):
        try:
            return load_image(path, resolution, mode, resize_mode)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(tqdm(pool.map(decode, files), total=len(files), desc="loading images",
                            disable=not progress, leave=False, file=sys.stdout))
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    bad = [i for i, r in enumerate(results) if isinstance(r, str)]
    if bad and not skip_bad:
        raise UserError(f"cannot read image {files[bad[0]]} ({results[bad[0]]}); "
                        f"fix or remove it, or pass {flag_of('SKIP_BAD_IMAGES')}")
    if not keep:
        raise UserError(f"no readable images in {root}")
    images = torch.from_numpy(np.stack([results[i] for i in keep]))
    return SliceDataset(images, torch.tensor([labels[i] for i in keep], dtype=torch.long), class_names, len(bad))


class EpochSampler:
    """Seeded batches of indices: a new permutation each epoch (the same for the same seed and
    epoch), split across `world_size` processes, and able to start mid-epoch for exact resume."""

    def __init__(self, n, batch_size, seed, rank=0, world_size=1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // batch_size  # full batches only

    def batches(self, epoch, start_step=0):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g)
        for step in range(start_step, self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield batch[self.rank::self.world_size]


def random_flips(x, hflip, vflip):
    """Flip each image of a (N, C, H, W) batch left-right and/or up-down with probability 0.5."""
    for enabled, dim in ((hflip, 3), (vflip, 2)):
        if enabled:
            mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
            x = torch.where(mask, x.flip(dim), x)
    return x


def to_model_range(x):
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float().mul_(2 / 255).sub_(1)
