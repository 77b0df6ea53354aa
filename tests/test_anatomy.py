"""The anatomy templates against nilearn's MNI152 itself, and the warps against exact shifts and Jacobians."""

import numpy as np
import pytest

from twin.data import anatomy as A
from twin.data import geometry
from twin.errors import InputError


@pytest.fixture(scope="module")
def a2():
    return A.template(2)


@pytest.fixture(scope="module")
def a3():
    return A.template(3)


def world(affine, index):
    """World mm of array indices (N, ndim) under the reversed-index convention."""
    index = np.asarray(index, dtype=np.float64)
    ijk = np.zeros((len(index), 3))
    ijk[:, : index.shape[1]] = index[:, ::-1]
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def test_grid_geometry(a2, a3):
    assert a2.shape == (64, 64) and a2.ndim == 2 and a3.shape == (64, 64, 64) and a3.ndim == 3
    assert a2.spacing == (3.0, 3.0) and a3.spacing == (3.0, 3.0, 3.0)
    assert a2.voxel_volume == pytest.approx(0.027) and a3.voxel_volume == pytest.approx(0.027)
    for a in (a2, a3):
        assert a.affine.shape == (4, 4) and a.affine.dtype == np.float64 and abs(np.linalg.det(a.affine[:3, :3])) > 0
        for name in ("t1", "gm", "wm", "csf"):
            assert getattr(a, name).dtype == np.float32 and getattr(a, name).shape == a.shape
        for name in ("mask", "ventricles", "hippocampus"):
            assert getattr(a, name).dtype == bool and getattr(a, name).shape == a.shape
    assert geometry.orientation(a3.affine) == "RAS"
    # the 2D slice (NIfTI axes x, z, then the slab along y) steps +x and +z: RAS up to a permutation
    assert geometry.orientation(a2.affine) == "RSA"
    # coronal at y = -22 mm, inferior in row 0, -x in column 0
    corners = world(a2.affine, [(0, 0), (63, 0), (0, 63)])
    np.testing.assert_allclose(corners[:, 1], -22.0)
    assert corners[1, 2] > corners[0, 2] and corners[2, 0] > corners[0, 0]
    # the 2D slice lies on the 3D grid's x-z lattice: same in-plane sampling
    np.testing.assert_allclose(corners[0, [0, 2]], world(a3.affine, [(0, 0, 0)])[0, [0, 2]])
    # and its grid is centred on the brain (MNI152 brain bounding box: x -72..72, z -72..82)
    assert np.mean(world(a3.affine, [(0, 0, 0), (63, 63, 63)]), axis=0) == pytest.approx([0.0, -17.0, 5.0])


@pytest.mark.parametrize("dims", [2, 3])
def test_resampled_t1_is_the_mni_template_at_the_same_world_points(dims):
    """Our array index (k, j, i) -> affine @ (i, j, k) must land where nilearn's own resampler puts it."""
    import nibabel as nib
    from nilearn import datasets, image

    a = A.template(dims)
    target = (*a.shape[::-1], 1) if dims == 2 else a.shape[::-1]
    mni = datasets.load_mni152_template(resolution=2)
    theirs = image.resample_img(mni, target_affine=a.affine, target_shape=target, interpolation="linear",
                                force_resample=True, copy_header=True).get_fdata()
    theirs = theirs[..., 0] if dims == 2 else theirs
    ours = np.asarray(a.t1).T  # the NIfTI array
    assert isinstance(mni, nib.Nifti1Image)
    scale = theirs[a.mask.T].sum() / ours[a.mask.T].sum()  # our T1 is normalised to white matter = 1
    np.testing.assert_allclose(ours * scale, theirs, atol=2e-3)
    assert np.median(a.t1[a.wm > 0.9]) == pytest.approx(1.0, abs=0.03)


def test_tissue_probabilities_partition_the_brain(a2, a3):
    for a in (a2, a3):
        gm, wm, csf = (np.asarray(x, dtype=np.float64) for x in (a.gm, a.wm, a.csf))
        for p in (gm, wm, csf):
            assert p.min() >= 0 and p.max() <= 1 and np.all(p[~a.mask] == 0)
        total = gm + wm + csf
        np.testing.assert_allclose(total[a.mask], 1.0, atol=1e-6)
        assert a.mask.any() and not a.mask.all()
        # grey matter is darker than white matter on T1, CSF darker still
        assert np.median(a.t1[a.gm > 0.8]) < 0.9 < np.median(a.t1[a.wm > 0.9])
        assert np.median(a.t1[a.csf > 0.8]) < np.median(a.t1[a.gm > 0.8])


def test_structures_exist_where_and_as_large_as_they_should(a2, a3):
    for a in (a2, a3):
        assert a.ventricles.any() and a.hippocampus.any()
        assert not (a.ventricles & ~a.mask).any() and not (a.hippocampus & ~a.mask).any()
        assert not (a.ventricles & a.hippocampus).any()
        # CSF-dominant and grey-matter-dominant, up to partial volume at their resampled edges
        assert a.csf[a.ventricles].mean() > 0.6 and a.csf[a.ventricles].min() > 0.25
        assert a.gm[a.hippocampus].mean() > 0.7 and a.gm[a.hippocampus].min() > 0.35
    ml = a3.voxel_volume
    # MNI152 is ~1.1x an average adult brain per axis, so its intracranial mask is ~1.9 L
    assert 1700 < a3.mask.sum() * ml < 2000
    assert 1450 < (a3.gm.sum() + a3.wm.sum()) * ml < 1850
    assert 15 < a3.ventricles.sum() * ml < 50
    assert 5 < a3.hippocampus.sum() * ml < 10
    # one hippocampus per hemisphere, ~28 mm from the midline, mirror images of each other
    for a in (a2, a3):
        x = world(a.affine, np.argwhere(a.hippocampus))[:, 0]
        left, right = x[x < 0], x[x > 0]
        assert left.size and right.size and abs(left.size - right.size) <= 0.2 * x.size
        assert 18 < -left.mean() < 38 and 18 < right.mean() < 38
        z = world(a.affine, np.argwhere(a.ventricles))[:, 2]
        assert z.max() > 0  # the lateral ventricles' bodies, above the AC-PC plane


def test_template_is_cached_and_read_only(a2):
    assert A.template(2) is a2 and A.template(2, 64) is a2
    for name in ("t1", "gm", "wm", "csf", "mask", "ventricles", "hippocampus", "affine"):
        with pytest.raises(ValueError):
            getattr(a2, name)[0] = 0
    with pytest.raises(AttributeError):
        a2.t1 = None


def test_template_size_sets_resolution_over_a_fixed_field_of_view():
    a = A.template(2, 32)
    assert a.shape == (32, 32) and a.spacing == (6.0, 6.0) and a.voxel_volume == pytest.approx(0.216)
    np.testing.assert_allclose(world(a.affine, [(0, 0)])[0, 1], -22.0)


def test_template_rejects_bad_dims_and_sizes():
    with pytest.raises(InputError, match=r"^template: dims: expected dims 2 \(coronal slice\) or 3 \(volume\), got 4$"):
        A.template(4)
    with pytest.raises(ValueError, match="size"):
        A.template(2, 4)
    with pytest.raises(InputError, match="Anatomy: wm: expected shape"):
        a = A.template(2)
        A.Anatomy(t1=a.t1, gm=a.gm, wm=a.wm[:3], csf=a.csf, mask=a.mask, ventricles=a.ventricles,
                  hippocampus=a.hippocampus, affine=a.affine)


# ---------------------------------------------------------------- warp


def test_warp_identity_shift_and_interpolation():
    rng = np.random.default_rng(0)
    vol = rng.random((7, 9, 8)).astype(np.float32)
    zero = np.zeros((3, *vol.shape))
    out = A.warp(vol, zero)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, vol)
    # output(x) = vol(x - d): a constant d = (1, -2, 0) voxels is np.roll by +1, -2 in the interior
    d = np.zeros((3, *vol.shape))
    d[0], d[1] = 1.0, -2.0
    np.testing.assert_allclose(A.warp(vol, d)[1:, :-2], np.roll(vol, (1, -2), axis=(0, 1))[1:, :-2])
    # half a voxel: the mean of the two neighbours (linear); beyond the edge: the edge value
    img = rng.random((6, 5))
    d = np.zeros((2, 6, 5))
    d[1] = 0.5
    out = A.warp(img, d)
    np.testing.assert_allclose(out[:, 1:], (img[:, 1:] + img[:, :-1]) / 2)
    np.testing.assert_allclose(out[:, 0], img[:, 0])
    assert A.warp(np.arange(30).reshape(6, 5), d).dtype == np.float64


def test_warp_bool_in_bool_out():
    mask = np.zeros((10, 10), dtype=bool)
    mask[3:6, 2:5] = True
    d = np.zeros((2, 10, 10))
    d[0], d[1] = 2.0, 1.4  # nearest neighbour: rounds to (2, 1)
    out = A.warp(mask, d)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, np.roll(mask, (2, 1), axis=(0, 1)))
    with pytest.raises(InputError, match="warp: displacement: expected displacement of shape"):
        A.warp(mask, np.zeros((3, 10, 10)))


# ---------------------------------------------------------------- subjects


def jacobian(v):
    """det(I - grad v) of x -> x - v(x); v (ndim, *space) in voxels."""
    n = v.shape[0]
    J = np.empty((*v.shape[1:], n, n))
    for i in range(n):
        for j, g in enumerate(np.gradient(v[i])):
            J[..., i, j] = (i == j) - g
    return np.linalg.det(J)


def test_subject_anatomy_is_a_seeded_diffeomorphic_variant(a2):
    s1 = A.subject_anatomy(a2, np.random.default_rng(3))
    again = A.subject_anatomy(a2, np.random.default_rng(3))
    other = A.subject_anatomy(a2, np.random.default_rng(4))
    for name in ("t1", "gm", "wm", "csf", "mask", "ventricles", "hippocampus", "affine"):
        np.testing.assert_array_equal(getattr(s1, name), getattr(again, name))
    assert not np.array_equal(s1.t1, other.t1) and not np.array_equal(s1.t1, a2.t1)
    np.testing.assert_array_equal(s1.affine, a2.affine)
    for s in (s1, other):
        assert s.ventricles.any() and s.hippocampus.any() and not (s.ventricles & ~s.mask).any()
        total = s.gm.astype(np.float64) + s.wm + s.csf
        np.testing.assert_allclose(total[s.mask], 1.0, atol=1e-6)
        assert np.all(total[~s.mask] == 0) and s.gm.min() >= 0 and s.csf.max() <= 1


@pytest.mark.parametrize("seed", range(4))
def test_subject_brain_scales_by_s_per_axis(a2, seed):
    v, s = A._deformation(a2, np.random.default_rng(seed), 0.04, 2.0)
    assert jacobian(v).min() > 0
    sub = A.subject_anatomy(a2, np.random.default_rng(seed))
    assert sub.mask.sum() == pytest.approx(a2.mask.sum() * s**2, rel=0.03)
    # no spread, no warp: the identity
    flat, s0 = A._deformation(a2, np.random.default_rng(seed), 0.0, 0.0)
    assert s0 == 1.0 and np.all(flat == 0)


def test_wild_deformations_are_scaled_back_to_stay_diffeomorphic(a2, a3):
    for a in (a2, a3):
        v, s = A._deformation(a, np.random.default_rng(1), 0.1, 60.0)
        assert jacobian(v).min() > 0
    a = A.subject_anatomy(a3, np.random.default_rng(0))
    assert a.shape == a3.shape and a.ventricles.any() and a.hippocampus.any()
    with pytest.raises(InputError, match="subject_anatomy"):
        A.subject_anatomy(a2, np.random.default_rng(0), warp_mm=-1.0)


def test_warp_mm_is_the_rms_displacement_inside_the_brain(a2):
    v, s = A._deformation(a2, np.random.default_rng(5), 0.0, 2.0)
    assert s == 1.0
    mm = v * np.asarray(a2.spacing)[:, None, None]
    rms = np.sqrt(np.mean(np.sum(mm**2, axis=0)[a2.mask]))
    assert rms == pytest.approx(2.0, rel=1e-9)
    # and it is smooth: neighbouring voxels move alike (20 mm smoothing, 3 mm voxels)
    assert np.abs(np.diff(mm, axis=1)).max() < 0.5 * np.abs(mm).max()
