"""latent.py: interpolation, style mixing, the layer groups, GANSpace directions and the class
direction in W."""
import numpy as np
import pytest
import torch

import latent


def test_slerp_ends_norm_and_half_angle():
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    path = latent.slerp(a, b, torch.linspace(0, 1, 5))  # (3, 5, 16)
    assert torch.allclose(path[:, 0], torch.nn.functional.normalize(a, dim=-1), atol=1e-6)
    assert torch.allclose(path[:, -1], torch.nn.functional.normalize(b, dim=-1), atol=1e-6)
    assert torch.allclose(path.norm(dim=-1), torch.ones(3, 5), atol=1e-5)
    angle = lambda u, v: torch.acos((u * v).sum(-1).clamp(-1, 1))  # noqa: E731
    assert torch.allclose(angle(path[:, 0], path[:, 2]), angle(path[:, 2], path[:, 4]), atol=1e-5)
    same = latent.slerp(a, 2 * a, torch.linspace(0, 1, 3))  # parallel vectors: no division by sin(0)
    assert torch.isfinite(same).all()


def test_mix_styles_takes_row_w_only_at_the_chosen_layers():
    w_rows, w_cols = torch.randn(2, 4), torch.randn(3, 4)
    ws = latent.mix_styles(w_rows, w_cols, [0, 1], num_ws=6)  # (2, 3, 6, 4)
    assert ws.shape == (2, 3, 6, 4)
    for i in range(2):
        for j in range(3):
            assert torch.equal(ws[i, j, :2], w_rows[i].expand(2, -1))
            assert torch.equal(ws[i, j, 2:], w_cols[j].expand(4, -1))


def test_separability_of_separable_and_random_classes():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(80, 8))
    classes = np.repeat([0, 1], 40)
    shifted = w + classes[:, None] * 3.0
    acc, chance = latent.separability(shifted, classes)
    assert acc > 0.95 and chance == 0.5
    acc_random, _ = latent.separability(w, rng.permutation(classes))
    assert acc_random < 0.8


def test_layer_groups_follow_the_resolution_each_layer_styles():
    assert latent.layer_groups(14) == dict(coarse=(0, 3), middle=(4, 7), fine=(8, 13))  # 256x256: 14 styles
    assert latent.layer_groups(8) == dict(coarse=(0, 3), middle=(4, 7))  # 32x32: nothing fine


def test_principal_directions_and_the_class_direction_recover_a_known_structure():
    """w spread mostly along one axis: the first principal direction is that axis, with its spread;
    two classes shifted along another axis: the class direction is that axis."""
    class Mapping:
        num_classes, z_dim = 0, 4

        def mapping(self, z, labels=None, truncation=1.0):
            return z * torch.tensor([5.0, 1.0, 0.5, 0.1])

    mean, dirs, spread = latent.principal_directions(Mapping(), 2, 4000, torch.device("cpu"))
    assert abs(float(dirs[0] @ torch.tensor([1.0, 0, 0, 0]))) > 0.99 and spread[0] == pytest.approx(5.0, rel=0.05)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(400, 3)).astype(np.float32)
    classes = np.repeat([0, 1], 200)
    w[classes == 1, 2] += 3.0
    direction, _ = latent.class_direction(w, classes)
    assert direction[2] > 0.95 and np.linalg.norm(direction) == pytest.approx(1.0, rel=1e-5)
