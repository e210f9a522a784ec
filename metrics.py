"""Image metrics of a generator against real slices: sliced Wasserstein distance (SWD), MS-SSIM
diversity, FID/KID with the pytorch-fid Inception weights when at hand, precision/recall, D's
scores on training, held-out and generated slices, and the classification accuracy score (a
ResNet-18 trained on synthetic slices, tested on real ones). Evaluator computes them all for one
generator; train.py and evaluate.py both use it."""
import contextlib
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE
from tqdm import tqdm

from checkpoints import read_checkpoint
from dataset import load_slices, to_model_range
from ops import thumbnails
from sampling import images_from_latents
from settings import UserError
from utils import quantize_uint8, save_grid

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"


# ---------------------------------------------------------------------------------------
# Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, ProGAN)
# ---------------------------------------------------------------------------------------
def _binomial_filter(channels, device):
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device)
    k = torch.outer(k, k) / 256
    return k.expand(channels, 1, 5, 5)


def pyramid_down(x):
    """Blur with the 5x5 binomial filter, then keep every second pixel: (N, C, H, W) -> (N, C, H/2, W/2)."""
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(x, _binomial_filter(x.shape[1], x.device), groups=x.shape[1])[:, :, ::2, ::2]


def pyramid_up(x):
    """Zero-insert 2x up-sampling followed by the binomial filter (x4 gain): (N, C, H, W) -> (N, C, 2H, 2W)."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x * 4
    up = F.pad(up, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(up, _binomial_filter(c, x.device), groups=c)


def laplacian_pyramid(x, levels):
    """Band-pass images from fine to coarse; the last level is the low-pass residual."""
    out = []
    for _ in range(levels - 1):
        low = pyramid_down(x)
        out.append(x - pyramid_up(low))
        x = low
    return out + [x]


def swd_levels(resolution, coarsest=16):
    """Pyramid levels from `resolution` down to `coarsest` pixels (ProGAN: 16)."""
    return int(math.log2(max(resolution // coarsest, 1))) + 1


def patch_descriptors(level, per_image, size, generator):
    """`per_image` random size x size patches of each image, normalised per channel: (N * per_image, C*size*size)."""
    n, c, h, w = level.shape
    ys = torch.randint(0, h - size + 1, (n, per_image), generator=generator).to(level.device)
    xs = torch.randint(0, w - size + 1, (n, per_image), generator=generator).to(level.device)
    offsets = torch.arange(size, device=level.device)
    rows = (ys[..., None] + offsets)[..., :, None]  # (N, P, size, 1)
    cols = (xs[..., None] + offsets)[..., None, :]  # (N, P, 1, size)
    batch = torch.arange(n, device=level.device)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[batch, rows, cols]  # (N, P, size, size, C)
    patches = patches.reshape(-1, size * size, c)
    patches = (patches - patches.mean(dim=(0, 1))) / patches.std(dim=(0, 1)).clamp_min(1e-8)
    return patches.permute(0, 2, 1).reshape(len(patches), -1)


def sliced_wasserstein(a, b, generator, directions=128, repeats=4):
    """Mean 1-D Wasserstein distance of a and b (M, D) along random unit directions."""
    results = []
    for _ in range(repeats):
        dirs = torch.randn(a.shape[1], directions, generator=generator).to(a.device)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        pa, pb = (np.sort((x @ dirs).T.contiguous().cpu().numpy(), axis=1) for x in (a, b))  # NumPy sorts faster
        results.append(np.abs(pa - pb).mean())
    return float(np.mean(results))


def swd_descriptors(images, seed, patches=128, size=7):
    """Per pyramid level: the normalised patch descriptors of images (N, C, R, R) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    levels = laplacian_pyramid(images.float(), swd_levels(images.shape[-1]))
    return [patch_descriptors(level, patches, size, g) for level in levels]


def swd(real_desc, fake_desc, resolution, seed):
    """{'swd_R': SWD x 1e3 at pyramid level R} and 'swd' (their mean), from swd_descriptors outputs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (real, fake) in enumerate(zip(real_desc, fake_desc)):
        m = min(len(real), len(fake))
        out[f"swd_{resolution >> i}"] = 1e3 * sliced_wasserstein(real[:m], fake[:m], g)
    return {"swd": float(np.mean(list(out.values()))), **out}


# ---------------------------------------------------------------------------------------
# Multi-scale structural similarity (Wang et al. 2003) as a diversity measure
# ---------------------------------------------------------------------------------------
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(size, sigma, channels, device):
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, size, size)


def _ssim_and_cs(x, y, window, data_range):
    """Per-image mean SSIM and contrast-structure term with a 'valid' Gaussian window."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    groups = x.shape[1]

    def blur(t):
        return F.conv2d(t, window, groups=groups)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx.square(), blur(y * y) - my.square(), blur(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    ssim = (2 * mx * my + c1) / (mx.square() + my.square() + c1) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim(x, y, data_range=2.0, window=11, sigma=1.5):
    """MS-SSIM of image pairs (N, C, H, W) -> (N,). Uses the standard 5 scales where the 11x11
    window fits, with the weights of the scales used renormalised to sum to 1."""
    size = min(x.shape[-2:])
    window = min(window, size - (size + 1) % 2)
    scales = min(len(MS_SSIM_WEIGHTS), 1 + int(math.log2(size / window)))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x.device)
    weights = weights / weights.sum()
    win = _gaussian_window(window, sigma, x.shape[1], x.device)
    x, y = x.float(), y.float()
    terms = []
    for i in range(scales):
        ssim, cs = _ssim_and_cs(x, y, win, data_range)
        terms.append((ssim if i == scales - 1 else cs).clamp_min(0))
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.stack(terms, 1).pow(weights).prod(1)


def ssim(x, y, data_range=2.0, window=11, sigma=1.5):
    """Single-scale SSIM of image pairs (N, C, H, W) -> (N,), with an 11x11 Gaussian window (smaller on tiny images)."""
    size = min(x.shape[-2:])
    window = min(window, size - (size + 1) % 2)
    return _ssim_and_cs(x.float(), y.float(), _gaussian_window(window, sigma, x.shape[1], x.device), data_range)[0]


def mean_pair_ms_ssim(images, seed, batch=256):
    """Mean MS-SSIM over len(images) // 2 random disjoint pairs."""
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    half = len(images) // 2
    a, b = images[perm[:half]], images[perm[half:2 * half]]
    scores = [ms_ssim(a[i:i + batch], b[i:i + batch]) for i in range(0, half, batch)]
    return torch.cat(scores).mean().item()


# ---------------------------------------------------------------------------------------
# Feature-space distances: Frechet distance, kernel Inception distance, precision and recall
# ---------------------------------------------------------------------------------------
def feature_stats(features):
    """Mean and covariance (float64 NumPy) of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), the Frechet distance of two Gaussians.
    Tr (S1 S2)^1/2 is computed as the sum of sqrt eigenvalues of the symmetric S1^1/2 S2 S1^1/2."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def kernel_distance(real, fake, seed, subsets=100, subset_size=1000):
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over
    random subsets. Returns (mean, standard deviation over subsets)."""
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    n, d = min(len(real), len(fake), subset_size), real.shape[1]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:n]]
        y = fake[torch.randperm(len(fake), generator=g)[:n]]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
        values.append((off - 2 * kxy.mean()).item())
    return float(np.mean(values)), float(np.std(values))


def knn_radii(features, k=3, chunk=1024):
    """Distance from each point to its k-th nearest other point."""
    out = []
    for i in range(0, len(features), chunk):
        d = torch.cdist(features[i:i + chunk], features)
        out.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is at distance 0
    return torch.cat(out)


def manifold_coverage(reference, radii, query, chunk=1024):
    """Share of `query` points inside at least one ball (reference point, its k-NN radius)."""
    inside = [(torch.cdist(query[i:i + chunk], reference) <= radii).any(dim=1) for i in range(0, len(query), chunk)]
    return torch.cat(inside).float().mean().item()


def manifold_figures(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features (N, D), and knn_ratio:
    the median k-NN radius of the fakes over that of the reals (at equal numbers). Below 1 the
    generated images crowd closer together than real ones do, and recall falls; above 1 they
    spread wider, and precision falls."""
    real, fake = real.float(), fake.float()
    k = min(k, len(real) - 1, len(fake) - 1)
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    return (manifold_coverage(real, real_radii, fake), manifold_coverage(fake, fake_radii, real),
            (fake_radii.median() / real_radii.median()).item())


def precision_recall(real, fake, k=3):
    """Improved precision and recall of features (N, D)."""
    return manifold_figures(real, fake, k)[:2]


def pixel_features(images, size=16):
    """Weight-free features: the images' size x size thumbnails, (N, C*size*size)."""
    return thumbnails(images, size)


# ---------------------------------------------------------------------------------------
# Memorisation: are generated slices copies of training slices?
# ---------------------------------------------------------------------------------------
MEMO_SIZE = 256  # images are compared at their size up to 256x256 (area-averaged above): pixel space
MEMO_PAIRS = 8  # closest generated/training pairs in memorisation.png


def memo_features(images):
    """Images (N, C, R, R) in [-1, 1] -> (N, C*S*S) with S = min(R, MEMO_SIZE), scaled so that the
    Euclidean distance of two rows is the root-mean-square difference of the images."""
    x = images.float()
    if x.shape[-1] > MEMO_SIZE:
        x = F.adaptive_avg_pool2d(x, MEMO_SIZE)
    x = x.flatten(1)
    return x / math.sqrt(x.shape[1])


def nearest(query, reference, exclude_self=False, chunk=512):
    """(distance, index) of each query row's nearest reference row; with exclude_self (query is
    reference) each row's nearest other row."""
    dists, index = [], []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], reference)
        if exclude_self:
            d[torch.arange(len(d)), torch.arange(i, i + len(d))] = math.inf
        best = d.min(dim=1)
        dists.append(best.values)
        index.append(best.indices)
    return torch.cat(dists), torch.cat(index)


@torch.no_grad()
def d_features(D, images, device, batch=64):
    """The discriminator's features of images (N, C, R, R) in [-1, 1], flattened on the CPU: its
    learned space for the memorisation audit (each image's own, before the minibatch std)."""
    was_training = D.training
    D.eval()
    try:
        return torch.cat([D.features(images[i:i + batch].to(device)).float().flatten(1).cpu()
                          for i in range(0, len(images), batch)])
    finally:
        D.train(was_training)


def memorisation_reference(train, heldout=None, features=memo_features):
    """What the memorisation audit needs of the real slices, computed once: the training slices'
    features, each one's distance to its nearest other training slice, and the held-out slices'
    distances to their nearest training slice (or None)."""
    train = features(train)
    d_train, _ = nearest(train, train, exclude_self=True)
    d_heldout = nearest(features(heldout), train)[0] if heldout is not None else None
    return train, d_train, d_heldout


def memorisation(fake, train, heldout=None, reference=None, features=memo_features):
    """Whether generated slices copy training slices, by default in pixel space (RMS difference,
    [-1, 1] units); `features` maps images to another space (the discriminator's: d_features).

    nn_dist_fake, nn_dist_heldout: mean distance from each generated (held-out real) slice to its
    nearest training slice. copy_rate: the share of generated slices closer to a training slice than
    the 1st percentile of the held-out-to-training distances (real slices of unseen subjects are
    that close only 1% of the time). authenticity (Alaa et al. 2022): the share of generated slices
    farther from their nearest training slice than that slice is from its own nearest other
    training slice. `reference`: memorisation_reference(train, heldout), when already computed.
    Returns (figures, (distance, index of the nearest training slice) per fake)."""
    train, d_train, d_heldout = reference or memorisation_reference(train, heldout, features)
    d_fake, idx = nearest(features(fake), train)
    out = dict(nn_dist_fake=d_fake.mean().item(), authenticity=(d_fake > d_train[idx]).float().mean().item())
    if d_heldout is not None:
        threshold = torch.quantile(d_heldout, 0.01)
        out.update(nn_dist_heldout=d_heldout.mean().item(), copy_rate=(d_fake < threshold).float().mean().item())
    return out, (d_fake, idx)


# ---------------------------------------------------------------------------------------
# Inception-v3 features (the network and weights of FID, from a local file)
# ---------------------------------------------------------------------------------------
def _tf_avg_pool(x):
    """TensorFlow's 3x3 stride-1 'SAME' average pool, which does not count the padded zeros."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _e_branches(block, x):
    """Shared non-pool branches of an InceptionE block."""
    b1 = block.branch1x1(x)
    b3 = block.branch3x3_1(x)
    b3 = torch.cat([block.branch3x3_2a(b3), block.branch3x3_2b(b3)], 1)
    bd = block.branch3x3dbl_2(block.branch3x3dbl_1(x))
    bd = torch.cat([block.branch3x3dbl_3a(bd), block.branch3x3dbl_3b(bd)], 1)
    return b1, b3, bd


class FIDInceptionA(InceptionA):
    """InceptionA block whose pool branch uses TF-style avg-pool (count_include_pad=False)."""

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, bd, bp], 1)


class FIDInceptionC(InceptionC):
    """InceptionC block whose pool branch uses TF-style avg-pool (count_include_pad=False)."""

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class FIDInceptionE1(InceptionE):
    """First InceptionE block (Mixed_7b) with TF-style avg-pool (count_include_pad=False)."""

    def forward(self, x):
        b1, b3, bd = _e_branches(self, x)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionE2(InceptionE):
    """Second InceptionE block (Mixed_7c) whose pool branch is a 3x3/stride-1 max-pool."""

    def forward(self, x):
        b1, b3, bd = _e_branches(self, x)
        bp = self.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(Inception3):
    """Inception-v3 as used for FID: maps (N, 3, H, W) images in [0, 1] to (N, 2048) pool3 features."""

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE1(1280)
        self.Mixed_7c = FIDInceptionE2(2048)
        self.eval()

    def train(self, mode=True):
        """Always in eval mode: batch norm uses the file's running statistics."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        x = x.to(self.fc.weight.dtype)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1]
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, self.avgpool):
            x = layer(x)
        return torch.flatten(x, 1)


def load_fid_inception(path):
    """FIDInceptionV3 with the weights file at `path` (strict); any problem is a one-line UserError."""
    try:
        state = read_checkpoint(path)  # weights_only: nothing in the file runs
    except UserError as e:
        raise UserError(f"--inception-weights: {e}") from None
    model = FIDInceptionV3()
    if not isinstance(state, dict):
        raise UserError(f"--inception-weights: {path} is not a state dict ({FID_WEIGHTS_FILE} is)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and getattr(state[k], "shape", None) != expected[k].shape]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shaped", wrong)):
        if keys:
            raise UserError(f"--inception-weights: {path} is not {FID_WEIGHTS_FILE}: {len(keys)} {what} "
                            f"weights, e.g. {keys[0]}")
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)


FID_SKIPPED = f"FID/KID skipped: no Inception weights (download {FID_WEIGHTS_URL} and pass --inception-weights PATH)"


def load_inception(path, device):
    """The FID Inception network from `path`, or None when no path is given. A path that is not there is an
    error, not a skip: a mistyped one would drop FID/KID from a whole run, and a resumed run's best.pt
    would change the metric it is picked by."""
    if not path:
        return None
    if not Path(path).is_file():
        raise UserError(f"--inception-weights: {path} not found (download it from {FID_WEIGHTS_URL}, or give "
                        "--inception-weights '' for no FID/KID)")
    return load_fid_inception(path).to(device)


@torch.no_grad()
def inception_features(model, images, batch=100):
    """(N, 2048) pool features of images (N, C, R, R) in [-1, 1]; grayscale is repeated to 3 channels."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = (images[i:i + batch].to(device).float() + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        out.append(model(x).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------
# All image metrics of a generator against a fixed set of real images
# ---------------------------------------------------------------------------------------
def quantize(images):
    """Round images in [-1, 1] to the 256 grey levels of a PNG, so generated and real images compare alike."""
    return to_model_range(quantize_uint8(images))


@contextlib.contextmanager
def seeded_rng(seed, device):
    """Run a block with the global RNGs (CPU, and `device` when CUDA) seeded, then restore them, so that
    evaluation never changes a training run's random numbers."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample_images(G, labels, n, seed, device, truncation=1.0, batch=64):
    """n images (N, C, R, R) in [-1, 1] on the CPU, the same for the same seed; the global RNG is untouched."""
    with seeded_rng(seed, device):
        z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
        images = images_from_latents(G, z, labels if G.num_classes else None, truncation, "random", batch, device)
    return quantize(images)


@torch.no_grad()
def d_scores(D, images, labels, device, batch=64):
    """D's mean score of images (N, C, R, R) in [-1, 1], un-augmented; D in eval mode (spectral
    normalisation's power iteration does not step)."""
    was_training = D.training
    D.eval()
    try:
        scores = [D(images[i:i + batch].to(device), labels[i:i + batch].to(device) if D.num_classes else None).float()
                  for i in range(0, len(images), batch)]
    finally:
        D.train(was_training)
    return torch.cat(scores).mean().item()


def heldout_slices(train_cfg, train):
    """Real slices no training step used (DATA_ROOT/test, when present and not a training split)
    with the training classes, or None."""
    if "test" in train_cfg.data_splits.split(",") or not (Path(train_cfg.data_root) / "test").is_dir():
        return None
    test = load_slices(train_cfg, splits=["test"])
    return test if test.class_names == train.class_names and len(test) else None


class Evaluator:
    """Real-image statistics computed once; evaluator(G) compares G's images with them, and
    evaluator(G, D=D) adds D's scores on training reals, fakes and held-out reals."""

    def __init__(self, images, labels, n, seed, inception=None, batch=64, heldout=None):
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        self.n, self.labels, self.seed, self.batch, self.inception = len(pick), labels[pick], seed, batch, inception
        self.real_uint8, self.heldout = images[pick], None  # kept as uint8: a quarter of the memory
        real = to_model_range(self.real_uint8)  # uint8 -> [-1, 1]
        if heldout is not None:
            keep = torch.randperm(len(heldout.images), generator=torch.Generator().manual_seed(seed))[:n]
            self.heldout = (heldout.images[keep], heldout.labels[keep])
        self.resolution = real.shape[-1]
        self.real_desc = swd_descriptors(real, seed)
        self.ms_ssim_real = mean_pair_ms_ssim(real, seed)
        self.real_features = self.features(real)
        self.real_stats = feature_stats(self.real_features) if inception is not None else None
        heldout_images = to_model_range(self.heldout[0]) if self.heldout is not None else None
        self.memo_reference = memorisation_reference(real, heldout_images)
        self.heldout_figures = self.reference_figures(heldout_images) if heldout_images is not None else {}

    def reference_figures(self, images):
        """How real slices of unseen subjects score against the training slices: what a generator
        of new subjects (not copies) can reach, at the held-out set's size (keys ending _heldout)."""
        levels = swd(self.real_desc, swd_descriptors(images, self.seed), self.resolution, self.seed)
        figures = {f"{key}_heldout": value for key, value in levels.items()}  # swd_heldout, swd_R_heldout
        figures["ms_ssim_heldout"] = mean_pair_ms_ssim(images, self.seed)
        figures["precision_heldout"], figures["recall_heldout"] = precision_recall(self.real_features,
                                                                                   self.features(images))
        return figures

    @property
    def feature_space(self):
        """The space of precision, recall and knn_ratio: Inception-v3's pool features, or 16x16 thumbnails."""
        return "inception" if self.inception is not None else "pixels16"

    def features(self, images):
        if self.inception is not None:
            return inception_features(self.inception, images, self.batch)
        return pixel_features(images)

    def __call__(self, G, device, truncation=1.0, D=None):
        """{metric: value} for the EMA generator G (class labels drawn like the real ones)."""
        fake = sample_images(G, self.labels, self.n, self.seed + 1, device, truncation, self.batch)
        out = self.compare(fake)
        if D is not None:
            out.update(self.discriminator_figures(D, fake, device))
        return dict(out, **self.heldout_figures)

    def discriminator_figures(self, D, fake, device):
        """D's mean score on the training reals, the fakes and (when there are) held-out reals, and
        d_overfit: the share of D's real-fake margin that held-out reals lose (StyleGAN2-ADA's sign
        of a memorising D): 0 when D scores unseen reals like training reals, 1 when like fakes.
        Also the memorisation audit in D's feature space (keys ending _d)."""
        real = to_model_range(self.real_uint8)
        out = dict(d_real=d_scores(D, real, self.labels, device, self.batch),
                   d_fake=d_scores(D, fake, self.labels, device, self.batch))
        heldout = None
        if self.heldout is not None:
            images, labels = self.heldout
            heldout = to_model_range(images)
            out["d_heldout"] = d_scores(D, heldout, labels, device, self.batch)
            margin = out["d_real"] - out["d_fake"]
            if margin != 0:
                out["d_overfit"] = (out["d_real"] - out["d_heldout"]) / margin
        features = lambda x: d_features(D, x, device, self.batch)  # noqa: E731
        figures, _ = memorisation(fake, real, heldout, features=features)
        out.update({f"{k}_d": v for k, v in figures.items()})
        return out

    def compare(self, fake):
        """{metric: value} for generated images (N, C, R, R) in [-1, 1]."""
        out = swd(self.real_desc, swd_descriptors(fake, self.seed), self.resolution, self.seed)
        out.update(ms_ssim_fake=mean_pair_ms_ssim(fake, self.seed), ms_ssim_real=self.ms_ssim_real)
        features = self.features(fake)
        if self.inception is not None:
            out["fid"] = frechet_distance(*self.real_stats, *feature_stats(features))
            out["kid"], out["kid_std"] = kernel_distance(self.real_features, features, self.seed)
        out["precision"], out["recall"], out["knn_ratio"] = manifold_figures(self.real_features, features)
        figures, (d, idx) = memorisation(fake, None, reference=self.memo_reference)
        order = d.argsort()[:MEMO_PAIRS]  # the closest pairs, kept for save_memorisation_figure
        self.closest = (fake[order], to_model_range(self.real_uint8[idx[order]]))
        out.update(figures)
        return out

    def save_memorisation_figure(self, path):
        """The generated slices closest to a training slice (top row) above those training slices."""
        fakes, reals = self.closest
        save_grid(torch.cat([fakes, reals]), path, ncol=len(fakes))


def best_metric(name, inception):
    """The metric that picks Models/best.pt: 'auto' is FID with Inception weights, else SWD."""
    if name == "auto":
        return "fid" if inception is not None else "swd"
    if name in ("fid", "kid") and inception is None:
        raise UserError(f"train.py's --eval-metric {name} needs Inception weights (--inception-weights PATH)")
    return name


def is_new_best(history, figures, metric, max_copy_rate):
    """Whether an evaluation's `figures` become Models/best.pt: the lowest `metric` so far among the
    evaluations (`history`, the earlier ones) whose copy_rate is at most `max_copy_rate` (those
    without a copy_rate, no held-out slices, all count)."""
    def eligible(m):
        return metric in m and m.get("copy_rate", 0.0) <= max_copy_rate
    previous = [m[metric] for m in history if eligible(m)]
    return eligible(figures) and (not previous or figures[metric] < min(previous))


# ---------------------------------------------------------------------------------------
# Classification accuracy score: does a classifier trained on generated slices work on real ones?
# ---------------------------------------------------------------------------------------
def make_classifier(channels, num_classes):
    """torchvision's ResNet-18, untrained, with a stem for `channels`-channel images."""
    from torchvision.models import resnet18
    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def train_classifier(images, labels, num_classes, epochs, seed, device, batch=64, lr=1e-3):
    """Train a classifier on images (N, C, R, R) in [-1, 1] with random left-right flips; seeded."""
    with seeded_rng(seed, device):
        net = make_classifier(images.shape[1], num_classes).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        order = torch.Generator().manual_seed(seed)
        for _ in tqdm(range(epochs), desc="classifier epochs", leave=False, file=sys.stdout):
            for idx in torch.randperm(len(images), generator=order).split(batch):
                x = images[idx].to(device)
                x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
                loss = F.cross_entropy(net(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.eval()


@torch.no_grad()
def predict(net, images, device, batch=256):
    """Class probabilities (N, K)."""
    device_batches = (net(images[i:i + batch].to(device)).softmax(1).cpu() for i in range(0, len(images), batch))
    return torch.cat(list(device_batches))


def roc_auc(scores, positive):
    """Area under the ROC curve: the chance that a random positive outscores a random negative (ties 1/2)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]  # ties share their mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy_auc(probs, labels):
    """Accuracy, and AUC (two classes; the mean one-vs-rest AUC for more)."""
    labels = labels.numpy()
    accuracy = float((probs.argmax(1).numpy() == labels).mean())
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    return accuracy, float(np.mean([roc_auc(probs[:, k].numpy(), labels == k) for k in classes]))


def classification_scores(train, test, fake, num_classes, epochs, seed, device):
    """{'real' | 'synthetic' | 'real+synthetic': {'accuracy', 'auc'}} on the real test set.
    train, test, fake: (images in [-1, 1], labels)."""
    sets = {"real": train, "synthetic": fake,
            "real+synthetic": (torch.cat([train[0], fake[0]]), torch.cat([train[1], fake[1]]))}
    out = {}
    for name, (images, labels) in sets.items():
        print(f"classifier on {name} slices ({len(images)} images, {epochs} epochs)")
        net = train_classifier(images, labels, num_classes, epochs, seed, device)
        accuracy, auc = accuracy_auc(predict(net, test[0], device), test[1])
        out[name] = dict(accuracy=accuracy, auc=auc)
    return out
