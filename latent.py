"""Operations in the latent space shared by generate_images.py and explore.py: style mixing,
interpolation, the layers each resolution styles, the principal directions of W (GANSpace), and
how well a linear classifier tells the classes apart in W (and the direction it finds)."""
import numpy as np
import torch
import torch.nn.functional as F

from sampling import mapped, seed_latents


def mix_styles(w_rows, w_cols, layers, num_ws):
    """w (R, w_dim) and (C, w_dim) -> styles (R, C, num_ws, w_dim): the column's w except at `layers`,
    which take the row's w."""
    ws = w_cols[None, :, None].repeat(len(w_rows), 1, num_ws, 1)
    ws[:, :, layers] = w_rows[:, None, None]
    return ws


def lerp(a, b, t):
    """Linear interpolation of (N, D) end points at fractions t (F,) -> (N, F, D)."""
    return a[:, None] + t[None, :, None] * (b - a)[:, None]


def slerp(a, b, t):
    """Spherical interpolation between the directions of a and b (N, D) at fractions t (F,) -> (N, F, D),
    unit vectors; the mapping network's pixel norm makes z's length irrelevant."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    omega = torch.acos((a * b).sum(-1).clamp(-1, 1))[:, None, None]  # (N, 1, 1)
    t = t[None, :, None]
    if float(omega.min()) < 1e-4:  # (nearly) the same direction
        return F.normalize(lerp(a, b, t[0, :, 0]), dim=-1)
    return (torch.sin((1 - t) * omega) * a[:, None] + torch.sin(t * omega) * b[:, None]) / torch.sin(omega)


def separability(w, classes, seed=0):
    """Five-fold cross-validated accuracy of a logistic regression telling the classes apart from w,
    and the accuracy of always guessing the largest class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    counts = np.bincount(classes)
    folds = StratifiedKFold(n_splits=int(min(5, counts[counts > 0].min())), shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    accuracy = cross_val_score(model, w, classes, cv=folds).mean()
    return float(accuracy), float(counts.max() / counts.sum())


def class_direction(w, classes):
    """The unit direction in W along which a logistic regression tells class 1 from class 0 (standardised
    features, mapped back to W), and the spread of w along it: moving by that spread crosses the classes."""
    from sklearn.linear_model import LogisticRegression
    mean, std = w.mean(0), w.std(0) + 1e-8
    model = LogisticRegression(max_iter=2000).fit((w - mean) / std, classes)
    direction = model.coef_[0] / std
    direction = direction / np.linalg.norm(direction)
    return direction.astype(np.float32), float((w @ direction).std())


def principal_directions(G, count, n, device, seed=0):
    """GANSpace (Harkonen et al. 2020): the mean w of `n` seeded latents (all classes mixed for a
    conditional model), and the top `count` principal directions of w with the spread along each."""
    z = seed_latents(range(seed, seed + n), G.z_dim)
    labels = (torch.full([n, G.num_classes], 1 / G.num_classes) if G.num_classes else None)
    w = mapped(G, z, labels, 1.0, device).double()
    mean = w.mean(0)
    _, s, v = torch.linalg.svd(w - mean, full_matrices=False)
    return mean.float(), v[:count].float(), (s[:count] / (n - 1) ** 0.5).float()


def layer_groups(num_ws):
    """{coarse, middle, fine: (first, last) style layer}: layer l styles resolution 4 * 2^(l // 2), and
    StyleGAN's groups are up to 8x8, 16x16 to 32x32, and 64x64 on (empty for a small model)."""
    groups = dict(coarse=(0, min(3, num_ws - 1)), middle=(4, min(7, num_ws - 1)), fine=(8, num_ws - 1))
    return {k: v for k, v in groups.items() if v[0] <= v[1]}
