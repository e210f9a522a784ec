"""metrics.py: the figures against known answers (Frechet distance, KID, SWD, MS-SSIM, precision and
recall, k-NN, ROC AUC), Inception weights present and absent, the Evaluator, the memorisation audit
and the held-out reference figures."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_user_error, smoke

import dataset
import metrics
import settings


def blobs(n, res=32, seed=0):
    """Images in [-1, 1] with a bright random disc on a textured background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    cy, cx = torch.randint(8, res - 8, (2, n, 1, 1), generator=g)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < 36).float()
    noise = torch.rand(n, res, res, generator=g) * 0.4
    return (disc * 0.8 + noise)[:, None] * 2 - 1


def blur(x, sigma):
    k = torch.exp(-torch.arange(-4, 5).float() ** 2 / (2 * sigma**2))
    k = torch.outer(k, k) / k.sum() ** 2
    return F.conv2d(F.pad(x, (4, 4, 4, 4), mode="reflect"), k[None, None])


def random_rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_distance_closed_form_for_commuting_covariances():
    """Same eigenvectors: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    d = 6
    q = random_rotation(d, 0)
    a, b = np.linspace(0.5, 3, d), np.linspace(2, 0.1, d)
    mu1, mu2 = np.zeros(d), np.arange(d) / 3
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_covariances_match_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_fid_from_samples_of_shifted_gaussians():
    """N(0, I) vs N(m, I): FID = |m|^2; identical sample sets: 0."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20000, 8))
    shift = np.full(8, 0.5)  # |m|^2 = 2
    y = rng.normal(size=(20000, 8)) + shift
    stats_x, stats_y = metrics.feature_stats(x), metrics.feature_stats(y)
    assert metrics.frechet_distance(*stats_x, *stats_y) == pytest.approx(2.0, abs=0.05)
    assert abs(metrics.frechet_distance(*stats_x, *stats_x)) < 1e-8


def test_kid_matches_the_unbiased_mmd_formula_and_grows_with_a_shift():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4)) + 1.0
    k = lambda a, b: (a @ b.T / 4 + 1) ** 3
    n = 30
    kxx, kyy = k(x, x), k(y, y)
    brute = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
             - 2 * k(x, y).mean())
    mean, std = metrics.kernel_distance(x, y, seed=0, subsets=3, subset_size=30)
    assert mean == pytest.approx(brute, rel=1e-9) and std == pytest.approx(0, abs=1e-9)  # every subset = all
    same, _ = metrics.kernel_distance(rng.normal(size=(500, 4)), rng.normal(size=(500, 4)), seed=0, subsets=10)
    far, _ = metrics.kernel_distance(rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) + 1, seed=0, subsets=10)
    assert abs(same) < 0.02 < far


def test_swd_is_zero_for_identical_sets_and_grows_with_blur():
    real = blobs(64)
    desc = metrics.swd_descriptors(real, seed=0)
    same = metrics.swd(desc, metrics.swd_descriptors(real, seed=0), 32, seed=0)
    assert set(same) == {"swd", "swd_32", "swd_16"} and same["swd"] == 0
    other = metrics.swd(desc, metrics.swd_descriptors(blobs(64, seed=1), seed=0), 32, seed=0)["swd"]
    blurred = [metrics.swd(desc, metrics.swd_descriptors(blur(real, s), seed=0), 32, seed=0)["swd"]
               for s in (0.7, 1.5, 3.0)]
    assert other < blurred[0] < blurred[1] < blurred[2]


def test_laplacian_pyramid_levels_and_reconstruction():
    x = blobs(2, res=64)
    levels = metrics.laplacian_pyramid(x, metrics.swd_levels(64))
    assert [lvl.shape[-1] for lvl in levels] == [64, 32, 16]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + metrics.pyramid_up(rebuilt)
    assert torch.allclose(rebuilt, x, atol=1e-5)
    assert metrics.swd_levels(256) == 5 and metrics.swd_levels(32) == 2


@pytest.mark.parametrize("res", [32, 64, 256])
def test_ms_ssim_of_identical_images_is_one_and_falls_with_noise(res):
    x = blobs(4, res=res)
    assert torch.allclose(metrics.ms_ssim(x, x), torch.ones(4), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    noisy = [metrics.ms_ssim(x, x + s * torch.randn(x.shape, generator=g)).mean().item() for s in (0.1, 0.3, 1.0)]
    assert 1 > noisy[0] > noisy[1] > noisy[2]
    unrelated = metrics.ms_ssim(torch.rand(4, 1, res, res, generator=g) * 2 - 1,
                                 torch.rand(4, 1, res, res, generator=g) * 2 - 1)
    assert unrelated.max() < 0.2


def test_pair_ms_ssim_shows_mode_collapse():
    diverse = blobs(64)
    collapsed = diverse[:1].repeat(64, 1, 1, 1) + 0.05 * torch.randn(64, 1, 32, 32)
    assert metrics.mean_pair_ms_ssim(collapsed, 0) > 0.8 > metrics.mean_pair_ms_ssim(diverse, 0)


def test_precision_recall_known_cases():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 4, generator=g) * 20
    real = (centres[:, None] + torch.randn(4, 100, 4, generator=g)).reshape(-1, 4)
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    half = (centres[:2, None] + torch.randn(2, 100, 4, generator=g)).reshape(-1, 4)  # two of four modes
    precision, recall = metrics.precision_recall(real, half)
    assert precision > 0.9 and 0.4 < recall < 0.55
    far = real + 1000
    assert metrics.precision_recall(real, far) == (0.0, 0.0)


def test_knn_ratio_tells_crowded_from_spread_samples():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 8, generator=g)
    knn_ratio = lambda real, fake: metrics.manifold_figures(real, fake)[2]  # noqa: E731
    assert knn_ratio(real, real + 3) == pytest.approx(1.0)  # moved, not squeezed
    assert knn_ratio(real, real * 0.5) == pytest.approx(0.5)  # the same shape, crowded
    other = torch.randn(500, 8, generator=g) * 2
    assert 1.7 < knn_ratio(real, other) < 2.3


def test_roc_auc_against_pairwise_counting():
    rng = np.random.default_rng(0)
    scores, positive = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4  # many ties
    pos, neg = scores[positive], scores[~positive]
    expected = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert metrics.roc_auc(scores, positive) == pytest.approx(expected)
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


def test_no_inception_weights_skip_fid_and_a_path_that_is_not_there_is_an_error(capsys, tmp_path, data):
    """No path: FID/KID are skipped, and training says so with the download address. A mistyped path is a
    one-line error before the data are read, not a run that quietly lacks FID/KID."""
    assert metrics.load_inception("", torch.device("cpu")) is None
    with pytest.raises(settings.UserError, match=r"--inception-weights: .*missing\.pth not found \(download it"):
        metrics.load_inception(str(tmp_path / "missing.pth"), torch.device("cpu"))
    import train
    code = train.main(smoke(data, tmp_path / "run", "--inception-weights", str(tmp_path / "missing.pth")))
    assert_user_error(capsys, code, "--inception-weights", "missing.pth not found")
    assert not (tmp_path / "run" / "stats.jsonl").exists()
    assert train.main(smoke(data, tmp_path / "run", "--max-steps", "1")) == 0
    out = capsys.readouterr().out
    assert out.count("FID/KID skipped") == 1 and metrics.FID_WEIGHTS_URL in out


def test_wrong_inception_file_is_a_one_line_error(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(settings.UserError, match="--inception-weights: .*junk.pth is not a PyTorch checkpoint"):
        metrics.load_fid_inception(junk)
    partial = tmp_path / "partial.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, partial)
    with pytest.raises(settings.UserError, match=r"missing weights, e\.g\. Conv2d_1a_3x3"):
        metrics.load_fid_inception(partial)


def test_inception_features_of_grayscale_images(inception_file):
    model = metrics.load_fid_inception(inception_file)
    assert len(model.state_dict()) == 566 and model.fc.weight.shape == (1008, 2048)
    x = blobs(2)
    feats = metrics.inception_features(model, x)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    same = metrics.inception_features(model, x.repeat(1, 3, 1, 1))  # gray = repeated to 3 channels
    assert torch.allclose(feats, same)
    model.train()
    assert not model.training  # batch norm never switches to batch statistics


def test_evaluator_on_its_own_real_images():
    real = ((blobs(40) + 1) * 127.5).round().to(torch.uint8)
    ev = metrics.Evaluator(real, torch.zeros(40, dtype=torch.long), n=40, seed=0)
    pick = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    same = ev.compare(metrics.to_model_range(real[pick]))
    assert same["swd"] == 0 and same["precision"] == same["recall"] == 1.0
    assert same["ms_ssim_fake"] == pytest.approx(same["ms_ssim_real"])
    worse = ev.compare(blur(metrics.to_model_range(real[pick]), 2.0))
    assert worse["swd"] > 10 and "fid" not in worse


def test_discriminator_figures_measure_how_much_d_memorised():
    """d_overfit: 0 when held-out reals score like training reals, 1 when they score like fakes."""
    class MeanD(torch.nn.Module):  # a "discriminator" scoring each image by its mean brightness
        num_classes = 0

        def forward(self, img, labels=None):
            assert not self.training  # scored in eval mode
            return img.mean([1, 2, 3])

        def features(self, img):
            return F.adaptive_avg_pool2d(img, 4)

    real = ((blobs(40) + 1) * 127.5).round().to(torch.uint8)
    labels = torch.zeros(40, dtype=torch.long)
    bright = torch.full((40, 1, 32, 32), 204, dtype=torch.uint8)  # 0.6 in [-1, 1], exactly
    fake = metrics.to_model_range(bright)
    D = MeanD().train()
    for heldout_images, expected in ((real, 0.0), (bright, 1.0)):
        heldout = SimpleNamespace(images=heldout_images, labels=labels)
        ev = metrics.Evaluator(real, labels, n=40, seed=0, heldout=heldout)
        figures = ev.discriminator_figures(D, fake, torch.device("cpu"))
        assert figures["d_real"] == pytest.approx(metrics.to_model_range(real).mean().item(), abs=1e-5)
        assert figures["d_fake"] == pytest.approx(0.6) and figures["d_overfit"] == pytest.approx(expected, abs=1e-5)
    assert D.training  # left as it was
    without = metrics.Evaluator(real, labels, n=40, seed=0).discriminator_figures(D, fake, torch.device("cpu"))
    assert set(without) == {"d_real", "d_fake", "nn_dist_fake_d", "authenticity_d"}  # no held-out: no d_overfit


def test_sample_images_is_seeded_and_leaves_the_global_rng_alone():
    from modules import Generator
    G = Generator(z_dim=8, w_dim=8, mapping_layers=1, resolution=32, img_channels=1, channel_base=64,
                  channel_max=8).eval()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = metrics.sample_images(G, None, 3, seed=5, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, metrics.sample_images(G, None, 3, seed=5, device=torch.device("cpu")))
    assert not torch.equal(a, metrics.sample_images(G, None, 3, seed=6, device=torch.device("cpu")))
    assert torch.equal(a, metrics.quantize(a))  # on the 256 grey levels of the real PNGs


def test_a_new_best_is_the_lowest_metric_among_evaluations_that_copy_little():
    history = [dict(swd=5.0, copy_rate=0.0), dict(swd=2.0, copy_rate=0.3)]  # the lower SWD copies: not a best
    assert metrics.is_new_best(history, dict(swd=4.0, copy_rate=0.005), "swd", 0.01)
    assert not metrics.is_new_best(history, dict(swd=6.0, copy_rate=0.0), "swd", 0.01)
    assert not metrics.is_new_best(history, dict(swd=1.0, copy_rate=0.02), "swd", 0.01)
    assert not metrics.is_new_best(history, dict(swd=4.0, copy_rate=0.0), "swd", 1.0)  # 1: any evaluation counts
    assert metrics.is_new_best([dict(swd=5.0)], dict(swd=4.0), "swd", 0.0)  # no held-out slices: no copy_rate
    assert metrics.is_new_best([], dict(swd=9.0, copy_rate=0.01), "swd", 0.01)
    assert not metrics.is_new_best([], dict(fid=9.0), "swd", 0.01)


def test_classifier_learns_a_separable_task():
    """The CAS classifier reaches high test accuracy when the classes differ clearly."""
    def make(n, seed):
        x = blobs(n, seed=seed)
        y = torch.arange(n) % 2
        return torch.where(y[:, None, None, None] == 1, x.flip(2).clamp(max=0.0), x), y
    train_set, test_set = make(96, 0), make(32, 1)
    net = metrics.train_classifier(*train_set, num_classes=2, epochs=4, seed=0, device=torch.device("cpu"),
                                    batch=16)
    accuracy, auc = metrics.accuracy_auc(metrics.predict(net, test_set[0], torch.device("cpu")), test_set[1])
    assert accuracy > 0.9 and auc > 0.95


def test_memorisation_of_a_copying_generator_and_of_unseen_real_slices():
    """A generator that returns training slices copies (copy_rate 1, authenticity 0); unseen real
    slices of the same kind do not (copy_rate about 1%, by the threshold's definition)."""
    slices = blobs(300)
    train, heldout, unseen = slices[:100], slices[100:200], slices[200:]
    copies, _ = metrics.memorisation(train[torch.randperm(100, generator=torch.Generator().manual_seed(0))[:50]],
                                    train, heldout)
    assert copies["copy_rate"] == 1.0 and copies["authenticity"] == 0.0 and copies["nn_dist_fake"] < 1e-3
    fresh, (d, idx) = metrics.memorisation(unseen, train, heldout)
    assert fresh["copy_rate"] <= 0.05 and fresh["authenticity"] > 0.3
    assert fresh["nn_dist_fake"] == pytest.approx(fresh["nn_dist_heldout"], rel=0.25)
    assert torch.allclose(d, torch.cdist(metrics.memo_features(unseen), metrics.memo_features(train)).min(1).values)
    noise = torch.randn(50, *train.shape[1:], generator=torch.Generator().manual_seed(1))
    near, _ = metrics.memorisation(train[:50] + 0.01 * noise, train, heldout)
    assert near["copy_rate"] == 1.0  # copies with a little noise are still copies
    no_heldout, _ = metrics.memorisation(unseen, train)
    assert "copy_rate" not in no_heldout and no_heldout["nn_dist_fake"] == fresh["nn_dist_fake"]


def test_memorisation_in_the_discriminators_feature_space():
    """The same audit in D's learned space: copies are found there too, unseen slices are not; the
    features are each image's own (the same whatever the batch holds)."""
    import modules
    slices = blobs(300, seed=3)
    train, heldout, unseen = slices[:100], slices[100:200], slices[200:]
    torch.manual_seed(0)
    D = modules.Discriminator(32, 1, channel_base=512, channel_max=32)
    features = lambda x: metrics.d_features(D, x, torch.device("cpu"), batch=16)  # noqa: E731
    assert torch.allclose(features(train[:5]), metrics.d_features(D, train[:40], torch.device("cpu"))[:5], atol=1e-5)
    copies, _ = metrics.memorisation(train[:50], train, heldout, features=features)
    assert copies["copy_rate"] == 1.0 and copies["authenticity"] == 0.0
    fresh, _ = metrics.memorisation(unseen, train, heldout, features=features)
    assert fresh["copy_rate"] <= 0.05 and fresh["authenticity"] > 0.3


def test_held_out_slices_give_the_reference_figures():
    """What real slices of unseen subjects score, beside every evaluation: identical slices score
    perfectly, other slices of the same kind less so."""
    real = ((blobs(60) + 1) * 127.5).round().to(torch.uint8)
    labels = torch.zeros(60, dtype=torch.long)
    same = metrics.Evaluator(real, labels, n=60, seed=0, heldout=SimpleNamespace(images=real, labels=labels))
    figures = same.heldout_figures
    assert figures["precision_heldout"] == 1.0 and figures["recall_heldout"] == 1.0
    assert figures["swd_heldout"] < 1e-6 and figures["ms_ssim_heldout"] == pytest.approx(same.ms_ssim_real)
    other = ((blobs(60, seed=1) + 1) * 127.5).round().to(torch.uint8)
    ev = metrics.Evaluator(real, labels, n=60, seed=0, heldout=SimpleNamespace(images=other, labels=labels))
    assert ev.heldout_figures["swd_heldout"] > 1 and ev.heldout_figures["recall_heldout"] < 1
    assert not metrics.Evaluator(real, labels, n=60, seed=0).heldout_figures
    # every pyramid level, computed as for generated slices: the held-out slices scored as fakes agree
    as_fakes = ev.compare(dataset.to_model_range(ev.heldout[0]))  # the held-out slices it drew
    for level in ("swd", "swd_32", "swd_16"):
        assert ev.heldout_figures[f"{level}_heldout"] == pytest.approx(as_fakes[level], rel=1e-9)
    assert {k for k in ev.heldout_figures if k.startswith("swd")} == {"swd_heldout", "swd_32_heldout",
                                                                     "swd_16_heldout"}


def test_the_memorisation_audit_compares_slices_at_their_size_up_to_256():
    for size, kept in ((64, 64), (256, 256), (512, 256)):
        x = torch.rand(3, 1, size, size) * 2 - 1
        features = metrics.memo_features(x)
        assert features.shape == (3, kept * kept)
        if size == kept:  # rows are RMS-scaled: their distance is the images' RMS difference
            rms = (x[0] - x[1]).square().mean().sqrt()
            assert torch.dist(features[0], features[1]).item() == pytest.approx(rms.item(), rel=1e-5)


def test_nearest_other_row_against_brute_force_beyond_one_chunk():
    """Each training slice's nearest other training slice (authenticity's reference), for more rows
    than one chunk: the self-match is left out at the right index in every chunk."""
    x = torch.randn(700, 5, generator=torch.Generator().manual_seed(2))
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    dist, idx = metrics.nearest(x, x, exclude_self=True, chunk=256)
    assert torch.equal(idx, d.argmin(1)) and torch.allclose(dist, d.min(1).values)
    train, d_train, _ = metrics.memorisation_reference(torch.rand(600, 1, 8, 8) * 2 - 1)
    assert (d_train > 0).all()  # never a slice's distance to itself


def test_precision_counts_fakes_inside_the_reals_3_nn_balls():
    """Reals at 0..9 on a line: their 3rd-nearest-neighbour radius is 2 inside and 3 at the ends, so of
    the fakes 11.5 (2.5 from 9) is inside, 12.5 (3.5 from 9) outside, and 30..33 far outside: 1/6.
    (With k = 5 the end radius would be 5, and 12.5 inside too.)"""
    real = torch.arange(10.0)[:, None]
    fake = torch.tensor([11.5, 12.5, 30, 31, 32, 33])[:, None]
    precision, recall, _ = metrics.manifold_figures(real, fake)
    assert precision == pytest.approx(1 / 6) and recall == 1.0  # 11.5's ball (radius 19.5) holds every real
    assert metrics.precision_recall(real, fake)[0] == pytest.approx(1 / 6)


def test_sliced_wasserstein_of_a_shift_is_its_mean_projection_on_unit_directions():
    """b = a + v: along a unit direction u every projection moves by v.u, so the 1-D distance is |v.u|;
    the directions are those the seeded generator draws, each normalised to length 1."""
    a = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    v = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0, 1.0])
    got = metrics.sliced_wasserstein(a, a + v, torch.Generator().manual_seed(7), directions=16, repeats=3)
    g, expected = torch.Generator().manual_seed(7), []
    for _ in range(3):
        dirs = torch.randn(6, 16, generator=g)
        expected.append((v @ (dirs / dirs.norm(dim=0))).abs().mean())
    assert got == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


class OpensAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_inception_weights_that_would_run_code_are_refused_before_any_work(tmp_path, data, capsys, monkeypatch):
    """Refused in plain words (not PyTorch's advice to load it unsafely), and by train.py before the
    data are read."""
    marker, evil = tmp_path / "created", tmp_path / "weights.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": OpensAFile(marker)}, evil)
    with pytest.raises(settings.UserError, match="contains Python objects other than tensors, refused for safety") as e:
        metrics.load_fid_inception(evil)
    assert "weights_only" not in str(e.value) and "Re-running" not in str(e.value) and not marker.exists()
    import train
    loads = []
    monkeypatch.setattr(train, "load_slices", lambda *args, **kwargs: loads.append(args))
    code = train.main(smoke(data, tmp_path / "run", "--inception-weights", str(evil)))
    assert_user_error(capsys, code, "--inception-weights", "refused for safety")
    assert not marker.exists() and not loads
