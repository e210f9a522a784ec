"""The built-in demo data set (demo_data.build_demo_dataset / ensure_demo_dataset): ADNI's layout and
image format, byte-identical rebuilds, the cache, and a measurable AD vs NC difference."""
import json

import numpy as np
import pytest
from PIL import Image

import dataset
import demo_data
from settings import UserError

pytest.importorskip("nilearn")

SUBJECTS, SLICES = (4, 2), 4  # per class: 4 train and 2 test subjects, 4 slices each


def build(root, **kwargs):
    kwargs = {"subjects": SUBJECTS, "slices_per_subject": SLICES, "progress": False, **kwargs}
    return demo_data.build_demo_dataset(root, **kwargs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build(tmp_path_factory.mktemp("demo") / "AD_NC")


@pytest.fixture(scope="module")
def demo_no_atrophy(tmp_path_factory):
    return build(tmp_path_factory.mktemp("demo0") / "AD_NC", atrophy=0.0)


def pngs(root, split, cls):
    return sorted((root / split / cls).glob("*.png"))


def slices(root, cls, splits=("train", "test")):
    return [np.asarray(Image.open(f)) for split in splits for f in pngs(root, split, cls)]


def ventricle_area(img, dark=50):
    """Dark pixels (CSF) in the central 40% box of the brain's bounding box: the ventricles."""
    rows, cols = np.nonzero(img)
    r0, c0 = rows.min(), cols.min()
    h, w = rows.max() + 1 - r0, cols.max() + 1 - c0
    box = img[r0 + int(0.3 * h):r0 + int(0.7 * h), c0 + int(0.3 * w):c0 + int(0.7 * w)]
    return int((box < dark).sum())


def mean_areas(root):
    return {cls: float(np.mean([ventricle_area(s) for s in slices(root, cls)])) for cls in ("AD", "NC")}


# ---------------------------------------------------------------------------------------
# Layout and format
# ---------------------------------------------------------------------------------------
def test_layout_counts_and_png_format(demo):
    assert demo.name == "AD_NC"
    assert sorted(p.name for p in demo.iterdir()) == ["demo.json", "test", "train"]
    for split, n in zip(("train", "test"), SUBJECTS):
        assert sorted(p.name for p in (demo / split).iterdir()) == ["AD", "NC"]
        for cls in ("AD", "NC"):
            files = pngs(demo, split, cls)
            assert len(files) == n * SLICES
            assert len(list((demo / split / cls).iterdir())) == len(files)  # nothing else
            for f in files[:: SLICES - 1]:
                with Image.open(f) as img:
                    assert img.format == "PNG" and img.mode == "L"
                    assert img.size == (256, 240)  # ADNI's 256 wide x 240 high
    manifest = json.loads((demo / "demo.json").read_text())
    assert manifest["params"] == {"subjects": list(SUBJECTS), "slices_per_subject": SLICES, "atrophy": 1.0,
                                  "seed": 0}
    assert manifest["counts"] == {"train/AD": 16, "train/NC": 16, "test/AD": 8, "test/NC": 8}
    assert not list(demo.parent.glob(".AD_NC.*"))  # no temporary folders left


def test_loads_as_adni_data(demo):
    data = dataset.load_dataset(demo, ("train", "test"), 64, progress=False)
    assert data.class_names == ["AD", "NC"]
    assert data.images.shape == (48, 1, 64, 64)
    assert data.labels.tolist().count(0) == 24


def test_skull_free_black_background_brain_centred(demo):
    for img in slices(demo, "AD") + slices(demo, "NC"):
        for corner in (img[:12, :12], img[:12, -12:], img[-12:, :12], img[-12:, -12:]):
            assert (corner == 0).all()
        brain = img > 0
        rows, cols = np.nonzero(brain)
        assert abs((rows.min() + rows.max()) / 2 - 119.5) < 15 and abs((cols.min() + cols.max()) / 2 - 127.5) < 15
        width, height = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
        assert 130 < width < 215 and 150 < height <= 240 and height > width  # anterior up, fills the frame
        assert brain[100:140, 108:148].mean() > 0.9  # solid brain in the centre, no holes to the background
        inside = img[brain]
        assert np.percentile(inside, 90) > 150  # bright white matter
        assert np.percentile(inside, 5) < 90  # dark CSF / grey matter


# ---------------------------------------------------------------------------------------
# Determinism and the cache
# ---------------------------------------------------------------------------------------
@pytest.mark.determinism
def test_same_seed_gives_byte_identical_files(demo, tmp_path):
    again = build(tmp_path / "again")
    files = sorted(p.relative_to(demo) for p in demo.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (demo / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = build(tmp_path / "other", seed=1, subjects=(1, 1))
    assert (other / "train/AD/AD_train_000_00.png").read_bytes() != (demo / "train/AD/AD_train_000_00.png").read_bytes()


def test_ensure_uses_cache_and_rebuilds_on_change(tmp_path):
    root = tmp_path / "data" / "AD_NC"
    kwargs = {"subjects": (1, 1), "slices_per_subject": 2}
    assert demo_data.ensure_demo_dataset(root, progress=False, **kwargs) == root
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert len(stamp) == 1 + 2 + 4 + 8  # manifest, split folders, class folders, 8 PNGs
    assert demo_data.demo_dataset_ready(root, **kwargs)
    assert demo_data.ensure_demo_dataset(root, progress=False, **kwargs) == root  # cached: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamp
    # other parameters: rebuilt
    demo_data.ensure_demo_dataset(root, progress=False, **{**kwargs, "slices_per_subject": 3})
    assert len(list((root / "train" / "AD").glob("*.png"))) == 3
    assert json.loads((root / "demo.json").read_text())["params"]["slices_per_subject"] == 3
    demo_data.ensure_demo_dataset(root, progress=False, **{**kwargs, "slices_per_subject": 3, "atrophy": 0.5})
    assert json.loads((root / "demo.json").read_text())["params"]["atrophy"] == 0.5
    # an incomplete set (a file lost): rebuilt
    kwargs = {**kwargs, "slices_per_subject": 3, "atrophy": 0.5}
    next((root / "test" / "NC").glob("*.png")).unlink()
    assert not demo_data.demo_dataset_ready(root, **kwargs)
    demo_data.ensure_demo_dataset(root, progress=False, **kwargs)
    assert demo_data.demo_dataset_ready(root, **kwargs)
    assert not list(root.parent.glob(".AD_NC.*"))


def test_interrupted_build_leaves_no_half_set(tmp_path, monkeypatch):
    root = tmp_path / "AD_NC"
    real, calls = demo_data.render_demo_subject, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_data, "render_demo_subject", failing)
    with pytest.raises(KeyboardInterrupt):
        demo_data.ensure_demo_dataset(root, subjects=(2, 1), slices_per_subject=1, progress=False)
    assert not root.exists()
    assert not list(tmp_path.iterdir())  # the temporary folder is gone too
    # a stale temporary folder of a killed build is cleaned up by the next build
    (tmp_path / f".AD_NC.partial-{2**22 + 12345}" / "train").mkdir(parents=True)
    monkeypatch.setattr(demo_data, "render_demo_subject", real)
    demo_data.ensure_demo_dataset(root, subjects=(1, 1), slices_per_subject=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["AD_NC"]


def test_refuses_to_replace_other_data_and_bad_parameters(tmp_path):
    other = tmp_path / "AD_NC"
    (other / "train" / "AD").mkdir(parents=True)
    (other / "train" / "AD" / "real.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not a demo data set"):
        demo_data.ensure_demo_dataset(other, subjects=(1, 1), slices_per_subject=1, progress=False)
    assert (other / "train" / "AD" / "real.png").read_bytes() == b"x"
    for bad in [{"subjects": (0, 1)}, {"subjects": (1, -1)}, {"subjects": 5}, {"slices_per_subject": 0},
                {"atrophy": -1.0}]:
        with pytest.raises(UserError):
            demo_data.build_demo_dataset(tmp_path / "x", **{"subjects": (1, 1), "progress": False, **bad})


# ---------------------------------------------------------------------------------------
# The class difference: simulated atrophy
# ---------------------------------------------------------------------------------------
def test_ad_has_larger_ventricles(demo, demo_no_atrophy):
    with_atrophy = mean_areas(demo)
    without = mean_areas(demo_no_atrophy)
    print(f"ventricle area, mean px: atrophy=1 AD {with_atrophy['AD']:.0f} NC {with_atrophy['NC']:.0f}; "
          f"atrophy=0 AD {without['AD']:.0f} NC {without['NC']:.0f}")
    assert with_atrophy["AD"] > 1.3 * with_atrophy["NC"]
    assert 0.8 < without["AD"] / without["NC"] < 1.25
    # NC does not depend on `atrophy` at all; only AD changes
    assert [f.read_bytes() for f in pngs(demo, "train", "NC")] == \
        [f.read_bytes() for f in pngs(demo_no_atrophy, "train", "NC")]


def test_atrophy_zero_renders_ad_like_nc():
    """With atrophy 0 an AD subject goes through exactly the healthy rendering: the same draws give
    the same images, so AD and NC differ only by which random subjects they hold."""
    a = demo_data.render_demo_subject(np.random.default_rng([7, 0, 0, 0]), 2, ad_severity=0.0)
    b = demo_data.render_demo_subject(np.random.default_rng([7, 0, 0, 0]), 2, ad_severity=0.0)
    c = demo_data.render_demo_subject(np.random.default_rng([7, 0, 0, 0]), 2, ad_severity=1.0)
    assert a.shape == (2, 240, 256) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert (ventricle_area(c[0]) + ventricle_area(c[1])) > (ventricle_area(a[0]) + ventricle_area(a[1]))
