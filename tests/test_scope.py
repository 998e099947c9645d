"""The bundle's scope: modality, body part, image type and orientation of DICOM input, checked before any
model runs (``status="out_of_scope"``), the caller's override, the manifest section and its default."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from medfedpure.cli import app  # noqa: E402
from medfedpure.runtime.bundle import BundleError, default_bundle_path  # noqa: E402
from medfedpure.runtime.defender import Defender  # noqa: E402
from medfedpure.runtime.manifest import DEFAULT_SCOPE, BundleSpec, Scope  # noqa: E402
from medfedpure.scan import load_scan  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from tiny_bundle import TEST_KEY, cached_tiny_bundle  # noqa: E402
from typer.testing import CliRunner  # noqa: E402


def _path(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return str(path)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return cached_tiny_bundle()


@pytest.fixture(scope="module")
def d(tiny: Path) -> Defender:
    return Defender.load(tiny, backend="onnxruntime", device="cpu", threads=1)


def _with_scope(tiny: Path, out: Path, scope: dict | None, *, sign: bool = True) -> Path:
    """A copy of the tiny bundle whose manifest has ``scope`` (None: no scope section), signed unless not ``sign``."""
    from medfedpure.export.signing import sign_bundle

    shutil.copytree(tiny, out)
    (out / "signature.json").unlink(missing_ok=True)
    m = json.loads((out / "manifest.json").read_text())
    m.pop("scope", None)
    if scope is not None:
        m["scope"] = scope
    (out / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    if sign:
        sign_bundle(out, TEST_KEY)
    return out


def _mr_copy(tmp_path: Path, name: str = "mr.dcm", **attrs) -> Path:
    ds = pydicom.dcmread(_path("MR_small.dcm"))
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    p = tmp_path / name
    ds.save_as(p, enforce_file_format=True)
    return p


def _tilted(deg: float) -> list[float]:
    """ImageOrientationPatient of a slice tilted by ``deg`` about the x axis from axial."""
    t = math.radians(deg)
    return [1.0, 0.0, 0.0, 0.0, math.cos(t), math.sin(t)]


# --- the Defender ------------------------------------------------------------------------------
def test_ct_small_is_out_of_scope_without_model_output(d: Defender) -> None:
    r = d.run(_path("CT_small.dcm"), seed=5)
    assert r.status == "out_of_scope" and not r.ok
    assert r.label is None and r.probabilities == {} and r.score is None and r.flagged is None
    assert r.t_star is None and r.policy is None and r.score_quantile is None
    assert "Modality 'CT'" in r.reason and "['MR']" in r.reason and "allow_out_of_scope" in r.reason
    assert r.scope["modality"] == "CT" and r.scope["in_scope"] is False and r.scope["override"] is False
    assert r.latency_ms["mae"] == r.latency_ms["classify"] == 0.0  # no model ran
    assert r.pixel_sha256 == load_scan(_path("CT_small.dcm")).sha256
    assert r.to_dict()["status"] == "out_of_scope"


def test_ct_small_override_gives_a_label_and_records_it(d: Defender) -> None:
    r = d.run(_path("CT_small.dcm"), seed=5, allow_out_of_scope=True)
    assert r.status == "ok" and r.label in d.classes and sum(r.probabilities.values()) == pytest.approx(1.0)
    assert r.scope["override"] is True and r.scope["in_scope"] is False and "Modality 'CT'" in r.scope["reason"]
    # the override does not change an in-scope scan's record
    mr = d.run(_path("MR_small.dcm"), seed=5, allow_out_of_scope=True)
    assert mr.scope["override"] is False and mr.scope["in_scope"] is True


def test_mr_small_is_in_scope(d: Defender) -> None:
    r = d.run(_path("MR_small.dcm"), seed=5)
    assert r.status == "ok" and r.label in d.classes
    assert r.scope == {"modality": "MR", "body_part": "unknown", "image_type": "DERIVED",
                       "orientation": "axial (tilt 0.0°)", "in_scope": True, "reason": None, "override": False}


def test_batch_keeps_out_of_scope_apart(d: Defender) -> None:
    ct, mr = _path("CT_small.dcm"), _path("MR_small.dcm")
    rs = d.run_batch([ct, mr, ct], seeds=[1, 2, 3])
    assert [r.status for r in rs] == ["out_of_scope", "ok", "out_of_scope"]
    alone = d.run(mr, seed=2)
    assert rs[1].probabilities == alone.probabilities and rs[1].score == alone.score
    over = d.run_batch([ct, mr], seeds=[1, 2], allow_out_of_scope=True)
    assert [r.status for r in over] == ["ok", "ok"] and over[0].scope["override"]


def test_sagittal_mr_is_out_of_scope(d: Defender, tmp_path: Path) -> None:
    p = _mr_copy(tmp_path, ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
    r = d.run(p, seed=1)
    assert r.status == "out_of_scope" and r.label is None
    assert "ImageOrientationPatient" in r.reason and "sagittal" in r.reason and "90.0°" in r.reason
    assert r.scope["orientation"] == "sagittal (tilt 0.0°)"


@pytest.mark.parametrize("deg, ok", [(0.0, True), (29.0, True), (31.0, False), (60.0, False), (150.0, True)])
def test_axial_rule_is_30_degrees_from_z(d: Defender, tmp_path: Path, deg: float, ok: bool) -> None:
    r = d.run(_mr_copy(tmp_path, ImageOrientationPatient=_tilted(deg)), seed=1)
    assert (r.status == "ok") is ok, r.reason


@pytest.mark.parametrize("attrs, status, unknown, needle", [
    ({"BodyPartExamined": "KNEE"}, "out_of_scope", None, "BodyPartExamined 'KNEE'"),
    ({"BodyPartExamined": "brain"}, "ok", None, None),  # compared case-insensitively
    ({"ImageType": ["LOCALIZER"]}, "out_of_scope", None, "ImageType 'LOCALIZER'"),
    ({"ImageType": None}, "ok", "image_type", None),  # absent: in scope, recorded as unknown
    ({"ImageOrientationPatient": None}, "ok", "orientation", None),
    ({"Modality": None}, "ok", "modality", None),
])
def test_attributes(d: Defender, tmp_path: Path, attrs: dict, status: str, unknown: str | None,
                    needle: str | None) -> None:
    r = d.run(_mr_copy(tmp_path, **attrs), seed=1)
    assert r.status == status, r.reason
    if needle is not None:
        assert needle in r.reason
    if unknown is not None:
        assert r.scope[unknown] == "unknown"


def test_png_is_in_scope_with_unknown_modality(d: Defender) -> None:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)).save(buf, format="PNG")
    r = d.run(buf.getvalue(), seed=1)
    assert r.status == "ok"
    assert r.scope == {"modality": "unknown", "body_part": "unknown", "image_type": "unknown",
                       "orientation": "unknown", "in_scope": True, "reason": None, "override": False}
    assert r.dicom_uids is None


# --- the manifest section ------------------------------------------------------------------------
def test_ct_only_bundle_puts_mr_out_of_scope(tiny: Path, tmp_path: Path) -> None:
    b = _with_scope(tiny, tmp_path / "ct", {**Scope().to_dict(), "modalities": ["CT"]})
    d = Defender.load(b, backend="onnxruntime", device="cpu", threads=1)
    assert d.scope.modalities == ("CT",)
    mr = d.run(_path("MR_small.dcm"), seed=1)
    assert mr.status == "out_of_scope" and "Modality 'MR'" in mr.reason and "['CT']" in mr.reason
    assert d.run(_path("CT_small.dcm"), seed=1).status == "ok"


def test_bundle_without_scope_gets_the_default(tiny: Path, tmp_path: Path) -> None:
    b = _with_scope(tiny, tmp_path / "none", None)
    d = Defender.load(b, backend="onnxruntime", device="cpu", threads=1)
    assert d.bundle.spec.scope is None and d.scope == DEFAULT_SCOPE
    assert "scope" not in d.bundle.spec.to_manifest()  # read and written back as it was
    assert d.run(_path("CT_small.dcm"), seed=1).status == "out_of_scope"
    # the shipped default bundle predates the section and keeps loading with the default scope
    shipped = json.loads((Path(default_bundle_path()) / "manifest.json").read_text())
    assert BundleSpec.from_manifest(shipped).effective_scope == DEFAULT_SCOPE


def test_export_writes_the_scope(tiny: Path) -> None:
    m = json.loads((tiny / "manifest.json").read_text())
    assert m["scope"] == {"modalities": ["MR"], "body_parts": ["BRAIN", "HEAD"], "image_types": ["ORIGINAL", "DERIVED"],
                          "orientation": "axial", "max_tilt_deg": 30.0}
    assert BundleSpec.from_manifest(m).scope == Scope()


@pytest.mark.parametrize("patch, match", [
    ({"orientation": "oblique"}, "scope.orientation"),
    ({"max_tilt_deg": 90}, "scope.max_tilt_deg"),
    ({"modalities": []}, "scope.modalities"),
    ({"modalities": "MR"}, "scope.modalities"),
    ({"body_parts": ["HEAD", "head"]}, "scope.body_parts"),
    ({"colour": "red"}, "unknown keys"),
])
def test_bad_scope_sections_are_refused(patch: dict, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        Scope.from_dict({**Scope().to_dict(), **patch})


def test_bundle_with_bad_scope_does_not_load(tiny: Path, tmp_path: Path) -> None:
    b = _with_scope(tiny, tmp_path / "bad", {**Scope().to_dict(), "orientation": "oblique"}, sign=False)
    with pytest.raises(BundleError, match="scope.orientation"):
        Defender.load(b, backend="onnxruntime", device="cpu", allow_unsigned=True)


# --- the CLI and the service ---------------------------------------------------------------------
def test_cli_out_of_scope_and_override(tiny: Path) -> None:
    args = ["run", _path("CT_small.dcm"), "--bundle", str(tiny), "--threads", "1", "--seed", "3", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    rec = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
    assert rec["status"] == "out_of_scope" and rec["label"] is None and rec["scope"]["override"] is False
    res = CliRunner().invoke(app, [*args, "--allow-out-of-scope"])
    assert res.exit_code == 0, res.output
    rec = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
    assert rec["status"] == "ok" and rec["label"] is not None and rec["scope"]["override"] is True


def test_service_answers_out_of_scope(tiny: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from medfedpure.serve.app import create_app
    from medfedpure.serve.config import ServeConfig

    body = Path(_path("CT_small.dcm")).read_bytes()
    with TestClient(create_app(ServeConfig(bundle=str(tiny)))) as c:
        resp = c.post("/v1/classify", content=body, headers={"Content-Type": "application/dicom"})
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert got["status"] == "out_of_scope" and got["label"] is None and got["probabilities"] == {}
        assert "Modality 'CT'" in got["reason"]
        ok = c.post("/v1/classify", content=Path(_path("MR_small.dcm")).read_bytes(),
                    headers={"Content-Type": "application/dicom"}).json()
        assert ok["status"] == "ok" and ok["scope"]["in_scope"] is True
