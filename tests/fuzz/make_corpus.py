"""Write the seed corpus of the scan fuzzers into ``tests/fuzz/corpus/``.

Seeds: small PNG / JPEG / TIFF / BMP images made with Pillow (grey 8 and 16 bit, float, RGB,
opaque RGBA, palette, a two-page TIFF) and pydicom's bundled DICOM test files (MR_small and its
RLE, big-endian, implicit-VR, JPEG-LS variants, the truncated one, a multi-frame RGB RLE file, a
file without preamble, an object without pixel data) plus an in-memory multi-frame MONOCHROME1
file with a rescale. Files named ``crash-*`` are reproducers of fixed reader bugs; this script
never touches them. Run ``python tests/fuzz/make_corpus.py`` to regenerate the seeds; the output
is deterministic (fixed pixel content and UIDs).
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CORPUS = Path(__file__).resolve().parent / "corpus"

DICOM_FILES = (
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_truncated.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_small_odd.dcm",
    "ExplVR_BigEndNoMeta.dcm",
    "rtplan.dcm",
)


def _pattern(h: int = 48, w: int = 40) -> np.ndarray:
    """A deterministic (h, w) float64 image in [0, 1]: a ramp plus a bright disc (non-constant)."""
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = (xx + 2 * yy) / (w + 2 * h)
    disc = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2) < (min(h, w) / 4) ** 2
    return np.clip(0.6 * ramp + 0.4 * disc, 0.0, 1.0)


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pillow_seeds() -> dict[str, bytes]:
    """name -> bytes of the Pillow-made seeds."""
    p = _pattern()
    g8 = Image.fromarray((p * 255).astype(np.uint8), mode="L")
    g16 = Image.fromarray((p * 4095).astype(np.uint16))
    rgb = Image.fromarray((np.stack([p, p[::-1], p[:, ::-1]], axis=2) * 255).astype(np.uint8), mode="RGB")
    rgba = rgb.convert("RGBA")
    pal = rgb.quantize(colors=16)
    flt = Image.fromarray((p * 1000.0 - 200.0).astype(np.float32), mode="F")
    page2 = Image.fromarray((p[::-1] * 255).astype(np.uint8), mode="L")
    return {
        "grey8.png": _encode(g8, "PNG"),
        "grey16.png": _encode(g16, "PNG"),
        "rgba_opaque.png": _encode(rgba, "PNG"),
        "palette.png": _encode(pal, "PNG"),
        "grey.jpg": _encode(g8, "JPEG", quality=75),
        "rgb_progressive.jpg": _encode(rgb, "JPEG", quality=75, progressive=True),
        "grey8_deflate.tif": _encode(g8, "TIFF", compression="tiff_adobe_deflate"),
        "float32.tif": _encode(flt, "TIFF"),
        "two_pages.tif": _encode(g8, "TIFF", save_all=True, append_images=[page2]),
        "rgb.bmp": _encode(rgb, "BMP"),
        "palette.bmp": _encode(pal, "BMP"),
    }


def dicom_seeds() -> dict[str, bytes]:
    """name -> bytes of the DICOM seeds (pydicom's bundled test files + one made here)."""
    import pydicom
    from pydicom.data import get_testdata_file

    out: dict[str, bytes] = {}
    for name in DICOM_FILES:
        path = get_testdata_file(name)
        if path is None:
            raise SystemExit(f"pydicom test file {name} is not installed: install pydicom's test data")
        out[name] = Path(path).read_bytes()
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    raw = np.asarray(ds.pixel_array)[:40, :36]
    frames = np.stack([raw, raw // 2, -raw]).astype(np.int16)
    ds.Rows, ds.Columns = raw.shape
    ds.NumberOfFrames = 3
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.PixelData = frames.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out["mr_3frames_mono1_rescale.dcm"] = buf.getvalue()
    return out


def main(argv: list[str]) -> int:
    """Rewrite every seed (``crash-*`` reproducers are kept); prints the corpus size."""
    if argv:
        print("usage: python tests/fuzz/make_corpus.py", file=sys.stderr)
        return 2
    CORPUS.mkdir(exist_ok=True)
    seeds = {**pillow_seeds(), **dicom_seeds()}
    for old in CORPUS.iterdir():
        if not old.name.startswith("crash-") and old.name not in seeds:
            old.unlink() if old.is_file() else shutil.rmtree(old)
    for name, data in seeds.items():
        (CORPUS / name).write_bytes(data)
    total = sum(f.stat().st_size for f in CORPUS.iterdir())
    print(f"{len(list(CORPUS.iterdir()))} files, {total} bytes in {CORPUS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
