"""``benchmarks/targets.py``: the robustness targets site by site from eval reports, and the release rule's
comparison against a baseline bundle's reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location("targets", Path(__file__).parents[1] / "benchmarks" / "targets.py")
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)


def _report(path: Path, *, site: str = "0", norm: str = "linf", worst: dict[str, float] | None = None,
            clean: float = 0.9, right: list[float] | None = None, rungs: tuple[int, ...] = (1, 2, 3, 4, 5, 6),
            budget: str = "quick", certified: dict[str, Any] | None = None, fingerprint: str = "fp") -> Path:
    worst = worst or {}
    block = {
        "n": 4,
        "clean": {"defended_acc": clean, "right_by_scan": [1.0, 1.0, 1.0, 0.5]},
        "rows": [{"rung": 1, "eps_label": "paper", "defended_acc": 0.85}],
        "worst_rung": {label: {"rung": 5, "attack": "w", "robust_acc": acc,
                               **({"right_by_scan": right} if right is not None else {})}
                       for label, acc in worst.items()},
    }
    rep = {"schema": 1, "bundle": {"short_id": "b" * 16}, "policy": "adaptive", "norm": norm, "rungs": list(rungs),
           "budget": {"name": budget}, "data": {"fingerprint": fingerprint, "split": "test"},
           "per_site": {site: block}, "certified": certified or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep))
    return path


def _cert(sigma: float, accs: dict[float, float]) -> dict[str, Any]:
    radii = sorted(accs)
    return {"n": 1000, "per_sigma": {str(sigma): {"radii": radii, "certified_acc": [accs[r] for r in radii]}}}


def test_site_figures_targets_and_best_sigma(tmp_path: Path) -> None:
    a = _report(tmp_path / "s0_linf.json", worst={"2/255": 0.93, "8/255": 0.65}, clean=0.96)
    b = _report(tmp_path / "s1_linf.json", site="1", worst={"2/255": 0.90, "8/255": 0.75}, clean=0.91)
    c = _report(tmp_path / "s0_l2.json", norm="l2", worst={"0.5": 0.86}, clean=0.5)  # clean: the first report's
    # certification runs climb rung 1 only: their worst rung does not count; each radius takes its best σ
    d1 = _report(tmp_path / "cert_a.json", worst={"8/255": 0.1}, rungs=(1,),
                 certified={"0": _cert(0.25, {0.25: 0.81, 0.5: 0.72, 1.0039: 0.0})})
    d2 = _report(tmp_path / "cert_b.json", worst={"8/255": 0.1}, rungs=(1,),
                 certified={"0": _cert(0.5, {0.25: 0.60, 0.5: 0.55, 1.0039: 0.52})})
    fig = targets.figures([a, b, c, d1, d2])
    res = targets.compare(fig, None)
    rows = {r["key"]: r for r in res["rows"]}
    assert res["sites"] == ["0", "1"]
    assert rows["linf 8/255"]["sites"]["0"] == {"value": 0.65, "met": False, "budget": "quick"}
    assert rows["linf 8/255"]["sites"]["1"]["met"] is True
    assert rows["linf 2/255"]["sites"]["0"]["met"] and not rows["linf 2/255"]["sites"]["1"]["met"]
    assert rows["l2 0.5"]["sites"] == {"0": {"value": 0.86, "met": True, "budget": "quick"}}
    assert rows["clean"]["sites"]["0"]["value"] == 0.96 and rows["paper"]["sites"]["1"]["value"] == 0.85
    assert (rows["cert 0.25"]["sites"]["0"]["value"], rows["cert 0.25"]["sites"]["0"]["sigma"]) == (0.81, 0.25)
    assert (rows["cert 1.0039"]["sites"]["0"]["value"], rows["cert 1.0039"]["sites"]["0"]["sigma"]) == (0.52, 0.5)
    assert "linf 4/255" not in rows  # nothing measured it
    md = targets.markdown(res)
    assert "| worst rung ℓ∞ 8/255 ≥ 70 % | 65.0* / 75.0* % | site 1; short: 0 by 5.0 |" in md
    assert "| certified ℓ2 r 1.0039 ≥ 50 % | 52.0 (σ 0.5) / – % | site 0 |" in md


def test_a_figure_measured_twice_is_refused(tmp_path: Path) -> None:
    a = _report(tmp_path / "a.json", worst={"8/255": 0.7})
    b = _report(tmp_path / "b.json", worst={"8/255": 0.6})
    with pytest.raises(targets.TargetsError, match="measured by both"):
        targets.figures([a, b])
    (tmp_path / "x.json").write_text(json.dumps({"schema": 2}))
    with pytest.raises(targets.TargetsError, match="not a `medfedpure eval` report"):
        targets.figures([tmp_path / "x.json"])
    assert targets.main(["--report", str(tmp_path / "nothing*.json")]) == 2


def test_change_against_a_baseline_is_paired_when_both_recorded_every_scan(tmp_path: Path, capsys) -> None:
    base = _report(tmp_path / "base.json", worst={"8/255": 0.75}, right=[1.0, 1.0, 1.0, 0.0])
    same_scans = _report(tmp_path / "cand.json", worst={"8/255": 0.5}, right=[1.0, 0.0, 1.0, 0.0])
    res = targets.compare(targets.figures([same_scans]), targets.figures([base]))
    cell = next(r for r in res["rows"] if r["key"] == "linf 8/255")["sites"]["0"]
    # per-scan differences 0, -1, 0, 0: mean -0.25, sd 0.5, twice the standard error 2 * 0.5 / 2 = 0.5
    assert cell["change"] == pytest.approx(-0.25) and cell["two_se"] == pytest.approx(0.5)
    assert not cell["regression"] and res["regressions"] == []
    # other scans (another data fingerprint): no pairing, any drop is a regression; the command exits 1
    other = _report(tmp_path / "other.json", worst={"8/255": 0.5}, right=[1.0, 0.0, 1.0, 0.0], fingerprint="fp2")
    res = targets.compare(targets.figures([other]), targets.figures([base]))
    cell = next(r for r in res["rows"] if r["key"] == "linf 8/255")["sites"]["0"]
    assert cell["two_se"] is None and cell["regression"] and ("linf 8/255", "0") in res["regressions"]
    out = tmp_path / "cmp.json"
    assert targets.main(["--report", str(other), "--baseline", str(base), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "50.0* (-25.0 ⚠)" in printed and "regressions: [('linf 8/255', '0')]" in printed
    assert json.loads(out.read_text())["regressions"] == [["linf 8/255", "0"]]


def test_figures_on_another_number_of_scans_are_not_compared(tmp_path: Path) -> None:
    base = _report(tmp_path / "base.json", worst={"8/255": 0.75})
    few = json.loads(_report(tmp_path / "few.json", worst={"8/255": 0.5}).read_text())
    few["per_site"]["0"]["n"] = 2
    (tmp_path / "few.json").write_text(json.dumps(few))
    res = targets.compare(targets.figures([tmp_path / "few.json"]), targets.figures([base]))
    cell = next(r for r in res["rows"] if r["key"] == "linf 8/255")["sites"]["0"]
    assert cell["baseline_n_differs"] == [2, 4] and "change" not in cell and res["regressions"] == []
    assert "(baseline on 4 scans, not 2)" in targets.markdown(res)


def test_figure_draws_one_panel_per_target_and_refuses_an_empty_comparison(tmp_path: Path) -> None:
    from PIL import Image

    a = _report(tmp_path / "c.json", worst={"2/255": 0.93, "8/255": 0.65}, clean=0.96, right=[1.0, 0.0, 1.0, 1.0])
    b = _report(tmp_path / "b.json", worst={"2/255": 0.90, "8/255": 0.75}, clean=0.91, right=[1.0, 1.0, 1.0, 1.0])
    res = targets.compare(targets.figures([a]), targets.figures([b]))
    assert [r["key"] for r in res["rows"]] == ["linf 8/255", "linf 2/255", "clean", "paper"]
    out = targets.figure(res, tmp_path / "fig" / "targets.png")
    with Image.open(out) as im:  # four panels: 3 columns × 2 rows of 4.2 × 3.0 in at 110 dpi
        assert im.format == "PNG" and im.size == (round(3 * 4.2 * 110), round(2 * 3.0 * 110))
    with pytest.raises(targets.TargetsError, match="nothing to plot"):
        targets.figure({"sites": [], "rows": []}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
