"""Unit tests of dataset.py: folder layouts, errors that name the offending path, image decoding,
the seeded epoch sampler and random flips."""
import io

import numpy as np
import pytest
import torch
from conftest import write_images
from PIL import Image

import augment
import dataset
from settings import UserError


def make_adni(root, counts=None, ext="jpeg"):
    """AD_NC/{split}/{class}/*.ext with `counts` {(split, class): n}."""
    counts = counts or {("train", "AD"): 3, ("train", "NC"): 2, ("test", "AD"): 2, ("test", "NC"): 1}
    for (split, cls), n in counts.items():
        write_images(root / split / cls, n, size=16, ext=ext, prefix=f"{split}_{cls}_")
    return root


# ---------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------
def test_find_images_adni_train_only(tmp_path):
    root = make_adni(tmp_path / "AD_NC")
    (root / "train" / "AD" / "notes.txt").write_text("not an image")
    (root / "train" / "NC" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "train" / "NC" / ".hidden.png").write_bytes(b"junk")
    files, labels, names = dataset.find_images(root, ("train",))
    assert names == ["AD", "NC"]
    assert len(files) == 5
    assert all(f.parent.parent.name == "train" for f in files)
    assert all(f.suffix == ".jpeg" for f in files)
    assert [names[lab] for lab in labels] == [f.parent.name for f in files]
    assert sorted(labels) == [0, 0, 0, 1, 1]


def test_find_images_adni_train_and_test(tmp_path):
    root = make_adni(tmp_path / "AD_NC")
    files, labels, names = dataset.find_images(root, ("train", "test"))
    assert names == ["AD", "NC"]
    assert len(files) == 8
    assert {f.parent.parent.name for f in files} == {"train", "test"}
    assert [names[lab] for lab in labels] == [f.parent.name for f in files]
    assert labels.count(0) == 5 and labels.count(1) == 3


def test_find_images_class_names_sorted(tmp_path):
    write_images(tmp_path / "NC", 1)
    write_images(tmp_path / "AD", 2)
    write_images(tmp_path / "MCI", 1)
    files, labels, names = dataset.find_images(tmp_path, ("train",))  # no split folders: classes at top
    assert names == ["AD", "MCI", "NC"]
    assert [names[lab] for lab in labels] == [f.parent.name for f in files]


def test_find_images_flat_folder(tmp_path):
    write_images(tmp_path, 3, ext="png")
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    files, labels, names = dataset.find_images(tmp_path, ("train",))
    assert names == []
    assert labels == [0, 0, 0]
    assert [f.name for f in files] == ["img000.png", "img001.png", "img002.png"]


def test_find_images_accepts_upper_case_extensions(tmp_path):
    write_images(tmp_path, 2, ext="PNG")
    files, _, _ = dataset.find_images(tmp_path)
    assert len(files) == 2


# ---------------------------------------------------------------------------------------
# Bad inputs: one UserError naming the path
# ---------------------------------------------------------------------------------------
def test_missing_root(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(UserError, match="does_not_exist") as e:
        dataset.find_images(missing)
    assert str(missing) in str(e.value)


def test_empty_class_folder(tmp_path):
    write_images(tmp_path / "AD", 2)
    (tmp_path / "NC").mkdir()
    with pytest.raises(UserError) as e:
        dataset.find_images(tmp_path)
    assert str(tmp_path / "NC") in str(e.value)


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    with pytest.raises(UserError) as e:
        dataset.find_images(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_split_folder(tmp_path):
    root = make_adni(tmp_path / "AD_NC", {("train", "AD"): 1, ("train", "NC"): 1})
    with pytest.raises(UserError) as e:
        dataset.find_images(root, ("train", "test"))
    assert str(root / "test") in str(e.value)


def test_images_mixed_with_class_folders(tmp_path):
    write_images(tmp_path, 1, prefix="loose")
    write_images(tmp_path / "AD", 1)
    with pytest.raises(UserError) as e:
        dataset.find_images(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_splits_with_different_classes(tmp_path):
    root = make_adni(tmp_path / "AD_NC", {("train", "AD"): 1, ("train", "NC"): 1, ("test", "AD"): 1})
    with pytest.raises(UserError) as e:
        dataset.find_images(root, ("train", "test"))
    assert str(root) in str(e.value)


def _corrupt_png(folder):
    path = folder / "x.png"
    path.write_bytes(b"\x89PNG this is not really an image" * 4)
    return path


def _truncated_jpeg(folder):
    path = folder / "half.jpeg"
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path.write_bytes(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("make_bad", [_corrupt_png, _truncated_jpeg], ids=["garbage-png", "truncated-jpeg"])
def test_corrupt_image_names_file(tmp_path, make_bad):
    write_images(tmp_path / "AD", 3)
    write_images(tmp_path / "NC", 2)
    bad = make_bad(tmp_path / "NC")
    with pytest.raises(UserError) as e:
        dataset.load_dataset(tmp_path, ("train",), 32, progress=False)
    assert str(bad) in str(e.value)
    assert "--skip-bad-images" in str(e.value)
    data = dataset.load_dataset(tmp_path, ("train",), 32, skip_bad=True, progress=False)
    assert data.skipped == 1
    assert len(data) == 5
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    assert "skipped 1" in data.summary()


def test_all_images_bad_with_skip(tmp_path):
    _corrupt_png(tmp_path)
    with pytest.raises(UserError) as e:
        dataset.load_dataset(tmp_path, ("train",), 32, skip_bad=True, progress=False)
    assert str(tmp_path) in str(e.value)


def test_load_dataset_contents(tmp_path):
    root = make_adni(tmp_path / "AD_NC", ext="png")
    data = dataset.load_dataset(root, ("train", "test"), 32, threads=2, progress=False)
    assert data.images.dtype == torch.uint8
    assert data.images.shape == (8, 1, 32, 32)
    assert data.channels == 1
    assert data.class_names == ["AD", "NC"]
    assert data.labels.dtype == torch.long
    assert data.labels.tolist().count(0) == 5
    files, _, _ = dataset.find_images(root, ("train", "test"))
    for i in (0, 7):  # in file order, each the decoded file
        assert np.array_equal(data.images[i].numpy(), dataset.load_image(files[i], 32))
    rgb = dataset.load_dataset(root, ("train",), 32, mode="RGB", progress=False)
    assert rgb.images.shape == (5, 3, 32, 32)


# ---------------------------------------------------------------------------------------
# Decoding one image
# ---------------------------------------------------------------------------------------
def test_load_image_pad_keeps_aspect(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (256, 240), 255).save(path)  # 256 wide, 240 high, all white
    arr = dataset.load_image(path, 256, "L", "pad")
    assert arr.shape == (1, 256, 256) and arr.dtype == np.uint8
    assert (arr[0, :8] == 0).all() and (arr[0, -8:] == 0).all()  # black bars top and bottom
    assert (arr[0, 8:248] == 255).all()
    stretched = dataset.load_image(path, 256, "L", "resize")
    assert (stretched == 255).all()


def test_load_image_pad_tall_image_pads_columns(tmp_path):
    path = tmp_path / "tall.png"
    Image.new("L", (200, 256), 255).save(path)
    arr = dataset.load_image(path, 256, "L", "pad")
    assert (arr[0, :, :28] == 0).all() and (arr[0, :, -28:] == 0).all()
    assert (arr[0, :, 28:228] == 255).all()


def test_load_image_resizes(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (100, 100), 77).save(path)
    arr = dataset.load_image(path, 32, "L", "pad")
    assert arr.shape == (1, 32, 32)
    assert (arr == 77).all()


def test_load_image_rgb_to_grayscale(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(path)
    arr = dataset.load_image(path, 32, "L", "pad")
    assert arr.shape == (1, 32, 32)
    assert abs(int(arr[0, 16, 16]) - 76) <= 1  # ITU-R 601-2 luma of pure red
    rgb = dataset.load_image(path, 32, "RGB", "pad")
    assert rgb.shape == (3, 32, 32)
    assert rgb[:, 16, 16].tolist() == [255, 0, 0]


def test_load_image_grayscale_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (16, 16), 100).save(path)
    arr = dataset.load_image(path, 32, "RGB", "pad")
    assert arr.shape == (3, 32, 32)
    assert (arr == 100).all()


def test_load_image_16bit_rescaled(tmp_path):
    path = tmp_path / "deep.png"
    ramp = np.linspace(1000, 3000, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")  # really a 16-bit file
    arr = dataset.load_image(path, 32, "L", "pad")
    assert arr.min() == 0 and arr.max() == 255
    assert arr[0, 0, 0] < arr[0, 16, 16] < arr[0, -1, -1]  # the ramp survives


# ---------------------------------------------------------------------------------------
# EpochSampler
# ---------------------------------------------------------------------------------------
def test_sampler_deterministic_per_seed_and_epoch():
    s = dataset.EpochSampler(50, 8, seed=3)
    assert s.steps_per_epoch == 6
    a = [b.tolist() for b in s.batches(0)]
    b = [b.tolist() for b in dataset.EpochSampler(50, 8, seed=3).batches(0)]
    assert a == b
    assert len(a) == 6 and all(len(x) == 8 for x in a)
    flat = sum(a, [])
    assert len(set(flat)) == 48 and all(0 <= i < 50 for i in flat)  # no repeats within an epoch
    c = [b.tolist() for b in s.batches(1)]
    assert c != a
    d = [b.tolist() for b in dataset.EpochSampler(50, 8, seed=4).batches(0)]
    assert d != a


def test_sampler_start_step_skips_exactly():
    s = dataset.EpochSampler(40, 5, seed=0)
    full = [b.tolist() for b in s.batches(2)]
    for start in (0, 1, 5, 7, 8):
        assert [b.tolist() for b in s.batches(2, start_step=start)] == full[start:]


def test_sampler_ranks_split_batch():
    full = [b.tolist() for b in dataset.EpochSampler(32, 8, seed=1).batches(0)]
    r0 = [b.tolist() for b in dataset.EpochSampler(32, 8, seed=1, rank=0, world_size=2).batches(0)]
    r1 = [b.tolist() for b in dataset.EpochSampler(32, 8, seed=1, rank=1, world_size=2).batches(0)]
    assert len(r0) == len(r1) == len(full)
    for f, a, b in zip(full, r0, r1):
        assert len(a) == len(b) == 4
        assert set(a).isdisjoint(b)
        assert sorted(a + b) == sorted(f)


# ---------------------------------------------------------------------------------------
# Augmentation and range
# ---------------------------------------------------------------------------------------
def test_random_flips_off_is_identity():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 5, 5)
    assert torch.equal(augment.random_flips(x, False, False), x)


@pytest.mark.parametrize("hflip,vflip,dim", [(True, False, 3), (False, True, 2)])
def test_random_flips_each_image_itself_or_mirror(hflip, vflip, dim):
    torch.manual_seed(0)
    x = torch.randn(64, 2, 5, 5)
    y = augment.random_flips(x, hflip, vflip)
    flipped = 0
    for a, b in zip(x, y):
        same, mirror = torch.equal(a, b), torch.equal(a.flip(dim - 1), b)
        assert same or mirror
        flipped += mirror
    assert 10 < flipped < 54  # about half, and not all or none


def test_random_flips_both():
    torch.manual_seed(1)
    x = torch.randn(64, 1, 4, 4)
    y = augment.random_flips(x, True, True)
    options = lambda a: [a, a.flip(2), a.flip(1), a.flip(1).flip(2)]  # noqa: E731
    seen = set()
    for a, b in zip(x, y):
        matches = [i for i, o in enumerate(options(a)) if torch.equal(o, b)]
        assert matches
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_to_model_range():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8)
    y = dataset.to_model_range(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y, torch.tensor([-1.0, 1.0, 128 * 2 / 255 - 1]), atol=1e-6)
    assert x.tolist() == [0, 255, 128]  # the cached uint8 data is not modified


# ---------------------------------------------------------------------------------------
# Real-image rotation and brightness/contrast jitter
# ---------------------------------------------------------------------------------------
def disk_and_square(n=6, size=32):
    """A centred bright disk (unchanged by rotation) and an off-centre square (moved by it), on black."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disk = torch.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2, 1.0, -1.0)
    square = -torch.ones(size, size)
    square[2:8, 12:20] = 1
    return disk.expand(n, 1, size, size).clone(), square.expand(n, 1, size, size).clone()


def test_rotation_and_jitter_off_is_identity():
    x = torch.rand(3, 1, 8, 8)
    assert augment.random_rotation_and_jitter(x, 0, 0) is x


def test_rotation_moves_off_centre_content_only():
    torch.manual_seed(0)
    disk, square = disk_and_square()
    rotated_disk = augment.random_rotation_and_jitter(disk, 30, 0)
    rotated_square = augment.random_rotation_and_jitter(square, 30, 0)
    assert (rotated_disk - disk).abs().mean() < 0.05  # a disk looks the same at any angle
    assert sum((a - b).abs().mean() > 0.02 for a, b in zip(rotated_square, square)) >= 4  # most squares moved
    assert rotated_square[:, :, -1, :].max() == -1  # black fills what comes in from outside
    assert rotated_square.sum(dim=[1, 2, 3]).add(32 * 32).div(2).sub(48).abs().max() < 12  # its area is kept


def test_jitter_scales_brightness_and_contrast_within_range():
    torch.manual_seed(0)
    x = torch.full((200, 1, 4, 4), 0.0)  # a flat mid-grey: 0.5 on [0, 1]; contrast leaves it flat
    y = (augment.random_rotation_and_jitter(x, 0, 0.2) + 1) / 2
    levels = y.flatten(1)
    assert torch.allclose(levels, levels[:, :1])  # still flat
    assert levels.min() >= 0.5 * 0.8 - 1e-6 and levels.max() <= 0.5 * 1.2 + 1e-6
    assert levels.min() < 0.5 * 0.85 and levels.max() > 0.5 * 1.15  # the whole range is used
    contrast = (augment.random_rotation_and_jitter(disk_and_square(200)[0], 0, 0.2) + 1) / 2
    spread = contrast.amax(dim=[1, 2, 3]) - contrast.amin(dim=[1, 2, 3])
    assert spread.min() < 0.9 and spread.max() <= 1  # contrast factors below 1 narrow the range


def test_a_flat_folder_with_a_link_to_itself_is_flat(tmp_path):
    write_images(tmp_path / "flat", 3)
    (tmp_path / "flat" / "self").symlink_to(".", target_is_directory=True)
    (tmp_path / "flat" / "up").symlink_to("..", target_is_directory=True)
    files, labels, names = dataset.find_images(tmp_path / "flat")
    assert len(files) == 3 and names == []


def test_skipped_files_leave_every_other_slice_with_its_own_label(tmp_path):
    """A bad file in the first class: the slices after it keep their classes (labels follow the kept
    files, not their positions), and each image is the one written."""
    write_images(tmp_path / "AD", 2, seed=1)
    _corrupt_png(tmp_path / "AD")  # sorts after img000, img001
    write_images(tmp_path / "NC", 3, seed=2)
    data = dataset.load_dataset(tmp_path, ("train",), 32, skip_bad=True, progress=False)
    assert data.skipped == 1 and data.labels.tolist() == [0, 0, 1, 1, 1]
    expected = [np.asarray(Image.open(tmp_path / c / f"img{i:03d}.png")) for c, n in (("AD", 2), ("NC", 3))
                for i in range(n)]
    assert all(np.array_equal(data.images[k, 0].numpy(), e) for k, e in enumerate(expected))


def bad_files(folder):
    """Three files no slice can come from: a 1x1 image, a float image of NaNs, a link to nothing."""
    Image.new("L", (1, 1), 200).save(folder / "tiny.png")
    Image.fromarray(np.full((32, 32), np.nan, np.float32), mode="F").save(folder / "nan.tif")
    (folder / "gone.png").symlink_to(folder / "deleted.png")
    return {"tiny.png": "1x1 pixels, smaller than the smallest slice read (16x16)",
            "nan.tif": "no pixel holds a finite value", "gone.png": "a link to a missing file"}


@pytest.mark.parametrize("name", ["tiny.png", "nan.tif", "gone.png"])
def test_files_no_slice_can_come_from_are_named_or_counted(tmp_path, name):
    write_images(tmp_path / "AD", 3)
    (tmp_path / "NC").mkdir()
    reasons = bad_files(tmp_path / "NC")
    for other in set(reasons) - {name}:
        (tmp_path / "NC" / other).unlink()
    write_images(tmp_path / "NC", 2, prefix="ok")
    with pytest.raises(UserError) as e:
        dataset.load_dataset(tmp_path, ("train",), 32, progress=False)
    assert str(tmp_path / "NC" / name) in str(e.value) and reasons[name] in str(e.value)
    data = dataset.load_dataset(tmp_path, ("train",), 32, skip_bad=True, progress=False)
    assert data.skipped == 1 and len(data) == 5


def test_the_data_line_names_files_of_another_size_or_mode(tmp_path):
    """Padding and resizing hide a stray file among the slices; the summary says how they were stored."""
    write_images(tmp_path / "AD", 3, size=(40, 32))
    write_images(tmp_path / "NC", 2, size=(40, 32))
    assert "stored as" not in dataset.load_dataset(tmp_path, ("train",), 32, progress=False).summary()
    write_images(tmp_path / "NC", 1, size=(64, 48), prefix="big")
    write_images(tmp_path / "NC", 1, size=(40, 32), mode="RGB", prefix="colour")
    data = dataset.load_dataset(tmp_path, ("train",), 32, progress=False)
    assert len(data) == 7 and data.summary().endswith("; stored as 40x32 L (5), 40x32 RGB (1), 64x48 L (1)")
