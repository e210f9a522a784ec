"""Brain-slice data: the ADNI layout (AD_NC/{train,test}/{AD,NC}/*.jpeg), any folder of class
sub-folders, or a flat folder of images (OASIS PNG slices, trained unconditionally). Folders may
also hold NIfTI volumes (.nii / .nii.gz), each read as its axial slices.

Every image is decoded once at start (which also finds corrupt files before training), made
grayscale, padded to square (or stretched) and resized, and kept as a uint8 tensor in memory (on
a CUDA device, in GPU memory when it fits).
Random flips and the conversion to [-1, 1] happen on the training device, per batch.
The built-in demo data set is built by demo_data.py on first use."""
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from demo_data import ensure_demo_dataset
from settings import UserError, check_slice_range, flag_of

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
SPLIT_NAMES = ("train", "test")  # a folder holding either is in the ADNI layout: its splits must be named
VOLUME_SUFFIXES = (".nii", ".nii.gz")  # NIfTI volumes; ".nii.gz" is two suffixes, so match the name's end
MIN_IMAGE_SIDE = 16  # pixels: a smaller image holds no anatomy worth resizing into a slice


def is_volume_name(path):
    return Path(path).name.lower().endswith(VOLUME_SUFFIXES)


def is_image_file(path):
    """An image or a NIfTI volume (the files the loader reads, and links to them, also broken ones), not
    hidden."""
    return ((path.is_file() or path.is_symlink()) and not path.is_dir() and not path.name.startswith(".")
            and (path.suffix.lower() in IMAGE_EXTENSIONS or is_volume_name(path)))


def images_in(folder, recursive):
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if is_image_file(p))


def subfolders(folder):
    """The sub-folders of `folder`, less hidden ones and links back to it or a folder above it (`ln -s . x`)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and not loops_back(p))


def loops_back(path):
    """A symbolic link to a folder that contains it (reading through it would go round in a circle)."""
    if not path.is_symlink():
        return False
    target, here = path.resolve(), path.parent.resolve()
    return target == here or target in here.parents


def find_images(root, splits=("train",)):
    """Return (files, labels, class_names). `root` may hold split folders (train/test), class
    sub-folders, or images directly (flat: one unnamed class, class_names == [])."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"{flag_of('DATA_ROOT')} {root} is a file; give the folder that holds the images")
    if not root.is_dir():
        raise UserError(f"data folder not found: {root} (set {flag_of('DATA_ROOT')} or DATA_ROOT in constants.py, "
                        f"or try the built-in demo data: python train.py --preset demo)")
    if not splits:
        raise UserError(f"train.py's {flag_of('DATA_SPLITS')} names no split folder; give at least one, such as train")
    split_dirs = [root / s for s in splits if (root / s).is_dir()]
    missing = [root / s for s in splits if not (root / s).is_dir()]
    if missing and (split_dirs or any((root / s).is_dir() for s in SPLIT_NAMES)):
        raise UserError(f"split folder not found: {missing[0]} (train.py's {flag_of('DATA_SPLITS')} names the "
                        f"split folders of {flag_of('DATA_ROOT')})")
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
        raise UserError(f"no images (or .nii/.nii.gz volumes) found in {top}")
    groups = [images_in(c, recursive=True) for c in classes]
    for c, group in zip(classes, groups):
        if not group:
            raise UserError(f"class folder has no images: {c}")
    return [c.name for c in classes], groups


def load_image(path, resolution, mode="L", resize_mode="pad"):
    """Decode one image to a (C, R, R) uint8 array: grayscale (or RGB), square, resized. Images smaller
    than MIN_IMAGE_SIDE on a side, and float images without a finite pixel, are refused."""
    return load_image_and_kind(path, resolution, mode, resize_mode)[0]


def load_image_and_kind(path, resolution, mode="L", resize_mode="pad"):
    """load_image's array and the file's ((width, height), mode) as stored."""
    with Image.open(path) as img:
        kind = img.size, img.mode
        img.load()
        if min(img.size) < MIN_IMAGE_SIDE:
            raise ValueError(f"{img.width}x{img.height} pixels, smaller than the smallest slice read "
                             f"({MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})")
        if img.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit or float slices: rescale to 0..255
            arr = np.asarray(img, dtype=np.float64)
            finite = np.isfinite(arr)
            if not finite.any():
                raise ValueError("no pixel holds a finite value (all NaN or infinite)")
            lo, hi = arr[finite].min(), arr[finite].max()
            arr = (np.where(finite, arr, lo) - lo) / max(hi - lo, 1e-12) * 255
            img = Image.fromarray(arr.round().astype(np.uint8))
        img = img.convert(mode)
    return fit_image(img, resolution, resize_mode), kind


def fit_image(img, resolution, resize_mode="pad"):
    """A PIL image -> (C, R, R) uint8 array: padded to square with black (or stretched), resized."""
    if resize_mode == "pad" and img.width != img.height:
        side = max(img.size)
        img = ImageOps.pad(img, (side, side), color=0, centering=(0.5, 0.5))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------
# NIfTI volumes: each volume becomes its axial slices
# ---------------------------------------------------------------------------------------
VOLUME_PERCENTILES = (1.0, 99.5)  # intensity window of a volume: percentiles of its non-zero voxels
BRAIN_LEVEL = 0.1  # brain (for choosing slices): voxels above this fraction of the upper percentile
MIN_SLICE_AREA = 0.3  # keep slices whose brain area is at least this fraction of the largest slice's


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise UserError("reading NIfTI volumes (.nii/.nii.gz) needs nibabel: pip install nibabel") from None
    return nibabel


def normalise_volume(data):
    """(uint8 volume, brain mask): intensities clipped to the 1st..99.5th percentile of the non-zero
    voxels and scaled to 0..255; brain = voxels brighter than BRAIN_LEVEL of the upper percentile
    (skull-stripped volumes: the non-zero voxels; raw ones: not the background noise)."""
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).any():
        raise ValueError("no voxel holds a finite value (all NaN or infinite)")
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    nonzero = data[data != 0]
    if nonzero.size == 0:
        raise ValueError("the volume is empty (all voxels are zero)")
    lo, hi = (float(v) for v in np.percentile(nonzero, VOLUME_PERCENTILES))
    brain = data > BRAIN_LEVEL * hi if hi > 0 else data != 0
    out = (data - lo) * np.float32(255 / max(hi - lo, 1e-12))
    return np.clip(out, 0, 255, out=out).round().astype(np.uint8), brain


def select_slices(brain, slice_range=(0.0, 1.0)):
    """Indices along the last (axial) axis of a boolean brain mask: the slices within `slice_range`
    (fractions of the height, bottom to top) whose brain area is at least MIN_SLICE_AREA of the
    largest area among them (none when there is no brain in that range)."""
    lo, hi = slice_range
    nz = brain.shape[-1]
    start = min(int(np.floor(lo * nz)), nz - 1)
    stop = max(int(np.ceil(hi * nz)), start + 1)
    area = brain[..., start:stop].sum(axis=tuple(range(brain.ndim - 1)))
    if area.max() == 0:
        return []
    return [start + int(i) for i in np.flatnonzero(area >= MIN_SLICE_AREA * area.max())]


def load_volume(path, resolution, mode="L", resize_mode="pad", slice_range=(0.0, 1.0)):
    """Read one NIfTI volume to an (N, C, R, R) uint8 array of its axial slices, anterior up:
    reoriented to canonical (RAS+, axial = last axis), intensity-normalised per volume, the
    brain-holding slices within `slice_range` kept, and each slice fitted like a 2D image."""
    nib = _nibabel()
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {tuple(img.shape)}")
    volume, brain = normalise_volume(data)
    zx, zy = (float(z) for z in img.header.get_zooms()[:2])
    slices = []
    for k in select_slices(brain, slice_range):
        sl = Image.fromarray(np.ascontiguousarray(np.flipud(volume[:, :, k].T)))  # rows: anterior -> posterior
        if zx > 0 and zy > 0 and abs(zx / zy - 1) > 0.01:  # non-square voxels: make pixels square
            unit = min(zx, zy)
            sl = sl.resize((max(1, round(sl.width * zx / unit)), max(1, round(sl.height * zy / unit))),
                           Image.Resampling.BICUBIC)
        slices.append(fit_image(sl.convert(mode), resolution, resize_mode))
    if not slices:
        return np.zeros((0, len(mode), resolution, resolution), np.uint8)
    return np.stack(slices)


@dataclass
class SliceDataset:
    """All slices in memory: images (N, C, R, R) uint8, labels (N,) int64, class names."""
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list
    skipped: int = 0
    volumes: int = 0  # NIfTI volumes the slices came from (0 for a folder of 2D images)
    kinds: Counter = field(default_factory=Counter)  # the 2D files' (size, mode) as stored, before the transforms

    def __len__(self):
        return len(self.images)

    @property
    def channels(self):
        return self.images.shape[1]

    def summary(self):
        counts = torch.bincount(self.labels, minlength=max(len(self.class_names), 1)).tolist()
        classes = ", ".join(f"{n} {c}" for n, c in zip(self.class_names, counts)) or "no classes (flat folder)"
        skipped = f"; skipped {self.skipped} unreadable" if self.skipped else ""
        volumes = f" ({self.volumes} NIfTI volumes)" if self.volumes else ""
        return (f"{len(self)} images{volumes}, {classes}, "
                f"{self.images.shape[-1]}x{self.images.shape[-1]}{skipped}{self.mixed_kinds()}")

    def mixed_kinds(self):
        """'; stored as 256x240 L (2397), 512x300 RGB (1)' when the files differ in size or mode (a stray
        file in a folder of slices is easy to miss once padded and resized), else ''."""
        if len(self.kinds) < 2:
            return ""
        kinds = sorted(self.kinds.items(), key=lambda kind: (-kind[1], kind[0]))  # the most common first
        return "; stored as " + ", ".join(f"{w}x{h} {mode} ({n})" for ((w, h), mode), n in kinds)


def load_dataset(root, splits, resolution, mode="L", resize_mode="pad", skip_bad=False, threads=2, progress=True,
                 *, slice_range=(0.0, 1.0)):
    """Find and decode every image under `root`; a NIfTI volume adds its axial slices within
    `slice_range` (see select_slices), each with the volume's class. A corrupt file stops with a
    UserError naming it, unless `skip_bad`, which skips and counts such files."""
    slice_range = check_slice_range(slice_range)
    files, labels, class_names = find_images(root, splits)
    if any(is_volume_name(f) for f in files):
        _nibabel()  # missing nibabel is a setup problem, not a corrupt file

    kinds = {}  # each decoded 2D file's stored size and mode

    def decode(path):
        if path.is_symlink() and not path.exists():
            return f"a link to a missing file, {os.readlink(path)}"
        try:
            if is_volume_name(path):
                return load_volume(path, resolution, mode, resize_mode, slice_range)
            image, kinds[path] = load_image_and_kind(path, resolution, mode, resize_mode)
            return image[None]
        except Exception as e:  # noqa: BLE001 - PIL and nibabel raise many types for bad files
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"

    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        results = list(tqdm(pool.map(decode, files), total=len(files), desc="loading images",
                            disable=not progress, leave=False, file=sys.stdout))
    finally:  # on Ctrl-C or SIGTERM, drop the images not yet started
        pool.shutdown(wait=True, cancel_futures=True)
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    bad = [i for i, r in enumerate(results) if isinstance(r, str)]
    if bad and not skip_bad:
        kind = "volume" if is_volume_name(files[bad[0]]) else "image"
        raise UserError(f"cannot read {kind} {files[bad[0]]} ({results[bad[0]]}); "
                        f"fix or remove it, or pass {flag_of('SKIP_BAD_IMAGES')}")
    if not keep:
        raise UserError(f"no readable images in {root}")
    if not any(len(results[i]) for i in keep):
        lo, hi = slice_range
        raise UserError(f"the volumes in {root} have no brain within the slice range {lo:g},{hi:g} "
                        f"(train.py's {flag_of('SLICE_RANGE')})")
    images = torch.from_numpy(np.concatenate([results[i] for i in keep]))
    slice_labels = torch.tensor(np.repeat([labels[i] for i in keep], [len(results[i]) for i in keep]),
                                dtype=torch.long)
    volumes = sum(is_volume_name(files[i]) for i in keep)
    return SliceDataset(images, slice_labels, class_names, len(bad), volumes, Counter(kinds.values()))


def load_slices(cfg, splits=None):
    """The slices a run's settings name (DATA_ROOT, DATA_SPLITS unless `splits` is given, RESOLUTION,
    ...); the demo set is built first when DATA_ROOT is DEMO_ROOT and it is missing."""
    if Path(cfg.data_root) == Path(cfg.demo_root):
        ensure_demo_dataset(cfg.demo_root, atrophy=cfg.demo_atrophy)
    splits = splits if splits is not None else [s for s in cfg.data_splits.split(",") if s]
    return load_dataset(cfg.data_root, splits, cfg.resolution, cfg.image_mode, cfg.resize_mode,
                        cfg.skip_bad_images, cfg.load_threads, slice_range=cfg.slice_range)


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


def to_model_range(x):
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float().mul_(2 / 255).sub_(1)


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
