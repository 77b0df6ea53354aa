"""NIfTI reading and writing: every way a file can be bad is one InputError naming file and field."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from twin.data.nifti import read_nifti, write_nifti
from twin.errors import InputError

AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.25, 0, 20.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1]])


def volume(shape=(8, 7, 6), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def raises(path, field):
    with pytest.raises(InputError) as err:
        read_nifti(path)
    assert err.value.field == field and err.value.source == str(path)
    assert path.name in str(err.value) and "\n" not in str(err.value)  # the CLI prints it as its one line
    return err.value


@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz"])
def test_write_read_round_trip(tmp_path, name):
    data = volume()
    path = write_nifti(tmp_path / name, data, AFFINE)
    back, affine = read_nifti(path)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_array_equal(affine, AFFINE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no partial left behind


def test_write_refuses_bad_shapes(tmp_path):
    with pytest.raises(InputError, match="3D"):
        write_nifti(tmp_path / "x.nii.gz", np.zeros((3, 4)), AFFINE)
    with pytest.raises(InputError, match="4x4"):
        write_nifti(tmp_path / "x.nii.gz", np.zeros((3, 4, 5)), np.eye(3))
    assert not list(tmp_path.iterdir())


def test_truncated_gz(tmp_path):
    path = write_nifti(tmp_path / "scan.nii.gz", volume((16, 16, 16)), AFFINE)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated" in str(raises(path, "gzip"))


def test_truncated_nii(tmp_path):
    path = write_nifti(tmp_path / "scan.nii", volume(), AFFINE)
    path.write_bytes(path.read_bytes()[:-200])
    raises(path, "data")  # nibabel's message spans lines; the error must not
    path.write_bytes(path.read_bytes()[:100])  # not even a whole header
    raises(path, "header")


def test_gz_that_is_not_gzip(tmp_path):
    plain = write_nifti(tmp_path / "scan.nii", volume(), AFFINE)
    path = plain.rename(tmp_path / "scan.nii.gz")
    assert "not gzip" in str(raises(path, "gzip"))


def test_garbage_is_a_header_error(tmp_path):
    path = tmp_path / "scan.nii"
    path.write_bytes(b"this is not a nifti file" * 40)
    raises(path, "header")


def test_nan_and_inf_voxels(tmp_path):
    data = volume()
    data[1, 2, 3] = np.nan
    data[4, 5, 0] = np.inf
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    err = raises(path, "voxels")
    assert "2 NaN or Inf" in str(err) and "(1, 2, 3)" in str(err)


@pytest.mark.parametrize("shape", [(8, 7), (4, 3, 2, 2, 2)])
def test_not_3d_or_4d(tmp_path, shape):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), AFFINE), path)
    assert str(shape) in str(raises(path, "dim"))


def test_missing_file_and_extension(tmp_path):
    raises(tmp_path / "absent.nii.gz", "file")
    other = tmp_path / "scan.img"
    other.write_bytes(b"x")
    raises(other, "extension")


def test_lps_file_is_reoriented_to_ras(tmp_path):
    data = volume()
    lps = np.diag([-2.0, -3.0, 4.0, 1.0])
    lps[:3, 3] = [30.0, 40.0, -5.0]
    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data, lps), path)
    back, affine = read_nifti(path)
    np.testing.assert_array_equal(back, data[::-1, ::-1, :])
    assert np.all(np.diag(affine)[:3] > 0) and nib.aff2axcodes(affine) == ("R", "A", "S")
    # The same voxel value sits at the same point in the world before and after.
    i = np.array([1, 2, 3, 1])
    j = np.array([data.shape[0] - 1 - 1, data.shape[1] - 1 - 2, 3, 1])
    assert back[tuple(j[:3])] == data[tuple(i[:3])]
    np.testing.assert_allclose(affine @ j, lps @ i)


@pytest.mark.parametrize("cut", [1, 4, 8])
def test_gz_missing_its_trailer_is_caught(tmp_path, cut):
    # the voxels are intact; only the CRC/length trailer is gone: still a damaged file
    path = write_nifti(tmp_path / "scan.nii.gz", volume(), AFFINE)
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(InputError, match=r"scan\.nii\.gz: gzip: "):
        read_nifti(path)
