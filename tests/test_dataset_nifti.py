"""NIfTI input (dataset.py): .nii / .nii.gz volumes, in class folders or flat, mixed with 2D images,
each read as its brain-holding axial slices (anterior up), intensity-normalised, and fitted to the
training resolution like a 2D image; corrupt volumes fail (or are skipped) like corrupt images."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images

import dataset
from settings import UserError

nib = pytest.importorskip("nibabel")

SHAPE = (40, 48, 30)  # x (left -> right), y (posterior -> anterior), z (inferior -> superior)


def ellipsoid(shape=SHAPE, seed=0):
    """A skull-stripped 'brain': an ellipsoid of tissue (~100) with a dark centre (~25, like the
    ventricles), a bright marker at the front (high y) and zero outside, in RAS voxel order."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    r = np.sqrt((x / 15) ** 2 + (y / 20) ** 2 + (z / 12) ** 2)
    vol = np.where(r <= 1, 100 + rng.normal(0, 3, shape), 0)
    vol[r <= 0.35] = 25
    vol[(r <= 1) & (y > 14) & (np.abs(x) < 4)] = 160  # front marker
    return vol.astype(np.float32), r <= 1


def save(vol, path, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, np.eye(4) if affine is None else affine), str(path))
    return path


def expected_slices(brain, slice_range=(0.0, 1.0)):
    """The slice rule, written out: within [floor(lo * nz), ceil(hi * nz)), slices whose brain area
    is at least 30% of the largest there."""
    nz = brain.shape[2]
    lo, hi = int(np.floor(slice_range[0] * nz)), int(np.ceil(slice_range[1] * nz))
    area = brain[:, :, lo:hi].sum(axis=(0, 1))
    if area.max() == 0:
        return []
    return [lo + i for i in range(len(area)) if area[i] >= 0.3 * area.max()]


# ---------------------------------------------------------------------------------------
# Finding volumes
# ---------------------------------------------------------------------------------------
def test_find_images_sees_nii_and_nii_gz(tmp_path):
    vol, _ = ellipsoid()
    save(vol, tmp_path / "AD" / "a.nii.gz")
    save(vol, tmp_path / "NC" / "b.nii")
    save(vol, tmp_path / "NC" / "C.NII.GZ")
    (tmp_path / "NC" / "notes.gz").write_bytes(b"x")  # .gz alone is not a volume
    (tmp_path / "NC" / ".hidden.nii").write_bytes(b"x")
    files, labels, names = dataset.find_images(tmp_path)
    assert names == ["AD", "NC"]
    assert [f.name for f in files] == ["a.nii.gz", "C.NII.GZ", "b.nii"]
    assert labels == [0, 1, 1]


# ---------------------------------------------------------------------------------------
# Slices, values, labels
# ---------------------------------------------------------------------------------------
def test_volumes_in_class_folders_with_images(tmp_path):
    vol, brain = ellipsoid()
    save(vol, tmp_path / "AD" / "s1.nii.gz")
    save(ellipsoid(seed=1)[0], tmp_path / "NC" / "s2.nii")
    write_images(tmp_path / "NC", 2, size=32)  # 2D slices mixed in
    data = dataset.load_dataset(tmp_path, ("train",), 32, progress=False)
    n = len(expected_slices(brain))
    assert 15 <= n < SHAPE[2]  # the rule drops the thin top and bottom caps
    assert len(data) == 2 * n + 2
    assert data.images.shape[1:] == (1, 32, 32)
    assert data.class_names == ["AD", "NC"]
    assert data.labels.tolist() == [0] * n + [1] * (n + 2)
    assert data.volumes == 2
    assert "2 NIfTI volumes" in data.summary()
    slices = data.images[:n].numpy()
    assert slices.min() == 0 and slices.max() == 255  # percentile-normalised to the full range
    assert (slices[:, 0, :2, :2] == 0).all() and (slices[:, 0, -2:, -2:] == 0).all()  # black corners
    middle = slices[n // 2, 0]
    assert middle[16, 16] < 60 < 100 < middle[16, 8]  # the dark centre (at the 1st percentile) in tissue


def test_flat_folder_of_volumes(tmp_path):
    vol, brain = ellipsoid()
    save(vol, tmp_path / "one.nii")
    save(vol, tmp_path / "two.nii.gz")
    data = dataset.load_dataset(tmp_path, ("train",), 16, progress=False)
    n = len(expected_slices(brain))
    assert data.class_names == [] and len(data) == 2 * n
    assert data.labels.tolist() == [0] * (2 * n)
    assert np.array_equal(data.images[:n].numpy(), data.images[n:].numpy())  # .nii and .nii.gz alike


@pytest.mark.parametrize("slice_range", [(0.5, 1.0), (0.0, 0.5), (0.3, 0.7), (0.45, 0.55)])
def test_slice_range(tmp_path, slice_range):
    vol, brain = ellipsoid()
    save(vol, tmp_path / "v.nii.gz")
    data = dataset.load_dataset(tmp_path, ("train",), 16, progress=False, slice_range=slice_range)
    expected = expected_slices(brain, slice_range)
    assert 0 < len(data) == len(expected) <= len(expected_slices(brain))
    whole = dataset.load_volume(tmp_path / "v.nii.gz", 16)
    first = expected_slices(brain).index(expected[0])
    assert np.array_equal(data.images.numpy(), whole[first:first + len(expected)])


def test_slice_range_without_brain(tmp_path):
    vol, brain = ellipsoid()  # brain in slices 3..26 of 30
    save(vol, tmp_path / "v.nii.gz")
    assert len(dataset.load_volume(tmp_path / "v.nii.gz", 16, slice_range=(0.9, 1.0))) == 0
    with pytest.raises(UserError, match=r"no brain within the slice range 0.9,1 \(train.py's --slice-range\)"):
        dataset.load_dataset(tmp_path, ("train",), 16, progress=False, slice_range=(0.9, 1.0))
    write_images(tmp_path, 1)  # other files still load: the volume just adds no slices
    assert len(dataset.load_dataset(tmp_path, ("train",), 16, progress=False, slice_range=(0.9, 1.0))) == 1


def test_slices_bottom_to_top_and_anterior_up(tmp_path):
    vol, brain = ellipsoid()
    vol[(vol > 0) & (np.arange(SHAPE[2]) >= 15)] *= 0.5  # the upper half darker
    arr = dataset.load_volume(save(vol, tmp_path / "v.nii"), 48)[:, 0]  # 40 x 48 padded to 48 x 48
    means = [a[a > 0].mean() for a in arr]
    assert means[0] > 1.5 * means[-1]  # first slice from the bottom, last from the top
    marker = np.nonzero(arr[len(arr) // 4] > 200)[0]  # the front marker (a lower slice: not darkened)
    assert marker.size and marker.max() < 12  # anterior is at the top of the image
    # the same anatomy stored left-posterior-superior is reoriented to the same slices
    lps = np.ascontiguousarray(vol[::-1, ::-1, :])
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [SHAPE[0] - 1, SHAPE[1] - 1, 0]
    arr_lps = dataset.load_volume(save(lps, tmp_path / "lps.nii.gz", affine), 48)[:, 0]
    assert np.array_equal(arr, arr_lps)


def test_anisotropic_voxels_keep_shape(tmp_path):
    vol, _ = ellipsoid((40, 40, 30))
    affine = np.diag([2.0, 1.0, 1.0, 1.0])  # x voxels twice as wide: the slice is 80 mm x 40 mm
    arr = dataset.load_volume(save(vol, tmp_path / "v.nii.gz", affine), 64)[:, 0]
    mid = arr[len(arr) // 2] > 0
    rows, cols = np.nonzero(mid)
    width, height = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
    assert width > 1.2 * height  # 15 * 2 mm wide vs 20 mm long


def test_4d_single_volume_and_bad_slice_range(tmp_path):
    vol, brain = ellipsoid()
    save(vol[..., None], tmp_path / "v.nii.gz")  # (x, y, z, 1): one time point
    assert len(dataset.load_dataset(tmp_path, ("train",), 16, progress=False)) == len(expected_slices(brain))
    for bad in [(0.6, 0.4), (0.0, 1.5), (-0.1, 0.5), (0.5,)]:
        with pytest.raises(UserError, match="--slice-range"):
            dataset.load_dataset(tmp_path, ("train",), 16, progress=False, slice_range=bad)


# ---------------------------------------------------------------------------------------
# Bad volumes
# ---------------------------------------------------------------------------------------
def _garbage(path):
    path.write_bytes(b"\x1f\x8b this is not a NIfTI volume" * 8)


def _truncated(path):
    vol, _ = ellipsoid()
    save(vol, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _empty(path):
    save(np.zeros(SHAPE, np.float32), path)
    return "all voxels are zero"


def _all_nan(path):
    save(np.full(SHAPE, np.nan, np.float32), path)
    return "no voxel holds a finite value"


@pytest.mark.parametrize("make_bad", [_garbage, _truncated, _empty, _all_nan],
                         ids=["garbage", "truncated", "all-zero", "all-nan"])
def test_corrupt_volume_names_file_and_can_be_skipped(tmp_path, make_bad):
    vol, brain = ellipsoid()
    save(vol, tmp_path / "AD" / "good.nii.gz")
    write_images(tmp_path / "NC", 2, size=32)
    bad = tmp_path / "NC" / "bad.nii.gz"
    reason = make_bad(bad)
    with pytest.raises(UserError) as e:
        dataset.load_dataset(tmp_path, ("train",), 32, progress=False)
    assert str(bad) in str(e.value) and (reason or "") in str(e.value)
    assert "--skip-bad-images" in str(e.value)
    data = dataset.load_dataset(tmp_path, ("train",), 32, skip_bad=True, progress=False)
    assert data.skipped == 1
    n = len(expected_slices(brain))
    assert data.labels.tolist() == [0] * n + [1, 1]


def test_missing_nibabel_is_one_clear_error(tmp_path, monkeypatch):
    save(ellipsoid()[0], tmp_path / "v.nii.gz")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel -> ImportError
    with pytest.raises(UserError, match="pip install nibabel"):
        dataset.load_dataset(tmp_path, ("train",), 16, progress=False)
    write_images(tmp_path / "png", 1)  # 2D images alone do not need nibabel
    assert len(dataset.load_dataset(tmp_path / "png", ("train",), 16, progress=False)) == 1


def test_volume_name_detection():
    assert dataset.is_volume_name("a/b/scan.nii.gz") and dataset.is_volume_name("SCAN.NII")
    assert not dataset.is_volume_name("scan.gz") and not dataset.is_volume_name("scan.nii.zip")


# ---------------------------------------------------------------------------------------
# A real brain: the MNI152 template that ships with nilearn
# ---------------------------------------------------------------------------------------
def mni_template_file(tmp_path):
    spec = importlib.util.find_spec("nilearn")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0], "datasets", "data",
                    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
        if path.is_file():
            return path
    datasets = pytest.importorskip("nilearn.datasets")
    path = tmp_path / "mni152_2mm.nii.gz"
    datasets.load_mni152_template(resolution=2).to_filename(str(path))
    return path


def test_mni_template_loads_as_brain_slices(tmp_path):
    folder = tmp_path / "NC"
    folder.mkdir()
    (folder / "mni.nii.gz").symlink_to(mni_template_file(tmp_path))
    data = dataset.load_dataset(tmp_path, ("train",), 64, progress=False, slice_range=(0.3, 0.8))
    n = len(data)
    assert 20 <= n <= 120
    assert data.images.shape[1:] == (1, 64, 64) and data.class_names == ["NC"]
    imgs = data.images[:, 0].numpy()
    assert (imgs[:, :4, :4] == 0).all() and (imgs[:, -4:, -4:] == 0).all()  # skull-free: black corners
    assert (imgs[:, 28:36, 28:36].mean(axis=(1, 2)) > 20).all()  # brain in the centre of every slice
    for img in imgs[n // 4:3 * n // 4:5]:  # anterior up: the brain is longer (rows) than wide (columns)
        rows, cols = np.nonzero(img)
        assert rows.max() - rows.min() > cols.max() - cols.min()
    assert imgs.max() == 255
