"""Bundle format: round trip, and every kind of tampering refused before any parser sees a file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from medfedpure.export.bundle_writer import ArtefactSource, write_bundle
from medfedpure.runtime.bundle import FORMAT_VERSION, BundleError, check_relpath, verify_bundle
from medfedpure.runtime.manifest import BundleSpec, MaeSpec, Preprocessing, PurifierSpec

PAYLOADS = {
    "classifier": ("classifier.onnx", "classifier", "onnx", "fp32", b"\x08\x07classifier-graph" * 10),
    "classifier.fp16": ("classifier.fp16.onnx", "classifier", "onnx", "fp16", b"half" * 33),
    "mae.torch": ("torch/mae.safetensors", "mae", "safetensors", "fp32", b"weights" * 17),
}


LEGACY_GATE = {"stat": "mean", "topk": 0, "norm_pix": False, "patch": 8, "tau": 0.1, "tau_high": 0.2,
               "t_min": 40, "t_max": 200, "policy": "adaptive", "steps": 2}


def small_spec(provenance: dict | None = None) -> BundleSpec:
    """A valid 32 px spec: 16 patches of 8 px, two mask sets (each hides half the patches)."""
    from medfedpure.gate import GateSpec

    visible = np.array([[True, False] * 8, [False, True] * 8])
    table = np.cos(np.linspace(0, 1.4, 11)) ** 2
    return BundleSpec(classes=("no_tumor", "tumor"), image_size=32, preprocessing=Preprocessing(size=32),
                      mae=MaeSpec(patch=8, k=2, norm_pix=False, visible=visible),
                      purifier=PurifierSpec(schedule="cosine", num_timesteps=10, alphas_cumprod=table / table[0],
                                            steps=2, sampler="ddim_eta0_uniform"),
                      gate=GateSpec.from_legacy_dict(LEGACY_GATE),
                      provenance={"code_commit": "abc"} if provenance is None else provenance)


def _write(root: Path) -> None:
    arts = {n: ArtefactSource(path=p, role=r, format=f, precision=pr, data=d)
            for n, (p, r, f, pr, d) in PAYLOADS.items()}
    write_bundle(root, arts, small_spec())


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "b"
    _write(root)
    return root


def test_round_trip(bundle: Path) -> None:
    vb = verify_bundle(bundle)
    raw = (bundle / "manifest.json").read_bytes()
    assert vb.bundle_id == hashlib.sha256(raw).hexdigest()
    assert vb.manifest["format_version"] == FORMAT_VERSION
    assert vb.classes == ("no_tumor", "tumor") and vb.image_size == 32
    assert vb.spec.to_manifest() == {k: v for k, v in json.loads(raw).items() if k != "artefacts"}
    np.testing.assert_array_equal(vb.spec.mae.visible, small_spec().mae.visible)
    for name, (_, role, fmt, prec, data) in PAYLOADS.items():
        assert vb.read_bytes(name) == data
        a = vb.artefacts[name]
        assert a.sha256 == hashlib.sha256(data).hexdigest() and a.bytes == len(data)
        assert vb.find(role, fmt, prec) is a
    assert vb.find("denoiser", "onnx", "fp32") is None
    # pinning: full id and a 16-digit prefix accepted, anything else refused
    verify_bundle(bundle, expected_id=vb.bundle_id)
    verify_bundle(bundle, expected_id=vb.bundle_id[:16])
    with pytest.raises(BundleError, match="pinned"):
        verify_bundle(bundle, expected_id="0" * 64)
    with pytest.raises(BundleError, match="no artefact"):
        vb.read_bytes("nope")


def test_writer_refuses_non_empty(bundle: Path) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        _write(bundle)


def test_flipped_byte_refused(bundle: Path) -> None:
    p = bundle / "classifier.onnx"
    data = bytearray(p.read_bytes())
    data[5] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        verify_bundle(bundle)


def test_truncated_file_refused(bundle: Path) -> None:
    p = bundle / "torch" / "mae.safetensors"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(BundleError, match="bytes"):
        verify_bundle(bundle)


@pytest.mark.parametrize("extra", ["evil.onnx", "torch/extra.bin", "sub/dir/x"])
def test_extra_file_refused(bundle: Path, extra: str) -> None:
    p = bundle / extra
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    with pytest.raises(BundleError, match="does not list"):
        verify_bundle(bundle)


def test_symlink_refused(bundle: Path, tmp_path: Path) -> None:
    # a listed artefact replaced by a link to an identical file outside the bundle
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((bundle / "classifier.onnx").read_bytes())
    (bundle / "classifier.onnx").unlink()
    os.symlink(outside, bundle / "classifier.onnx")
    with pytest.raises(BundleError, match="symbolic link"):
        verify_bundle(bundle)


def test_symlinked_folder_refused(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", bundle / "linked")
    with pytest.raises(BundleError, match="symbolic link"):
        verify_bundle(bundle)


def test_symlinked_manifest_refused(bundle: Path, tmp_path: Path) -> None:
    m = bundle / "manifest.json"
    (tmp_path / "m.json").write_bytes(m.read_bytes())
    m.unlink()
    os.symlink(tmp_path / "m.json", m)
    with pytest.raises(BundleError, match="links are refused"):
        verify_bundle(bundle)


def _edit_manifest(bundle: Path, fn) -> None:
    m = bundle / "manifest.json"
    d = json.loads(m.read_text())
    fn(d)
    m.write_text(json.dumps(d))


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "a/../classifier.onnx", "./x", "a\\b",
                                 "manifest.json", ""])
def test_path_leaving_bundle_refused(bundle: Path, tmp_path: Path, bad: str) -> None:
    (tmp_path / "outside.onnx").write_bytes(PAYLOADS["classifier"][4])

    def fn(d):
        d["artefacts"]["classifier"]["path"] = bad

    _edit_manifest(bundle, fn)
    with pytest.raises(BundleError, match="path"):
        verify_bundle(bundle)


def test_missing_file_refused(bundle: Path) -> None:
    (bundle / "classifier.fp16.onnx").unlink()
    with pytest.raises(BundleError, match="lacks files"):
        verify_bundle(bundle)


def test_manifest_problems_refused(bundle: Path, tmp_path: Path) -> None:
    _edit_manifest(bundle, lambda d: d.__setitem__("format_version", 99))
    with pytest.raises(BundleError, match="format version"):
        verify_bundle(bundle)
    _edit_manifest(bundle, lambda d: d.__setitem__("format_version", 1))
    with pytest.raises(BundleError, match="version 1 is not supported.*convert"):
        verify_bundle(bundle)
    _edit_manifest(bundle, lambda d: d.__setitem__("format_version", FORMAT_VERSION))
    _edit_manifest(bundle, lambda d: d.pop("gate"))
    with pytest.raises(BundleError, match="lacks"):
        verify_bundle(bundle)
    _edit_manifest(bundle, lambda d: d.__setitem__("gate", {}))
    _edit_manifest(bundle, lambda d: d.__setitem__("extra_section", {}))
    with pytest.raises(BundleError, match="unknown sections"):
        verify_bundle(bundle)
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="JSON"):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match="no manifest.json"):
        verify_bundle(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        verify_bundle(tmp_path / "absent")


def test_swap_after_verification_refused(bundle: Path) -> None:
    vb = verify_bundle(bundle)
    (bundle / "classifier.onnx").write_bytes(b"swapped")
    with pytest.raises(BundleError, match="changed after verification"):
        vb.read_bytes("classifier")


def test_check_relpath_accepts_plain_paths() -> None:
    assert str(check_relpath("tensorrt/sm90/classifier.plan")) == "tensorrt/sm90/classifier.plan"


def test_writer_makes_provenance_strict_json(tmp_path: Path) -> None:
    arts = {"classifier": ArtefactSource(path="c.onnx", role="classifier", format="onnx", precision="fp32", data=b"x")}
    spec = small_spec({"metrics": {"max_update_norm": float("inf"), "x": [float("nan"), 1.0]}})
    vb = write_bundle(tmp_path / "b", arts, spec)
    assert vb.manifest["provenance"]["metrics"] == {"max_update_norm": "inf", "x": ["nan", 1.0]}
    assert vb.spec.provenance["metrics"]["x"] == ("nan", 1.0)  # read-only view


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    arts = {"classifier": ArtefactSource(path="c.onnx", role="classifier", format="onnx", precision="fp32", data=b"x")}
    with pytest.raises(TypeError, match="JSON serializable"):
        write_bundle(tmp_path / "b", arts, small_spec({"bad": object()}))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
