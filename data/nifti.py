"""Reading and writing single NIfTI volumes, with every way a file can be bad made into one clear error.

`read_nifti` returns the voxels reoriented to the closest RAS orientation
(`nibabel.as_closest_canonical`) together with the affine of that reoriented array, so
every importer sees one orientation whatever the scanner wrote. `write_nifti` writes
atomically (temporary sibling, then one `os.replace`), so a crash never leaves half a file.

Axis convention: NIfTI arrays are indexed (x, y, z[, c]) and the affine maps that index to
world millimetres. Cohorts store scans as (..., z, y, x); the cohort's `affine` is this same
NIfTI affine, i.e. it maps the cohort's spatial axes *in reverse order* (x, y, z) to world.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from twin.errors import InputError

_GZIP_MAGIC = b"\x1f\x8b"
SUFFIXES = (".nii", ".nii.gz")


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI file as (data float32 (X, Y, Z) or (X, Y, Z, C) in RAS, affine (4, 4) float64).

    Raises `InputError(source=path, field=...)` for a missing file ("file"), an unknown
    extension ("extension"), a `.gz` that is not gzip ("gzip"), an unreadable header
    ("header"), truncated or undecodable voxel data ("data"), NaN/Inf voxels ("voxels"),
    and arrays that are not 3D or 4D ("dim").
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", source=str(path), field="file")
    if not path.name.endswith(SUFFIXES):
        raise InputError(f"expected a .nii or .nii.gz file, got {path.name!r}", source=str(path), field="extension")
    if path.name.endswith(".gz"):
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic != _GZIP_MAGIC:
            raise InputError(f"named .gz but not gzip-compressed (starts with {magic.hex() or 'nothing'}, "
                             f"expected {_GZIP_MAGIC.hex()})", source=str(path), field="gzip")
        _check_gzip_stream(path)
    try:
        # mmap=False: read the voxels now, so a truncated file fails here rather than later.
        image = nib.load(str(path), mmap=False)
    except Exception as err:  # nibabel raises many types (ImageFileError, HeaderDataError, EOFError, zlib.error)
        raise InputError(f"not a readable NIfTI header ({type(err).__name__}: {_one_line(err)})", source=str(path), field="header") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"not a NIfTI-1/2 image (nibabel read it as {type(image).__name__})", source=str(path), field="header")
    shape = image.shape
    if len(shape) == 5 and shape[3] == 1:  # (X, Y, Z, 1, C): NIfTI's convention for vector data
        image = image.slicer[:, :, :, 0, :]
        shape = image.shape
    if len(shape) not in (3, 4):
        raise InputError(f"expected a 3D (X, Y, Z) or 4D (X, Y, Z, C) array, got shape {shape}", source=str(path), field="dim")
    try:
        image = nib.as_closest_canonical(image)
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:  # truncated files and corrupt gzip streams surface only when the data are read
        raise InputError(f"voxel data unreadable, file truncated or corrupt ({type(err).__name__}: {_one_line(err)})",
                         source=str(path), field="data") from None
    bad = ~np.isfinite(data)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{int(bad.sum())} NaN or Inf voxel(s), first at RAS index {first}", source=str(path), field="voxels")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not (np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 1e-12):
        raise InputError("affine is not finite and invertible", source=str(path), field="affine")
    return data, affine


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write data (X, Y, Z) or (X, Y, Z, C) as float32 NIfTI-1 with `affine` (4, 4) as qform and sform.

    The file appears complete or not at all: it is written to a hidden sibling first.
    Compression follows the name (`.nii.gz` is gzipped). Returns the path.
    """
    import nibabel as nib

    path = Path(path)
    data = np.asarray(data, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    if not path.name.endswith(SUFFIXES):
        raise InputError(f"expected a .nii or .nii.gz name, got {path.name!r}", source=str(path), field="extension")
    if data.ndim not in (3, 4):
        raise InputError(f"expected a 3D (X, Y, Z) or 4D (X, Y, Z, C) array, got shape {data.shape}", source=str(path), field="dim")
    if affine.shape != (4, 4):
        raise InputError(f"affine must be 4x4, got {affine.shape}", source=str(path), field="affine")
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)  # scanner coordinates
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}{suffix}")
    try:
        nib.save(image, str(partial))
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _one_line(err: Exception) -> str:
    """nibabel's messages can span lines; the CLI promises one."""
    return " ".join(str(err).split())


def _check_gzip_stream(path: Path) -> None:
    """Read the whole stream once: only its end holds the CRC and length that reveal truncation.

    nibabel stops once it has the voxels it needs, so a file missing its last bytes would
    otherwise load without complaint.
    """
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as err:
        raise InputError(f"gzip stream truncated or corrupt ({type(err).__name__}: {_one_line(err)})",
                         source=str(path), field="gzip") from None
