"""Brain anatomy for the synthetic generator, from the MNI152 templates that nilearn ships.

nilearn bundles the ICBM152 2009a (symmetric) skull-stripped T1 template, its grey- and
white-matter probability maps at 1 mm inside the package, so they load offline
(the ``fetch_*`` functions download and are never used here). The volumes are loaded once per
process and kept; worker processes forked after the first load share them copy-on-write.

Besides the tissue maps, two distance maps (2 mm grid) are derived once:

* ``head_dist`` — millimetres outside the brain's *closed* envelope (0 inside it). The envelope is
  the brain mask morphologically closed with a 6 mm ball, so the skull drawn at constant distances
  from it follows the convex outline of the brain rather than every gyrus, as on real slices.
* ``depth`` — millimetres inside the brain mask (0 outside); tumour centres are placed deep enough
  that the lesion stays inside the brain.

MNI world coordinates (mm, RAS): x along voxel axis 0, y anterior, z superior; voxel index =
world - origin, with origin (-98, -134, -72) and 1 mm voxels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

#: World coordinate (mm) of voxel (0, 0, 0) of the nilearn 1 mm templates.
ORIGIN_MM = (-98.0, -134.0, -72.0)
#: Axial levels (world z, mm) kept in memory: slices are drawn from Z_RANGE_MM with an oblique tilt,
#: so a margin is kept above and below.
_Z_KEEP_MM = (-22.0, 74.0)
_CLOSE_MM = 6.0


#: Channels of :attr:`Anatomy.volume`.
CHANNELS = ("t1", "gm", "wm", "mask", "head_dist", "depth")


@dataclass(frozen=True)
class Anatomy:
    """Template volumes on the 1 mm grid, cropped in z, channel-last for fast trilinear gathers.

    ``volume``: float32 [X, Y, Z, 6], channels :data:`CHANNELS`: T1 intensity in [0, 1], grey- and
    white-matter probabilities in [0, 1] (zero outside the brain), brain mask in {0, 1}, mm outside
    the closed brain envelope (0 inside), mm of depth inside the brain mask (0 outside).
    ``z0``: world z (mm) of index 0 along the Z axis.
    """

    volume: np.ndarray
    z0: float
    source: str


_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _read_template(name: str) -> np.ndarray:
    """One template volume rescaled to [0, 1], float32 [197, 233, 189].

    Reads the file that ``nilearn.datasets.load_mni152_{template,gm_template,wm_template}(1)`` read,
    with nibabel directly: importing ``nilearn.datasets`` costs seconds per process.
    """
    import importlib.util
    from pathlib import Path

    import nibabel

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise RuntimeError("nilearn is not installed: `pip install nilearn` (it ships the MNI152 templates)")
    path = Path(spec.origin).parent / "datasets" / "data" / _FILES[name]
    if not path.is_file():
        raise RuntimeError(f"nilearn's bundled MNI152 template {path} is missing: reinstall nilearn")
    img = nibabel.load(path)
    affine = np.asarray(img.affine)
    if not np.allclose(affine[:3, :3], np.eye(3)) or not np.allclose(affine[:3, 3], ORIGIN_MM):
        raise RuntimeError(
            f"unexpected MNI152 template affine {affine.tolist()} in {path}: this nilearn version "
            "ships a different template grid; install nilearn>=0.10,<0.15"
        )
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data / data.max()


#: where the anatomy comes from (recorded in every synthetic data set)
ANATOMY_SOURCE = "MNI152 ICBM 2009a sym templates (T1, GM, WM; 1 mm) bundled with nilearn"


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """Load the nilearn MNI152 templates once per process (a few seconds) and derive the distance maps."""
    from scipy import ndimage  # training-side dependency; the runtime core does not need it
    t1, gm, wm = (_read_template(name) for name in ("t1", "gm", "wm"))
    k0 = int(_Z_KEEP_MM[0] - ORIGIN_MM[2])
    k1 = int(_Z_KEEP_MM[1] - ORIGIN_MM[2])
    # The template is skull-stripped: everything above a low threshold is brain or CSF; ventricles
    # (darkest inside) are enclosed, hence filled. (nilearn's own mask thresholds at 0.2.)
    t1, gm, wm = (v[:, :, k0:k1] for v in (t1, gm, wm))
    mask = ndimage.binary_fill_holes(t1 > 0.1).astype(np.float32)
    # Tissue probabilities are defined inside the brain only.
    gm *= mask
    wm *= mask

    # Distances on a 2 mm grid (cheap), then back to 1 mm. Closing by EDT thresholds: dilate by
    # _CLOSE_MM, then erode by the same amount.
    spacing = 2.0
    mask2 = mask[::2, ::2, ::2] > 0.5
    outside = ndimage.distance_transform_edt(~mask2, sampling=spacing)
    dilated = outside <= _CLOSE_MM
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > _CLOSE_MM
    head_dist2 = ndimage.distance_transform_edt(~closed, sampling=spacing).astype(np.float32)
    depth2 = ndimage.distance_transform_edt(mask2, sampling=spacing).astype(np.float32)

    def up(d: np.ndarray) -> np.ndarray:
        # 1 mm voxel i sits at 2 mm voxel i / 2. (Changing this interpolation changes generated
        # bytes by ±1 grey level: keep it, or bump the generator version.)
        return ndimage.affine_transform(d, [0.5, 0.5, 0.5], output_shape=mask.shape, order=1,
                                        mode="nearest", prefilter=False).astype(np.float32)

    volume = np.stack([t1, gm, wm, mask, up(head_dist2), up(depth2)], axis=-1)
    return Anatomy(
        volume=np.ascontiguousarray(volume),
        z0=float(k0 + ORIGIN_MM[2]),
        source=ANATOMY_SOURCE,
    )


def sample(anat: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Trilinearly sample all channels at world coordinates (mm).

    Args:
        x, y, z: float arrays of one shape P (world mm, RAS).
    Returns:
        float32 [*P, 6], channels :data:`CHANNELS`. Points outside the volume take the edge value
        of the (zero-padded) volume's border; the templates are zero there, and the head distance
        is large — air.
    """
    vol = anat.volume
    nx, ny, nz, nc = vol.shape
    ix = np.clip(x - ORIGIN_MM[0], 0.0, nx - 1.001)
    iy = np.clip(y - ORIGIN_MM[1], 0.0, ny - 1.001)
    iz = np.clip(z - anat.z0, 0.0, nz - 1.001)
    x0 = ix.astype(np.int64)
    y0 = iy.astype(np.int64)
    z0 = iz.astype(np.int64)
    fx = (ix - x0).astype(np.float32)[..., None]
    fy = (iy - y0).astype(np.float32)[..., None]
    fz = (iz - z0).astype(np.float32)[..., None]
    flat = vol.reshape(-1, nc)
    sx, sy = ny * nz, nz
    base = (x0 * ny + y0) * nz + z0

    def lerp_z(off: int) -> np.ndarray:
        # np.take on rows is ~15x faster than fancy indexing here
        a = np.take(flat, base + off, axis=0)
        return a + (np.take(flat, base + (off + 1), axis=0) - a) * fz

    c0 = lerp_z(0)
    c0 += (lerp_z(sy) - c0) * fy
    c1 = lerp_z(sx)
    c1 += (lerp_z(sx + sy) - c1) * fy
    c0 += (c1 - c0) * fx
    return c0
