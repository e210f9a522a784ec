"""projector.py: the noise regulariser, the discriminator's feature distance and the learning-rate
schedule of a projection."""
import pytest
import torch

import projector


def test_noise_regularizer_penalises_correlated_noise():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(1, 1, 32, 32, generator=g)
    smooth = torch.nn.functional.interpolate(torch.randn(1, 1, 8, 8, generator=g), size=32, mode="bilinear")
    smooth = (smooth - smooth.mean()) / smooth.std()
    assert projector.noise_regularizer([white]).item() < 0.01 < projector.noise_regularizer([smooth]).item()


def test_discriminator_features_are_unit_per_pixel_and_distance_is_zero_only_for_equal_images():
    from modules import Discriminator
    torch.manual_seed(0)
    D = Discriminator(32, 1, channel_base=256, channel_max=16).eval()
    a, b = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    fa = projector.discriminator_features(D, a)
    assert [f.shape[-1] for f in fa] == [32, 16, 8, 4]
    assert all(torch.allclose(f.norm(dim=1), torch.ones(2, f.shape[-1], f.shape[-1]), atol=0.05) for f in fa)
    assert torch.equal(projector.feature_distance(fa, fa), torch.zeros(2))
    far = projector.feature_distance(fa, projector.discriminator_features(D, b))
    near = projector.feature_distance(fa, projector.discriminator_features(D, a + 0.05 * b))
    assert (far > near).all() and (near > 0).all()


def test_projection_lr_schedule():
    assert projector.projection_lr(0.0, 0.1) == 0
    assert projector.projection_lr(0.5, 0.1) == pytest.approx(0.1)
    assert 0 < projector.projection_lr(0.9, 0.1) < 0.1 and projector.projection_lr(0.999, 0.1) < 0.001
