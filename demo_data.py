"""The built-in demo data set: ADNI-style 256x240 slices in the AD_NC layout, synthesised from the
MNI152 brain template that ships with nilearn (no download), with simulated AD atrophy, for trying
the toolkit without ADNI access. dataset.load_slices builds it on first use (ensure_demo_dataset)."""
import functools
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import constants
from settings import UserError

DEMO = constants.DEMO

# Each demo "subject" is the MNI152 2009 template (skull-stripped T1 with grey/white matter maps,
# shipped inside nilearn, so no download) under a random smooth deformation, a small affine change,
# an intensity bias field, a tone/gamma change and Rician noise. AD subjects also get the atrophy
# that simulation studies model (e.g. Karacali & Davatzikos 2006, Khanal et al. 2017): ventricles
# expanded by a deformation pushing their walls outward, grey matter next to CSF turned into CSF
# (wider sulci, thinner cortex) and a global brain shrinkage, all scaled by `atrophy`.
DEMO_FORMAT = 1  # bump when the images a given set of parameters makes change
DEMO_SIZE = (256, 240)  # (width, height) of ADNI's slices
DEMO_Z_MM = (-1.0, 36.0)  # MNI heights of the slices: top of the temporal lobes to the centrum semiovale
DEMO_PX_PER_MM = 1.2  # brain ~170 px wide and ~215 px long (anterior up) in the 256 x 240 frame
DEMO_SLAB_MARGIN_MM = 18.0  # template kept above/below the slices, room for tilts and deformations
DEMO_MANIFEST = "demo.json"
DEMO_CLASSES = ("AD", "NC")
DEMO_SPLITS = ("train", "test")
# template intensity (0..1) -> output intensity: dark CSF, mid-grey GM, bright WM as in a real T1 scan
DEMO_TONE_IN = (0.0, 0.2, 0.39, 0.65, 0.84, 1.0)
DEMO_TONE_OUT = (0.0, 0.02, 0.09, 0.47, 0.78, 0.92)
DEMO_GM_MINUS_CSF = 0.26  # template intensity of grey matter minus that of CSF


@functools.lru_cache(maxsize=1)
def _demo_template():
    """The MNI152 template around the demo slices, loaded once per process: `t1` (T1 intensity
    0..1, zero outside the brain), `t1_erosion` (T1 and the grey matter next to CSF that cortical
    atrophy turns into CSF first), `vent` (x, y, z voxel shifts, at most 1, that enlarge the
    ventricles) as _Volume samplers; `to_vox` (3, 4): MNI mm -> their voxel indices; `centre`:
    the brain's centre in mm."""
    from scipy import ndimage
    try:
        from nilearn import datasets
    except ImportError:
        raise UserError("the demo data set is built from nilearn's MNI152 template: pip install nilearn") from None
    t1_img = datasets.load_mni152_template(resolution=1)
    affine = t1_img.affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise UserError("unexpected MNI152 template from nilearn (expected a 1 mm RAS grid)")
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0  # t1 > 0.2
    # keep the slab of heights around the slices, and the brain's bounding box there plus a margin
    z_lo, z_hi = (int(round(z - affine[2, 3])) for z in
                  (DEMO_Z_MM[0] - DEMO_SLAB_MARGIN_MM, DEMO_Z_MM[1] + DEMO_SLAB_MARGIN_MM))
    z_lo, z_hi = max(z_lo, 0), min(z_hi + 1, t1.shape[2])
    xy = np.argwhere(mask[:, :, z_lo:z_hi].any(axis=2))
    (x_lo, y_lo), (x_hi, y_hi) = np.maximum(xy.min(0) - 12, 0), np.minimum(xy.max(0) + 13, t1.shape[:2])
    crop = (slice(x_lo, x_hi), slice(y_lo, y_hi), slice(z_lo, z_hi))
    t1, gm, wm, mask = (a[crop] for a in (t1, gm, wm, mask))
    origin = affine[:3, 3] + [x_lo, y_lo, z_lo]  # mm of voxel (0, 0, 0) of the crop
    t1, gm, wm = t1 * mask, gm * mask, wm * mask  # skull-free
    # grey matter within ~1 mm of CSF or the brain's outer surface
    erosion = gm * np.clip(2 * ndimage.gaussian_filter(np.clip(1 - gm - wm, 0, 1), 1.2), 0, 1)
    # ventricles: the large connected parts of the CSF in the centre of the brain
    csf = np.clip(mask - gm - wm, 0, 1)
    x, y, z = (origin[i] + np.arange(n) for i, n in enumerate(t1.shape))
    box = ((np.abs(x) < 28)[:, None, None] & ((y > -50) & (y < 35))[None, :, None]
           & ((z > -10) & (z < 40))[None, None, :])
    labels, n = ndimage.label((csf > 0.5) & box)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, n + 1))
    ventricles = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max())).astype(np.float32)
    # moving each point up the gradient of the blurred ventricles pushes their walls outward
    vent = np.stack(np.gradient(ndimage.gaussian_filter(ventricles, 4.0)))
    vent /= np.sqrt((vent ** 2).sum(0)).max()
    lo, hi = np.argwhere(mask).min(0), np.argwhere(mask).max(0)
    centre = origin + (lo + hi) / 2
    centre[2] = sum(DEMO_Z_MM) / 2
    to_vox = np.concatenate([np.eye(3), -origin[:, None]], axis=1)
    return dict(t1=_Volume(t1[None]), t1_erosion=_Volume(np.stack([t1, erosion])), vent=_Volume(vent),
                to_vox=to_vox, centre=centre)


class _Volume:
    """A (C, X, Y, Z) volume laid out for fast trilinear sampling with torch's vectorised 2D
    grid_sample (its 3D one is several times slower on CPU): the Z planes of each channel are
    stacked into one tall (Z * Y, X) image, next to a copy shifted by one plane, so one 2D bilinear
    lookup gets planes k and k + 1 at once and a blend along z completes the trilinear sample."""

    def __init__(self, array):
        c, self.nx, self.ny, self.nz = array.shape
        planes = torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 2, 1), dtype=np.float32))
        tall = planes.reshape(c, self.nz * self.ny, self.nx)
        above = torch.cat([tall[:, self.ny:], torch.zeros(c, self.ny, self.nx)], dim=1)
        self.channels = c
        self.mosaic = torch.cat([tall, above])[None]  # (1, 2C, Z * Y, X)

    def sample(self, x, y, z):
        """Trilinear samples (C, S, H, W) at voxel indices x, y, z, each (S, H, W); zero outside."""
        k = z.floor().clamp_(0, self.nz - 2)
        row = k * self.ny + y
        outside = (y < 0) | (y > self.ny - 1) | (z < 0) | (z > self.nz - 1)
        row.masked_fill_(outside, -2.0)  # beyond the mosaic: zero
        grid = torch.stack([x * (2 / (self.nx - 1)) - 1, row.mul_(2 / (self.nz * self.ny - 1)).sub_(1)], dim=-1)
        s, h, w = x.shape
        both = torch.nn.functional.grid_sample(self.mosaic, grid.reshape(1, s * h, w, 2), mode="bilinear",
                                               padding_mode="zeros", align_corners=True)[0]
        both = both.reshape(2, self.channels, s, h, w)
        return torch.lerp(both[0], both[1], (z - k).clamp_(0, 1))


def _smooth_field(rng, points, channels, wavelength_mm, terms=3):
    """Random smooth fields at `points` (..., 3) mm: per channel a sum of `terms` plane waves of
    random direction, wavelength in `wavelength_mm` and phase; unit standard deviation."""
    n = channels * terms
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    freq = direction / rng.uniform(*wavelength_mm, size=(n, 1))
    phase = rng.uniform(0, 2 * np.pi, size=n)
    waves = np.sin(2 * np.pi * points @ freq.T + phase)  # (..., n)
    return waves.reshape(*points.shape[:-1], channels, terms).sum(-1) * np.sqrt(2 / terms)


def _rotation(rx, ry, rz):
    """Rotation matrix from angles (radians) about x, y and z."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    return (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))


def _resize(fields, size):
    """Bilinear upsampling of (S, C, h, w) fields to (S, C, *size), corners kept."""
    return torch.nn.functional.interpolate(fields, size=size, mode="bilinear", align_corners=True)


def _piecewise_linear(x, xs, ys):
    """np.interp for a torch tensor with a few knots `xs` (increasing), clamped at both ends."""
    out = torch.full_like(x, float(ys[0]))
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        out += (x - x0).clamp_(0, x1 - x0) * float((y1 - y0) / (x1 - x0))
    return out


def render_demo_subject(rng, n_slices, ad_severity=0.0):
    """(n_slices, 240, 256) uint8 axial slices (bottom to top) of one random subject drawn with
    numpy Generator `rng`. `ad_severity` 0 is a healthy brain, 1 the default AD atrophy."""
    tpl = _demo_template()
    width, height = DEMO_SIZE
    centre = tpl["centre"]
    # --- everything random is drawn first, in a fixed order
    angles = np.deg2rad(rng.normal(0, [1.5, 1.0, 3.0]))  # tilts about x and y; in-plane rotation
    scale = rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, size=3)  # head size and shape
    shift = np.append(rng.normal(0, 2.5, size=2), rng.uniform(-2, 2))  # mm; z: where the slices lie
    warp_mm = rng.uniform(1.5, 3.0)
    warp_rng, bias_rng = (np.random.default_rng(rng.integers(2**63)) for _ in range(2))
    bias_amp = rng.uniform(0.04, 0.10)
    tone = np.array(DEMO_TONE_OUT) * np.r_[1, 1, rng.uniform(0.7, 1.4), rng.uniform(0.92, 1.08),
                                           rng.uniform(0.95, 1.05), rng.uniform(0.97, 1.03)]
    tone = tone ** rng.uniform(0.85, 1.15)  # a gamma change (applied to the knots of the tone curve)
    noise_sd = rng.uniform(0.008, 0.03)
    noise_seed = int(rng.integers(2**62))
    # --- output pixel -> mm in this subject -> mm in the template: smooth, so computed on a coarse
    # grid (16 x 17 per slice) and upsampled
    z = np.linspace(*DEMO_Z_MM, n_slices) if n_slices > 1 else np.array([sum(DEMO_Z_MM) / 2])
    zz, rows, cols = np.meshgrid(z, np.linspace(0, height - 1, 16), np.linspace(0, width - 1, 17), indexing="ij")
    p = np.stack([(cols - (width - 1) / 2) / DEMO_PX_PER_MM + centre[0],  # columns: left -> right
                  ((height - 1) / 2 - rows) / DEMO_PX_PER_MM + centre[1], zz], axis=-1)  # rows: anterior up
    inverse = _rotation(*angles) @ np.diag(1 / (scale * (1 - 0.03 * ad_severity)))  # AD: global shrinkage
    q = centre + (p - centre - shift) @ inverse.T + warp_mm * _smooth_field(warp_rng, p - centre, 3, (70, 160))
    bias = 1 + bias_amp * np.clip(_smooth_field(bias_rng, p - centre, 1, (120, 300)) / 1.5, -1, 1)
    fields = np.concatenate([q @ tpl["to_vox"][:, :3].T + tpl["to_vox"][:, 3], bias], axis=-1)
    fields = torch.from_numpy(fields.transpose(0, 3, 1, 2)).float().contiguous()  # (S, [x, y, z, bias], 16, 17)
    if ad_severity > 0:  # enlarge the ventricles (a smooth field: sampled at every 4th pixel)
        fields = _resize(fields, (height // 4, width // 4))
        push = 3.5 * ad_severity * tpl["vent"].sample(*fields[:, :3].unbind(1)).transpose(0, 1)
        fields = torch.cat([fields[:, :3] + push, fields[:, 3:]], dim=1)
    x, y, z, bias = _resize(fields, (height, width)).unbind(1)
    # --- intensities: cortical atrophy, tone curve (with gamma), bias field, Rician noise, brain mask
    if ad_severity > 0:  # grey matter next to CSF becomes CSF (never darker than CSF)
        t1, erosion = tpl["t1_erosion"].sample(x, y, z)
        eroded = t1 - DEMO_GM_MINUS_CSF * (0.55 * ad_severity * erosion).clamp_(max=1)
        t1 = torch.maximum(eroded, t1.clamp(max=0.36))
    else:
        t1 = tpl["t1"].sample(x, y, z)[0]
    mask = ((t1 - 0.12) / 0.1).clamp_(0, 1)  # the template is zero outside the brain
    img = _piecewise_linear(t1, DEMO_TONE_IN, tone)
    img *= bias
    noise = torch.randn((2, *img.shape), generator=torch.Generator().manual_seed(noise_seed)).mul_(noise_sd)
    img = ((img + noise[0]).square_() + noise[1].square_()).sqrt_()
    return img.mul_(mask).mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()


def _demo_params(subjects, slices_per_subject, atrophy, seed):
    """The parameters of a demo set as stored in its manifest; a UserError for bad values."""
    try:
        train, test = (int(n) for n in subjects)
    except (TypeError, ValueError):
        raise UserError(f"demo subjects must be two numbers (train, test) per class, got {subjects!r}") from None
    if train < 1 or test < 0:
        raise UserError(f"demo subjects per class need train >= 1 and test >= 0, got {subjects!r}")
    if int(slices_per_subject) < 1:
        raise UserError(f"demo slices per subject must be >= 1, got {slices_per_subject!r}")
    if not float(atrophy) >= 0:
        raise UserError(f"demo atrophy must be >= 0, got {atrophy!r}")
    return {"subjects": [train, test], "slices_per_subject": int(slices_per_subject), "atrophy": float(atrophy),
            "seed": int(seed)}


def _demo_source():
    """What the images depend on besides the parameters: the format and the template's version."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        nilearn = version("nilearn")
    except PackageNotFoundError:
        nilearn = None
    return {"format": DEMO_FORMAT, "template": "MNI152 ICBM 2009a symmetric (nilearn)", "nilearn": nilearn}


def _demo_counts(params):
    train, test = params["subjects"]
    return {f"{split}/{cls}": n * params["slices_per_subject"]
            for split, n in zip(DEMO_SPLITS, (train, test)) if n for cls in DEMO_CLASSES}


def _read_manifest(root):
    try:
        return json.loads((Path(root) / DEMO_MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def demo_dataset_ready(root, subjects=DEMO["subjects"], slices_per_subject=DEMO["slices_per_subject"],
                       atrophy=constants.DEMO_ATROPHY, seed=DEMO["seed"]):
    """Whether `root` holds a complete demo set built with these parameters (by this code version)."""
    root = Path(root)
    params = _demo_params(subjects, slices_per_subject, atrophy, seed)
    manifest = _read_manifest(root)
    if not isinstance(manifest, dict) or manifest.get("params") != params:
        return False
    if any(manifest.get(k) != v for k, v in _demo_source().items()):
        return False
    for folder, n in _demo_counts(params).items():
        try:
            found = sum(1 for e in os.scandir(root / folder) if e.name.endswith(".png"))
        except OSError:
            return False
        if found != n:
            return False
    return True


def _subject_jobs(params):
    """(split, class, index, seed sequence entropy, AD severity) of every demo subject."""
    train, test = params["subjects"]
    jobs = []
    for s, (split, n) in enumerate(zip(DEMO_SPLITS, (train, test))):
        for c, cls in enumerate(DEMO_CLASSES):
            for i in range(n):
                key = [params["seed"], s, c, i]
                severity = 0.0
                if cls == "AD":  # each AD subject's own severity, scaled by `atrophy`
                    severity = params["atrophy"] * np.random.default_rng(key + [1]).uniform(0.6, 1.4)
                jobs.append((split, cls, i, key, severity))
    return jobs


def _remove_stale_partials(root):
    """Remove half-built sets (.NAME.partial-PID) left by builds whose process is gone."""
    for path in root.parent.glob(f".{root.name}.partial-*"):
        try:
            pid = int(path.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            continue  # a build in progress
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError, OSError):
            continue
        shutil.rmtree(path, ignore_errors=True)


def build_demo_dataset(root=constants.DEMO_ROOT, subjects=DEMO["subjects"],
                       slices_per_subject=DEMO["slices_per_subject"], atrophy=constants.DEMO_ATROPHY,
                       seed=DEMO["seed"], progress=True):
    """Build a demo data set in the ADNI layout, root/{train,test}/{AD,NC}/*.png: 8-bit grayscale
    axial slices, 256 wide x 240 high, skull-free on black, anterior up. `subjects` is (train, test)
    subjects per class, each giving `slices_per_subject` slices from the top of the temporal lobes to
    the centrum semiovale. AD subjects get simulated atrophy (enlarged ventricles, wider sulci,
    thinner cortex, a smaller brain) scaled by `atrophy` (0: AD and NC alike). The same parameters
    give byte-identical files. Written to a temporary folder that replaces `root` when complete,
    with the parameters in root/demo.json. Returns `root` as a Path."""
    params = _demo_params(subjects, slices_per_subject, atrophy, seed)
    root = Path(root)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and _read_manifest(root) is None)):
        raise UserError(f"{root} exists and is not a demo data set (no {DEMO_MANIFEST}); "
                        "choose another folder or remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    partial = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    jobs = _subject_jobs(params)
    try:
        for folder in _demo_counts(params):
            (partial / folder).mkdir(parents=True)
        with tqdm(total=len(jobs), desc="building demo data", unit="subject", disable=not progress,
                  file=sys.stdout) as bar:
            _demo_template()

            def make(job):
                split, cls, i, key, severity = job
                slices = render_demo_subject(np.random.default_rng(key), params["slices_per_subject"], severity)
                for k, arr in enumerate(slices):
                    Image.fromarray(arr).save(partial / split / cls / f"{cls}_{split}_{i:03d}_{k:02d}.png",
                                              compress_level=3)

            # one subject per core, each single-threaded: faster than one multi-threaded torch
            workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else os.cpu_count() or 1))
            torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                for _ in pool.map(make, jobs):
                    bar.update()
            finally:  # on an error or Ctrl-C: drop the subjects not started yet
                pool.shutdown(wait=True, cancel_futures=True)
                torch.set_num_threads(torch_threads)
        manifest = {**_demo_source(), "params": params, "counts": _demo_counts(params),
                    "size": list(DEMO_SIZE), "z_mm": list(DEMO_Z_MM)}
        (partial / DEMO_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if root.exists():  # an old demo set (or an empty folder): swap it out
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            root.rename(old)
            partial.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return root


def ensure_demo_dataset(root=constants.DEMO_ROOT, subjects=DEMO["subjects"],
                        slices_per_subject=DEMO["slices_per_subject"], atrophy=constants.DEMO_ATROPHY,
                        seed=DEMO["seed"], progress=True):
    """`root` at once when it holds a complete demo set with these parameters, else build it
    (build_demo_dataset). Returns `root` as a Path."""
    if demo_dataset_ready(root, subjects, slices_per_subject, atrophy, seed):
        return Path(root)
    return build_demo_dataset(root, subjects, slices_per_subject, atrophy, seed, progress)
