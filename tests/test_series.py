"""Inputs beyond one file: folders, globs, frame ranges, streamed --out records, DICOM series."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from medfedpure.cli import app
from medfedpure.cli.runtime import CSV_COLUMNS
from medfedpure.runtime.defender import Defender, Result
from medfedpure.runtime.series import (
    SeriesError,
    aggregate,
    expand_inputs,
    parse_frame_range,
)
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from tiny_bundle import cached_tiny_bundle, tiny_scans
from typer.testing import CliRunner

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="module")
def bundle_path() -> Path:
    return cached_tiny_bundle()


@pytest.fixture(scope="module")
def d(bundle_path: Path) -> Defender:
    return Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1)


def _mr() -> str:
    p = get_testdata_file("MR_small.dcm")
    if p is None:
        pytest.skip("pydicom test file MR_small.dcm is not installed")
    return str(p)


def _png(path: Path, seed: int) -> None:
    x = tiny_scans(1, seed, size=48)[0, 0]
    Image.fromarray((x * 255).astype(np.uint8)).save(path)


def _write_series(folder: Path, zs: list[float], *, uid: str | None = None, prefix: str = "s") -> tuple[str, list[Path]]:
    """Copies of MR_small with one new SeriesInstanceUID, at positions ``zs`` along the normal of an axial
    orientation; InstanceNumber runs opposite to position so that ordering by it would be wrong."""
    uid = uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, z in enumerate(zs):
        ds = pydicom.dcmread(_mr())
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.InstanceNumber = 100 - int(z)
        ds.PixelData = (ds.pixel_array.astype(np.int32) * (k + 1) // 2).clip(0, 4000).astype(
            ds.pixel_array.dtype).tobytes()
        p = folder / f"{prefix}{k}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return uid, paths


def _invoke(args: list[str]):
    return CliRunner().invoke(app, ["run", *args, "--threads", "1", "--seed", "3"])


# ------------------------------------------------------------------------------------------------
# CLI: folders, globs, frames, --out
# ------------------------------------------------------------------------------------------------
def test_folder_two_pngs_and_a_bad_file(bundle_path: Path, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    _png(folder / "a.png", 1)
    _png(folder / "sub" / "b.png", 2)
    (folder / "notes.txt").write_text("not a scan")
    out = tmp_path / "r.jsonl"
    monkeypatch.chdir(tmp_path)  # a relative folder: records keep it relative
    res = _invoke(["in", "--bundle", str(bundle_path), "--out", str(out)])
    assert res.exit_code == 2, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in recs] == [os.path.join("in", "a.png"), os.path.join("in", "notes.txt"),
                                           os.path.join("in", "sub", "b.png")]
    assert [r["status"] for r in recs] == ["ok", "refused", "ok"]
    assert recs[1]["error"] == "ScanNotImageError" and recs[1]["label"] is None
    assert all(not os.path.isabs(r["source"]) for r in recs)
    assert "refused: " + os.path.join("in", "notes.txt") in res.output


def test_glob_expanded_by_the_cli(bundle_path: Path, tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / f"g{i}.png", i)
    (tmp_path / "other.jpg").write_bytes(b"x")
    res = _invoke([str(tmp_path / "g*.png"), "--bundle", str(bundle_path), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["scan"] for r in rows] == [str(tmp_path / f"g{i}.png") for i in range(3)]
    assert all(r["status"] == "ok" and r["seed"] == 3 for r in rows)
    assert "\r" not in res.output  # the progress bar writes plain lines off a terminal
    assert "run: 3/3 scan" in res.output
    # a glob that matches nothing is reported, not dropped
    res = _invoke([str(tmp_path / "zz*.png"), "--bundle", str(bundle_path), "--json"])
    assert res.exit_code == 2 and "ScanNotFoundError" in res.stdout


def test_frame_range_on_a_multiframe_file(bundle_path: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(_mr())
    raw = ds.pixel_array
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack([raw, raw // 2, raw // 3]).astype(raw.dtype).tobytes()
    mf = tmp_path / "mf.dcm"
    ds.save_as(mf, enforce_file_format=True)
    out = tmp_path / "r.csv"
    res = _invoke([str(mf), "--frame", "0:2", "--bundle", str(bundle_path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["source"] for r in rows] == [f"{mf}#frame=0", f"{mf}#frame=1"]
    assert all(r["status"] == "ok" and r["label"] in ("tumor", "no_tumor") for r in rows)
    assert all(0.0 <= float(r["p(tumor)"]) <= 1.0 and r["seed"] == "3" for r in rows)
    # without --frame the multi-frame file is refused; a frame out of range is refused per frame
    assert _invoke([str(mf), "--bundle", str(bundle_path)]).exit_code == 2
    res = _invoke([str(mf), "--frame", "2:4", "--bundle", str(bundle_path), "--json"])
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert res.exit_code == 2 and [r["status"] for r in rows] == ["ok", "refused"]
    assert rows[1]["error"] == "ScanFrameIndexError" and rows[1]["frame"] == 3
    for bad in ("2:1", "x", "1:2:3", "-1"):
        assert _invoke([str(mf), "--frame", bad, "--bundle", str(bundle_path)]).exit_code == 2


def test_jsonl_and_csv_round_trip_agree(bundle_path: Path, tmp_path: Path) -> None:
    for i in range(2):
        _png(tmp_path / f"p{i}.png", 10 + i)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    srcs = [str(tmp_path / n) for n in ("p0.png", "bad.png", "p1.png")]
    jl, cs = tmp_path / "o.jsonl", tmp_path / "o.csv"
    assert _invoke([*srcs, "--bundle", str(bundle_path), "--out", str(jl)]).exit_code == 2
    assert _invoke([*srcs, "--bundle", str(bundle_path), "--out", str(cs)]).exit_code == 2
    js = [json.loads(line) for line in jl.read_text().splitlines()]
    with cs.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(js) == len(rows) == 3
    assert [r["source"] for r in rows] == [j["source"] for j in js] == srcs
    assert [r["status"] for r in rows] == [j["status"] for j in js] == ["ok", "refused", "ok"]
    for j, r in zip(js, rows, strict=True):
        assert r["seed"] == str(j["seed"]) == "3"
        if j["status"] == "ok":  # the same seed: the same decision in both formats
            assert r["label"] == j["label"] and float(r["p(tumor)"]) == j["probabilities"]["tumor"]
            assert float(r["score"]) == j["score"] and int(r["t_star"]) == j["t_star"]
            assert r["flagged"] == str(j["flagged"]).lower() and r["reason"] == ""
        else:
            assert r["label"] == r["p(tumor)"] == "" and r["reason"] == j["reason"]
    assert _invoke([srcs[0], "--bundle", str(bundle_path), "--out", str(tmp_path / "o.txt")]).exit_code == 2


def test_out_is_flushed_after_every_record(bundle_path: Path, tmp_path: Path, monkeypatch) -> None:
    """A run stopped after the first record keeps that record on disk."""
    for i in range(3):
        _png(tmp_path / f"p{i}.png", i)
    out = tmp_path / "o.jsonl"
    calls = {"n": 0}
    real = Defender.run_batch

    def stop_on_second(self, scans, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            assert len(out.read_text().splitlines()) == 1  # on disk before the next input starts
            raise KeyboardInterrupt
        return real(self, scans, **kw)

    monkeypatch.setattr(Defender, "run_batch", stop_on_second)
    res = _invoke([str(tmp_path / "p*.png"), "--bundle", str(bundle_path), "--out", str(out)])
    assert res.exit_code != 0 and calls["n"] == 2
    assert [json.loads(line)["source"] for line in out.read_text().splitlines()] == [str(tmp_path / "p0.png")]


# ------------------------------------------------------------------------------------------------
# Expansion helpers
# ------------------------------------------------------------------------------------------------
def test_expand_inputs_and_frame_ranges(tmp_path: Path) -> None:
    (tmp_path / "f" / "z").mkdir(parents=True)
    for n in ("f/b.png", "f/a.png", "f/z/c.png"):
        (tmp_path / n).write_bytes(b"")
    assert expand_inputs([str(tmp_path / "f")]) == [str(tmp_path / "f" / n) for n in ("a.png", "b.png", "z/c.png")]
    assert expand_inputs([str(tmp_path / "f" / "*.png")]) == [str(tmp_path / "f" / n) for n in ("a.png", "b.png")]
    assert expand_inputs([str(tmp_path / "f" / "**" / "c.png")]) == [str(tmp_path / "f" / "z" / "c.png")]
    assert expand_inputs(["missing.png"]) == ["missing.png"]
    assert list(parse_frame_range("0:2")) == [0, 1] and list(parse_frame_range("4")) == [4]
    for bad in ("2:2", "a:b", "", "-1:2"):
        with pytest.raises(ValueError, match="e.g. 0:2"):
            parse_frame_range(bad)


# ------------------------------------------------------------------------------------------------
# Series
# ------------------------------------------------------------------------------------------------
def test_three_slice_series_ordered_by_position_and_aggregated(d: Defender, tmp_path: Path) -> None:
    # written so that file names, InstanceNumber and position all disagree
    uid, paths = _write_series(tmp_path / "ser", [20.0, -5.0, 7.5])
    [sr] = d.run_series([str(tmp_path / "ser")], seeds=[1, 2, 3])
    assert sr.series_uid == uid
    assert sr.positions == [-5.0, 7.5, 20.0]
    assert sr.sources == [str(paths[1]), str(paths[2]), str(paths[0])]
    assert len(sr.slices) == 3 and all(r.status == "ok" for r in sr.slices)
    # seeds follow the files in input (expansion) order: s0 → 1, s1 → 2, s2 → 3
    assert [r.seed for r in sr.slices] == [2, 3, 1]
    # the same slices run one by one give the same per-slice Results
    for s, r in zip(sr.sources, sr.slices, strict=True):
        assert d.run(s, seed=r.seed).probabilities == r.probabilities
    p = [r.probabilities["tumor"] for r in sr.slices]
    assert sr.status == "ok" and sr.reason is None and sr.p_tumor == max(p)
    assert sr.label == ("tumor" if max(p) >= 0.5 else "no_tumor")
    assert json.loads(json.dumps(sr.to_dict()))["slices"][0]["position"] == -5.0


def test_instance_number_fallback(d: Defender, tmp_path: Path) -> None:
    _, paths = _write_series(tmp_path / "ser", [1.0, 2.0, 3.0])
    for p in paths:  # drop the positions: InstanceNumber (99, 98, 97) orders the slices
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p, enforce_file_format=True)
    [sr] = d.run_series([str(p) for p in paths], seeds=[0, 0, 0])
    assert sr.sources == [str(p) for p in reversed(paths)] and sr.positions == [None] * 3


def test_two_series_in_one_folder(d: Defender, tmp_path: Path) -> None:
    u1, p1 = _write_series(tmp_path / "mix", [3.0, 1.0], prefix="a")
    u2, p2 = _write_series(tmp_path / "mix", [0.0, 9.0, 4.0], prefix="b")
    srs = d.run_series([tmp_path / "mix"])
    assert [s.series_uid for s in srs] == [u1, u2]
    assert srs[0].positions == [1.0, 3.0] and srs[1].positions == [0.0, 4.0, 9.0]
    assert srs[0].sources == [str(p1[1]), str(p1[0])]
    assert [len(s.slices) for s in srs] == [2, 3]


def test_series_errors(d: Defender, tmp_path: Path) -> None:
    _write_series(tmp_path / "ser", [0.0, 1.0])
    _png(tmp_path / "ser" / "x.png", 0)
    with pytest.raises(SeriesError, match="x.png: not a readable DICOM file"):
        d.run_series([tmp_path / "ser"])
    with pytest.raises(ValueError, match="2 seeds for 3 files"):
        d.run_series([tmp_path / "ser"], seeds=[0, 1])


def _res(status: str, p: float | None) -> Result:
    return Result(label=None if p is None else ("tumor" if p >= 0.5 else "no_tumor"),
                  probabilities={} if p is None else {"no_tumor": 1 - p, "tumor": p}, flagged=False, score=0.1,
                  t_star=0, status=status, reason=None if status == "ok" else "mae: boom", seed=0,
                  latency_ms={}, backend="x", device="cpu", precision="fp32", bundle_id="b")


@pytest.mark.parametrize(("slices", "label", "p", "status"), [
    ([("ok", 0.1), ("ok", 0.2), ("ok", 0.3)], "no_tumor", 0.3, "ok"),
    ([("ok", 0.1), ("ok", 0.5), ("ok", 0.3)], "tumor", 0.5, "ok"),       # one positive slice is enough
    ([("ok", 0.9), ("unverified", None), ("ok", 0.3)], None, 0.9, "unverified"),
    ([("refused", None)], None, None, "unverified"),
])
def test_aggregation_rule(slices, label, p, status) -> None:
    srcs = [f"s{i}.dcm" for i in range(len(slices))]
    sr = aggregate("1.2", srcs, [float(i) for i in range(len(slices))], [_res(s, q) for s, q in slices])
    assert (sr.label, sr.p_tumor, sr.status) == (label, p, status)
    if status != "ok":
        bad = [s for s, (st, _) in zip(srcs, slices, strict=True) if st != "ok"]
        assert sr.reason == "failing slices: " + "; ".join(f"{b} ({slices[srcs.index(b)][0]}: mae: boom)"
                                                           for b in bad)


def test_cli_series_aggregates_the_slices_it_ran(d: Defender, bundle_path: Path, tmp_path: Path) -> None:
    u1, _ = _write_series(tmp_path / "mix", [3.0, 1.0], prefix="a")
    u2, _ = _write_series(tmp_path / "mix", [0.0, 9.0, 4.0], prefix="b")
    _png(tmp_path / "mix" / "x.png", 0)
    res = _invoke([str(tmp_path / "mix"), "--bundle", str(bundle_path), "--json", "--series"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    slices = {ln["scan"]: ln for ln in lines if "kind" not in ln}
    series = [ln for ln in lines if ln.get("kind") == "series"]
    assert len(slices) == 6  # 5 DICOM slices and the PNG, each run once
    assert [s["series_uid"] for s in series] == [u1, u2]
    assert [len(s["slices"]) for s in series] == [2, 3]
    assert [sl["position"] for sl in series[1]["slices"]] == [0.0, 4.0, 9.0]
    for s in series:  # the aggregate is the stated rule over the slices printed above
        p = [slices[sl["source"]]["probabilities"]["tumor"] for sl in s["slices"]]
        assert s["p_tumor"] == max(p) and s["status"] == "ok"
        assert s["label"] == ("tumor" if max(p) >= 0.5 else "no_tumor")
    assert "not in a series: " + str(tmp_path / "mix" / "x.png") in res.stderr
    bad = _invoke([str(tmp_path / "mix"), "--bundle", str(bundle_path), "--series", "--frame", "0"])
    assert bad.exit_code == 2 and "--series" in bad.output
