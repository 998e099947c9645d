"""Defender: every scan kind, early exit vs purification, fail-closed statuses, keyed replay, backends agree."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from medfedpure import Defender, Result, ScanError, load_scan
from medfedpure.runtime.bundle import BundleError
from PIL import Image
from tiny_bundle import cached_tiny_bundle, tiny_scans

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle_path() -> Path:
    return cached_tiny_bundle()


@pytest.fixture()
def d_ort(bundle_path: Path) -> Defender:
    return Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1)


@pytest.fixture(scope="module")
def d_torch(bundle_path: Path) -> Defender:
    return Defender.load(bundle_path, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def split(bundle_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scans on both sides of τ: (x [N,1,32,32], flagged [N] from the reference gate, scores)."""
    d = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1)
    x = tiny_scans(32, 77)
    rs = d.run_array(x, seeds=[0] * 32)
    flagged = np.array([r.flagged for r in rs])
    assert 0 < flagged.sum() < 32, "the tiny bundle should flag some scans and pass others"
    return x, flagged, np.array([r.score for r in rs])


def _image(seed: int = 1, shape: tuple[int, ...] = (48, 40)) -> np.ndarray:
    x = tiny_scans(1, seed, size=64)[0, 0]
    img = (x[: shape[0], : shape[1]] * 255).astype(np.uint8)
    return img if len(shape) == 2 else np.repeat(img[..., None], shape[2], axis=2)


def _scan_kinds(tmp_path: Path) -> dict[str, object]:
    import pydicom.data

    grey = _image()
    png, jpg = tmp_path / "s.png", tmp_path / "s.jpg"
    Image.fromarray(grey).save(png)
    Image.fromarray(grey).save(jpg, quality=95)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    dcm = pydicom.data.get_testdata_file("MR_small.dcm")
    return {
        "uint8 array": grey, "float array": grey.astype(np.float32) / 255, "rgb array": _image(2, (48, 40, 3)),
        "uint16 array": grey.astype(np.uint16) * 200, "png path": str(png), "jpg path": jpg, "png bytes": buf.getvalue(),
        "dicom path": dcm, "dicom dataset": __import__("pydicom").dcmread(dcm), "pil image": Image.fromarray(grey),
        "Scan": load_scan(grey),
    }


def test_every_scan_kind(d_ort: Defender, tmp_path: Path) -> None:
    for kind, src in _scan_kinds(tmp_path).items():
        before = src.copy() if isinstance(src, np.ndarray) else None
        r = d_ort.run(src, seed=1)
        assert r.status == "ok", (kind, r.reason)
        assert r.label in ("no_tumor", "tumor"), kind
        assert abs(sum(r.probabilities.values()) - 1) < 1e-5 and set(r.probabilities) == {"no_tumor", "tumor"}
        assert r.flagged is not None and r.score is not None and r.score >= 0
        assert r.latency_ms["total"] >= r.latency_ms["mae"] > 0
        if before is not None:
            np.testing.assert_array_equal(before, src)  # caller data untouched


def test_bad_input_raises_scan_errors(d_ort: Defender, tmp_path: Path) -> None:
    with pytest.raises(ScanError):
        d_ort.run(np.zeros((40, 40, 4), np.uint8))
    with pytest.raises(ScanError):
        d_ort.run(tmp_path / "missing.png")
    with pytest.raises(ScanError):
        d_ort.run(b"not an image at all")
    with pytest.raises(ScanError, match="shape"):
        d_ort.run_array(np.zeros((1, 1, 16, 16), np.float32))
    with pytest.raises(ScanError):
        d_ort.run_array(np.full((1, 1, 32, 32), 2.0, np.float32))
    with pytest.raises(ValueError, match="seed"):
        d_ort.run(_image(), seed=-1)
    with pytest.raises(TypeError, match="sequence"):
        d_ort.run_batch(_image())


def test_early_exit_vs_purified(d_ort: Defender, split) -> None:
    x, flagged, _ = split
    i_clean, i_flag = int(np.flatnonzero(~flagged)[0]), int(np.flatnonzero(flagged)[0])
    r = d_ort.run_array(x[i_clean:i_clean + 1], seeds=[3], return_purified=True, return_patch_error=True)[0]
    assert (r.flagged, r.t_star, r.latency_ms["purify"]) == (False, 0, 0.0)
    np.testing.assert_array_equal(r.purified, x[i_clean])  # the classifier saw the scan itself
    assert r.patch_error.shape == (16,) and np.all(r.patch_error >= 0)
    r = d_ort.run_array(x[i_flag:i_flag + 1], seeds=[3], return_purified=True)[0]
    gate = d_ort.bundle.spec.gate
    assert r.flagged and gate.t_min <= r.t_star <= gate.t_max and r.latency_ms["purify"] > 0
    assert np.abs(r.purified - x[i_flag]).mean() > 1e-3


def test_mixed_batch_purifies_only_flagged(d_ort: Defender, split, monkeypatch) -> None:
    x, flagged, _ = split
    seen = []
    orig = d_ort.engine.purify

    def spy(xb, t_star, noise):
        seen.append((xb.copy(), np.asarray(t_star).copy()))
        return orig(xb, t_star, noise)

    monkeypatch.setattr(d_ort.engine, "purify", spy)
    rs = d_ort.run_array(x, seeds=list(range(len(x))))
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0][0], x[flagged])
    assert (seen[0][1] > 0).all()
    assert [r.flagged for r in rs] == flagged.tolist()
    # each member equals its own single run (keyed noise does not depend on the batch)
    for i in (int(np.flatnonzero(flagged)[0]), int(np.flatnonzero(~flagged)[0])):
        single = d_ort.run_array(x[i:i + 1], seeds=[i])[0]
        assert single.label == rs[i].label and single.t_star == rs[i].t_star
        assert abs(single.probabilities["tumor"] - rs[i].probabilities["tumor"]) < 1e-5


def test_floor_policy_purifies_everything(d_ort: Defender, split) -> None:
    x, flagged, _ = split
    d_ort.engine.gate_spec = d_ort.engine.gate_spec.with_policy("floor")
    rs = d_ort.run_array(x[:8], seeds=[0] * 8)
    t_min = d_ort.bundle.spec.gate.t_min
    assert all(r.t_star >= t_min for r in rs)
    assert [r.flagged for r in rs] == flagged[:8].tolist()
    assert all(r.t_star == t_min for r, f in zip(rs, flagged[:8], strict=True) if not f)


def test_same_seed_identical_result(d_ort: Defender, split) -> None:
    x, flagged, _ = split
    i = int(np.flatnonzero(flagged)[0])
    a = d_ort.run_array(x[i:i + 1], seeds=[12345], return_purified=True)[0].to_dict()
    b = d_ort.run_array(x[i:i + 1], seeds=[12345], return_purified=True)[0].to_dict()
    c = d_ort.run_array(x[i:i + 1], seeds=[54321], return_purified=True)[0].to_dict()
    for d in (a, b, c):
        d.pop("latency_ms")
    assert a == b
    assert a["purified"] != c["purified"]  # the seed is the key of the noise
    # seed=None draws a fresh seed and records it; replaying with it reproduces the decision
    r = d_ort.run_array(x[i:i + 1], return_purified=True)[0]
    assert isinstance(r.seed, int) and 0 <= r.seed < 2**63
    again = d_ort.run_array(x[i:i + 1], seeds=[r.seed], return_purified=True)[0]
    np.testing.assert_array_equal(again.purified, r.purified)


def test_result_json(d_ort: Defender) -> None:
    r = d_ort.run(_image(), seed=9)
    d = json.loads(r.to_json())
    assert set(d) >= {"label", "probabilities", "flagged", "score", "t_star", "status", "reason", "seed",
                      "latency_ms", "backend", "bundle_id"}
    assert d["bundle_id"] == d_ort.bundle.bundle_id and d["backend"] == "onnxruntime" and d["seed"] == 9
    assert set(d["latency_ms"]) == {"load", "preprocess", "mae", "gate", "purify", "classify", "total"}
    assert d["purified"] is None and d["patch_error"] is None
    assert isinstance(r, Result) and r.ok


def _unverified(rs, match: str) -> None:
    for r in rs:
        assert r.status == "unverified" and r.label is None and r.probabilities == {}, r
        assert match in r.reason, r.reason
        json.loads(r.to_json())  # still serialisable


@pytest.mark.parametrize("stage", ["mae", "classify"])
def test_fail_closed_on_stage_error(d_ort: Defender, split, monkeypatch, stage: str) -> None:
    def boom(*a, **k):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(d_ort.engine, stage, boom)
    _unverified(d_ort.run_array(split[0][:4], seeds=[0] * 4), f"{stage} failed: RuntimeError: injected fault")


def test_fail_closed_on_gate_error(d_ort: Defender, split, monkeypatch) -> None:
    monkeypatch.setattr(d_ort.engine, "gate", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad gate")))
    _unverified(d_ort.run_array(split[0][:2], seeds=[0, 0]), "gate failed")


@pytest.mark.parametrize("stage,match", [("mae", "non-finite reconstructions"),
                                         ("classify", "non-finite or invalid probabilities")])
def test_fail_closed_on_nan(d_ort: Defender, split, monkeypatch, stage: str, match: str) -> None:
    orig = getattr(d_ort.engine, stage)
    monkeypatch.setattr(d_ort.engine, stage, lambda xb: orig(xb) * np.float32("nan"))
    _unverified(d_ort.run_array(split[0][:4], seeds=[0] * 4), match)


def test_purifier_nan_fails_only_flagged_rows(d_ort: Defender, split, monkeypatch) -> None:
    x, flagged, _ = split
    monkeypatch.setattr(d_ort.engine, "denoise", lambda y, t: np.full_like(y, np.nan))
    rs = d_ort.run_array(x, seeds=[0] * len(x))
    for r, f in zip(rs, flagged, strict=True):
        if f:
            assert r.status == "unverified" and r.label is None and "purifier produced non-finite" in r.reason
        else:
            assert r.status == "ok" and r.label is not None  # early exit is unaffected


def test_fail_closed_on_timeout(bundle_path: Path, split) -> None:
    d = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1, timeout_s=1e-9)
    _unverified(d.run_array(split[0][:2], seeds=[0, 0]), "timeout")


def test_tampered_bundle_never_parsed(bundle_path: Path, tmp_path: Path, monkeypatch) -> None:
    import onnxruntime

    bad = tmp_path / "bundle"
    shutil.copytree(bundle_path, bad)
    p = bad / "mae.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: pytest.fail("parser reached"))
    with pytest.raises(BundleError, match="sha256"):
        Defender.load(bad)


@pytest.fixture(scope="module")
def synthetic_test_split(tmp_path_factory) -> np.ndarray:
    """The synthetic generator's test split (1 site, 32 px; all three splits' scans, for numbers)."""
    from medfedpure.data import SynthConfig, generate_synthetic, load_split, make_splits

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, SynthConfig(sites=1, per_site=60, size=32, seed=5), workers=1, progress=False)
    make_splits(root, seed=0)
    return np.concatenate([load_split(root, 0, sp, size=32, cache=False)[0] for sp in ("test", "val", "train")])


def test_backends_agree_top1(d_ort: Defender, d_torch: Defender, split, synthetic_test_split) -> None:
    """torch and onnxruntime Defenders: same decisions on synthetic scans through the whole pipeline."""
    x = np.concatenate([split[0], np.ascontiguousarray(synthetic_test_split, np.float32)])
    seeds = list(range(len(x)))
    ro, rt = d_ort.run_array(x, seeds=seeds), d_torch.run_array(x, seeds=seeds)
    assert all(r.ok for r in ro + rt)
    top1 = np.mean([a.label == b.label for a, b in zip(ro, rt, strict=True)])
    assert top1 >= 0.99
    assert [a.flagged for a in ro] == [b.flagged for b in rt]
    p_o = np.array([r.probabilities["tumor"] for r in ro])
    p_t = np.array([r.probabilities["tumor"] for r in rt])
    assert np.abs(p_o - p_t).max() < 1e-4
    assert rt[0].backend == "torch" and ro[0].backend == "onnxruntime"


def test_cli_run_and_verify_bundle(bundle_path: Path, tmp_path: Path) -> None:
    from medfedpure.cli import app
    from typer.testing import CliRunner

    png = tmp_path / "scan.png"
    Image.fromarray(_image()).save(png)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(png), "--bundle", str(bundle_path), "--json", "--seed", "5", "--threads", "1"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])
    assert row["scan"] == str(png) and row["status"] == "ok" and row["seed"] == 5
    res = runner.invoke(app, ["verify-bundle", str(bundle_path)])
    assert res.exit_code == 0 and "OK · format 2" in res.output
    bad = tmp_path / "bad"
    shutil.copytree(bundle_path, bad)
    (bad / "extra.txt").write_text("x")
    res = runner.invoke(app, ["verify-bundle", str(bad)])
    assert res.exit_code == 2 and "REFUSED" in res.output
    res = runner.invoke(app, ["run", str(tmp_path / "missing.png"), "--bundle", str(bundle_path)])
    assert res.exit_code == 2
    # the table prints a path with brackets as it is (escaped, not read as rich markup), a refusal's reason too
    odd = tmp_path / "[site a]"
    odd.mkdir()
    shutil.copy(png, odd / "scan.png")
    (odd / "notes.txt").write_text("not a scan [see below]")
    res = runner.invoke(app, ["run", str(odd / "scan.png"), str(odd / "notes.txt"), "--bundle", str(bundle_path),
                              "--threads", "1"], terminal_width=400)
    assert res.exit_code == 2, res.output
    table = "\n".join(ln for ln in res.output.splitlines() if "│" in ln)  # rows wrap: "[site" / "a]/scan.png"
    assert "a]/scan.png" in table and "a]/notes.txt" in table and "refused: ScanNotImageError" in table, res.output


def test_embedded_default_bundle_verifies() -> None:
    from medfedpure.runtime.bundle import default_bundle_path, verify_bundle

    if not (default_bundle_path() / "manifest.json").is_file():
        pytest.skip("no embedded default bundle yet (make bundle)")
    vb = verify_bundle(default_bundle_path())
    assert sum(a.bytes for a in vb.artefacts.values()) <= 25 * 1024 * 1024
    assert vb.image_size == 128 and vb.classes == ("no_tumor", "tumor")
    r = Defender.default(threads=1).run(_image(), seed=0)
    assert r.status == "ok" and r.bundle_id == vb.bundle_id


def test_overlap_gives_the_same_results(bundle_path: Path, split) -> None:
    """Speculative classification alongside the detector changes nothing in the Results."""
    x, flagged, _ = split
    on = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1)
    off = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1, overlap=False)
    assert on.overlap and not off.overlap
    clean = x[~flagged][:4]
    for batch in (x, clean, clean[:1], x[flagged][:1]):  # mixed, unflagged, one unflagged, one flagged
        a = on.run_array(batch, seeds=list(range(len(batch))))
        b = off.run_array(batch, seeds=list(range(len(batch))))
        for ra, rb in zip(a, b, strict=True):
            assert (ra.label, ra.probabilities, ra.flagged, ra.score, ra.t_star, ra.status) == \
                   (rb.label, rb.probabilities, rb.flagged, rb.score, rb.t_star, rb.status)


def test_overlap_uses_the_speculative_answer_only_without_purification(bundle_path: Path, split,
                                                                       monkeypatch) -> None:
    x, flagged, _ = split
    d = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1)
    seen: list[int] = []
    orig = d.engine.classify
    monkeypatch.setattr(d.engine, "classify", lambda xb: (seen.append(len(xb)), orig(xb))[1])
    d.run_array(x[~flagged][:3], seeds=[0] * 3)
    assert seen == [3]  # one (speculative) run, used
    seen.clear()
    mixed = np.concatenate([x[~flagged][:2], x[flagged][:1]])
    rs = d.run_array(mixed, seeds=[0] * 3)
    assert rs[2].t_star > 0 and sorted(seen) == [3, 3]  # the speculative run is discarded, purified batch reclassified


def test_overlap_needs_an_engine_that_allows_it(bundle_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot run two stages at once"):
        Defender.load(bundle_path, backend="torch", device="cpu", overlap=True)
    with pytest.raises(TypeError, match="overlap"):
        Defender.load(bundle_path, backend="onnxruntime", device="cpu", overlap="yes")
    assert not Defender.load(bundle_path, backend="torch", device="cpu").overlap


def test_close_stops_the_overlap_thread_and_is_idempotent(bundle_path: Path, split) -> None:
    import threading

    x = split[0][:2]
    with Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1) as d:
        a = d.run_array(x, seeds=[3, 4])
        assert any(t.name.startswith("medfedpure-worker") for t in threading.enumerate())
    assert d._pool is None
    d.close()  # twice is fine
    b = d.run_array(x, seeds=[3, 4])  # usable again after close
    assert [r.probabilities for r in a] == [r.probabilities for r in b]
    d.close()


def test_policy_override(bundle_path: Path, split) -> None:
    """policy="floor" purifies every scan (t* ≥ t_min); "adaptive" lets unflagged scans through untouched."""
    x, flagged, _ = split
    base = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1)
    assert base.policy == base.bundle.spec.gate.policy == "adaptive"
    t_min = base.bundle.spec.gate.t_min
    floor = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1, policy="floor")
    assert floor.policy == "floor"
    seeds = list(range(len(x)))
    rf = floor.run_array(x, seeds=seeds, return_purified=True)
    ra = base.run_array(x, seeds=seeds, return_purified=True)
    assert [r.flagged for r in rf] == [r.flagged for r in ra] == list(flagged)  # the flag itself is unchanged
    for a, f, xi in zip(ra, rf, x, strict=True):
        assert a.ok and f.ok
        if a.flagged:
            assert f.t_star == a.t_star >= t_min
            np.testing.assert_array_equal(f.purified, a.purified)  # same key, same strength
        else:
            assert a.t_star == 0 and f.t_star == t_min
            np.testing.assert_array_equal(a.purified, xi)
            assert np.abs(f.purified - xi).max() > 1e-3  # purified at t_min
    back = Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1, policy="adaptive")
    assert [r.t_star for r in back.run_array(x, seeds=seeds)] == [r.t_star for r in ra]
    # the policy travels with each gate call: an engine shared by two Defenders is not changed
    shared = Defender(base.bundle, base.engine, policy="floor")
    assert base.engine.gate_spec.policy == "adaptive" and base.policy == "adaptive" and shared.policy == "floor"
    assert [r.t_star for r in shared.run_array(x, seeds=seeds)] == [r.t_star for r in rf]
    assert [r.t_star for r in base.run_array(x, seeds=seeds)] == [r.t_star for r in ra]


def test_policy_refused_before_any_backend_is_built(bundle_path: Path, monkeypatch) -> None:
    import medfedpure.runtime.defender as dmod

    monkeypatch.setattr(dmod, "create_engine", lambda *a, **k: pytest.fail("backend built"))
    for bad in ("Floor", "none", 1):
        with pytest.raises(ValueError, match="policy="):
            Defender.load(bundle_path, policy=bad)


def test_cli_run_policy_floor(bundle_path: Path, tmp_path: Path) -> None:
    from medfedpure.cli import app
    from typer.testing import CliRunner

    png = tmp_path / "scan.png"
    Image.fromarray(_image()).save(png)
    runner = CliRunner()
    args = ["run", str(png), "--bundle", str(bundle_path), "--json", "--seed", "5", "--threads", "1"]
    row = json.loads(runner.invoke(app, [*args, "--policy", "floor"]).output.strip().splitlines()[-1])
    assert row["status"] == "ok" and row["t_star"] >= 40
    res = runner.invoke(app, [*args, "--policy", "sometimes"])
    assert res.exit_code == 2 and "'sometimes' is not one of 'adaptive', 'floor'" in res.output
