"""``medfedpure eval``: the quick budget on the tiny bundle and tiny synthetic data writes the documented
report (JSON keys, markdown with the sanity checks first, PNG figures) in well under a minute; a failed
sanity check is reported first and exits 1; bad options exit 2; the sanity checks' masking detector
catches a gradient-masked toy defence and not a sound one."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
import torch
from medfedpure.cli import app
from PIL import Image
from tiny_bundle import cached_tiny_bundle, tiny_eval_data
from typer.testing import CliRunner

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

ROW_KEYS = {"rung", "attack", "eps", "eps_label", "n", "runs", "undefended_acc", "defended_acc", "defended_acc_std",
            "defended_acc_worst_of_runs", "robust_acc", "flag_rate", "attack_s"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_eval_data(tmp_path_factory.mktemp("evaldata") / "d")


@pytest.fixture(scope="module")
def bundle():
    return cached_tiny_bundle()


def _run(args: list[str]) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["eval", *args])
    return r.exit_code, r.output + (f"\n{r.exception!r}" if r.exception and r.exit_code not in (0, 1, 2) else ""), \
        time.perf_counter() - t0


@pytest.fixture(scope="module")
def quick(data, bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalout") / "r"
    code, output, wall = _run(["--bundle", str(bundle), "--data", str(data), "--site", "0", "--attacks", "ladder",
                               "--eps", "4,8", "--budget", "quick", "--limit", "4", "--certify-sigmas", "0.25",
                               "--certify-n", "20", "--no-progress", "--out", str(out)])
    return code, output, wall, out


def test_quick_ladder_writes_the_documented_report(quick, data) -> None:
    code, output, wall, out = quick
    assert code == 0, output
    assert wall < 90, f"the quick budget on the tiny bundle took {wall:.0f} s"
    rep = json.loads((out / "report.json").read_text())
    assert {"schema", "bundle", "data", "sites", "norm", "eps", "eps_labels", "budget", "paper", "sanity", "per_site",
            "pooled", "latency_ms", "wall_s", "figures", "surrogate", "certified"} <= rep.keys()
    assert rep["budget"]["name"] == "quick" and rep["budget"]["full"] is False and rep["budget"]["limit"] == 4
    assert rep["budget"]["steps"] == 5 and rep["budget"]["eot"] == 2 and rep["budget"]["repeats"] == 2
    assert rep["paper"] == {"attack": "PGD against the classifier alone", "norm": "linf", "eps": 0.015, "steps": 7}
    assert rep["eps"] == pytest.approx([4 / 255, 8 / 255]) and rep["eps_labels"] == ["4/255", "8/255"]
    assert rep["data"]["kind"] == "synthetic" and len(rep["data"]["fingerprint"]) == 64  # what choose-policy compares
    pooled = rep["pooled"]
    assert pooled["n"] == 4 and set(pooled["clean"]) == {"undefended_acc", "defended_acc", "defended_acc_std",
                                                         "flag_rate", "defended_acc_by_class",
                                                         "defended_acc_by_lesion", "right_by_scan"}
    # the per-scan headline (what choose-policy pairs): its mean is the summary, clean and at every worst rung
    assert len(pooled["clean"]["right_by_scan"]) == 4
    assert sum(pooled["clean"]["right_by_scan"]) / 4 == pytest.approx(pooled["clean"]["defended_acc"])
    for w in pooled["worst_rung"].values():
        assert len(w["right_by_scan"]) == 4 and sum(w["right_by_scan"]) / 4 == pytest.approx(w["robust_acc"])
    rows = pooled["rows"]
    ran = [r for r in rows if r.get("skipped") is None]
    # within each true class: the class shares of the headline add up to it, and each class's worst rung is
    # its minimum over the rungs
    from medfedpure.data.loader import load_split

    y = load_split(data, 0, "test", size=32)[1][:4]
    n_c = {"no_tumor": int((y == 0).sum()), "tumor": int((y == 1).sum())}
    for r in ran + [dict(pooled["clean"], robust_acc=pooled["clean"]["defended_acc"],
                         robust_acc_by_class=pooled["clean"]["defended_acc_by_class"])]:
        by = r["robust_acc_by_class"]
        assert set(by) == {c for c, n in n_c.items() if n}
        assert sum(n_c[c] * a for c, a in by.items()) / 4 == pytest.approx(r["robust_acc"])
    for eps, per in pooled["worst_rung_by_class"].items():
        for cls, a in per.items():
            assert a == min(r["robust_acc_by_class"][cls] for r in ran if r["eps_label"] == eps)
    # within each lesion kind (synthetic data): the kinds' shares of the tumour class add up to it
    from medfedpure.data import lesion_kinds

    kinds = lesion_kinds(data, 0, "test")[:4]
    n_k = {k: kinds.count(k) for k in set(kinds) - {"none"}}
    assert n_k and pooled["lesion_counts"] == n_k
    for r in ran + [dict(pooled["clean"], robust_acc_by_lesion=pooled["clean"]["defended_acc_by_lesion"],
                         robust_acc_by_class=pooled["clean"]["defended_acc_by_class"])]:
        by = r["robust_acc_by_lesion"]
        assert set(by) == set(n_k)
        assert sum(n_k[k] * a for k, a in by.items()) / sum(n_k.values()) == pytest.approx(
            r["robust_acc_by_class"]["tumor"])
    for eps, per in pooled["worst_rung_by_lesion"].items():
        for kind, a in per.items():
            assert a == min(r["robust_acc_by_lesion"][kind] for r in ran if r["eps_label"] == eps)
    assert "by lesion kind" in (out / "report.md").read_text() and "tumours by lesion kind" in output
    for r in ran:
        assert ROW_KEYS <= r.keys(), r
        assert 0 <= r["robust_acc"] <= 1 and r["n"] == 4 and r["runs"] == 2
    assert {r["rung"] for r in ran} == {1, 2, 3, 4, 5, 6}
    for r in ran:  # every single attack (not a combination) has the detector metrics
        if "of" not in r:
            assert {"auroc", "tpr@1%", "tpr@5%"} <= r.keys() and 0 <= r["auroc"] <= 1
    paper = [r for r in rows if r.get("paper_point")]
    assert len(paper) == 1 and paper[0]["eps"] == 0.015
    dlr = [r for r in rows if "DLR" in r["attack"]]
    assert dlr and all("third-largest" in r["skipped"] for r in dlr)
    # combinations are per-scan worst cases: never above any of their parts
    for eps in ("4/255", "8/255"):
        at = {r["attack"]: r for r in ran if r["eps_label"] == eps}
        five = next(r for r in at.values() if r["rung"] == 5)
        assert all(five["robust_acc"] <= r["defended_acc"] + 1e-9 for r in at.values() if r["rung"] in (2, 3, 4))
        assert pooled["worst_rung"][eps]["robust_acc"] == min(r["robust_acc"] for r in at.values())
        # a flag read as "send to a reader": never below the plain headline, and its worst is the rows' minimum
        assert all(r["right_or_flagged"] >= r["robust_acc"] - 1e-9 for r in at.values()), at
        assert pooled["worst_rung_right_or_flagged"][eps]["right_or_flagged"] == min(
            r["right_or_flagged"] for r in at.values())
    assert rep["per_site"]["0"]["rows"] == rows  # one site: pooled = that site
    assert rep["surrogate"]["0"]["trained_here"] is True and rep["surrogate"]["0"]["train_s"] > 0
    assert (out / "surrogate_site0.safetensors").is_file()
    cert = rep["certified"]["0"]["per_sigma"]["0.25"]
    assert cert["radii"][0] == 0 and len(cert["radii"]) == len(cert["certified_acc"])
    assert all(0 <= a <= 1 for a in cert["certified_acc"])
    assert cert["certified_acc"] == sorted(cert["certified_acc"], reverse=True)  # non-increasing in the radius
    # within each lesion kind: recomputed from the per-scan certificates (right label, radius at least r)
    assert cert["lesion_counts"] == n_k
    for kind, accs in cert["certified_acc_by_lesion"].items():
        mine = [c for c, k in zip(cert["scans"], kinds, strict=True) if k == kind]
        for r, a in zip(cert["radii"], accs, strict=True):
            assert a == pytest.approx(sum(c["label"] == c["true"] and c["radius"] >= r for c in mine) / len(mine))
    assert "tumour: conspicuous" in (out / "report.md").read_text()
    # sanity checks: every documented one, passed, and the report says so first
    names = [c["name"] for c in rep["sanity"]["checks"]]
    assert names == ["unbounded", "more_steps", "transfer_le_whitebox", "masking_detector", "reference_agreement"]
    assert rep["sanity"]["passed"] is True, rep["sanity"]
    md = (out / "report.md").read_text()
    assert md.splitlines()[2] == "**Sanity checks: all passed.**"
    assert "| 5 |" in md and "Worst rung per ε" in md and "Certified accuracy" in md
    assert "Within each true class (through the defence): clean no_tumor" in md
    assert "within each class: clean no_tumor" in " ".join(output.split())  # the terminal summary says it too
    assert "right or flagged" in md and "Worst rung per ε, a flag read as" in md
    flat = " ".join(output.split())
    assert "a flag read as 'send to a reader' (right or flagged), worst rung: 4/255" in flat
    for f in rep["figures"]:
        with Image.open(out / f) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert set(rep["figures"]) == {"robust_accuracy.png", "examples_site0.png", "certified_site0.png"}


def test_site_all_reports_each_site_and_pooled(data, bundle, tmp_path) -> None:
    code, output, _ = _run(["--bundle", str(bundle), "--data", str(data), "--site", "all", "--attacks", "1",
                            "--eps", "8", "--limit", "3", "--no-progress", "--out", str(tmp_path)])
    assert code == 0, output
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["sites"] == [0, 1] and set(rep["per_site"]) == {"0", "1"}
    assert rep["pooled"]["n"] == rep["per_site"]["0"]["n"] + rep["per_site"]["1"]["n"] == 6
    for i, row in enumerate(rep["pooled"]["rows"]):  # pooled accuracy = the scan-weighted mean of the sites'
        parts = [rep["per_site"][s]["rows"][i] for s in ("0", "1")]
        assert row["defended_acc"] == pytest.approx(sum(p["defended_acc"] * p["n"] for p in parts) / 6)
    assert "## Pooled over sites" in (tmp_path / "report.md").read_text()


def test_l2_norm_runs_the_pgd_rungs_and_records_the_skips(data, bundle, tmp_path) -> None:
    code, output, _ = _run(["--bundle", str(bundle), "--data", str(data), "--attacks", "1,2,3", "--norm", "l2",
                            "--eps", "0.5", "--limit", "3", "--steps", "2", "--no-progress", "--out", str(tmp_path)])
    assert code in (0, 1), output
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["norm"] == "l2" and rep["eps"] == [0.5] and rep["budget"]["name"] == "quick+custom"
    rows = {r["attack"]: r for r in rep["pooled"]["rows"]}
    assert any(r["rung"] == 2 and r.get("skipped") is None for r in rows.values())
    assert all("ℓ∞ only" in r["skipped"] for r in rows.values() if r["attack"].startswith("evasion"))


def test_a_failed_sanity_check_is_reported_first_and_exits_1(data, bundle, tmp_path, monkeypatch) -> None:
    import medfedpure.eval.sanity as sanity

    monkeypatch.setattr(sanity, "UNBOUNDED_MAX_ACC", -1.0)  # an impossible bound: the check must fail
    code, output, _ = _run(["--bundle", str(bundle), "--data", str(data), "--attacks", "1", "--eps", "8",
                            "--limit", "2", "--no-progress", "--out", str(tmp_path)])
    assert code == 1, output
    assert "SANITY CHECKS FAILED: unbounded" in output
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["sanity"]["passed"] is False
    assert [c["name"] for c in rep["sanity"]["checks"] if c["passed"] is False] == ["unbounded"]
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[2].startswith("**SANITY CHECKS FAILED") and "| unbounded | **FAIL** |" in lines[6]


@pytest.mark.parametrize("args,message", [
    (["--attacks", "7"], "--attacks"),
    (["--attacks", "fgsm"], "--attacks"),
    (["--eps", "0,2"], "--eps"),
    (["--site", "5"], "sites 0..1"),
    (["--site", "first"], "'all'"),
    (["--norm", "l1"], "l1"),
    (["--budget", "huge"], "huge"),
])
def test_bad_options_exit_2(data, bundle, tmp_path, args, message) -> None:
    code, output, _ = _run(["--bundle", str(bundle), "--data", str(data), "--no-progress", "--out", str(tmp_path),
                            *args])
    assert code == 2 and message in output, output
    assert not (tmp_path / "report.json").exists()


def test_missing_attacks_extra_is_one_line_and_exit_2(data, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    code, output, _ = _run(["--data", str(data), "--out", str(tmp_path)])
    assert code == 2 and "medfedpure[attacks]" in output and "torchattacks" in output


# the sanity checks' pieces ---------------------------------------------------------------------------

def test_masking_detector_catches_the_masked_toy_and_not_the_sound_one() -> None:
    from medfedpure.eval.sanity import QuantisedDefence, masking_check, masking_suspected
    from medfedpure.models.moe import MoEClassifier, MoEConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clf = MoEClassifier(MoEConfig.preset("tiny")).eval().requires_grad_(False)
    from tiny_bundle import tiny_scans

    x = torch.from_numpy(tiny_scans(8, 3))
    masked = masking_check(QuantisedDefence(clf, straight_through=False), clf, x)
    sound = masking_check(QuantisedDefence(clf, straight_through=True), clf, x)
    assert masked["caught"] and masked["white_box_acc"] == 1.0 and masked["black_box_acc"] <= 0.5, masked
    assert not sound["caught"], sound
    # the two toys compute the same function: only their gradients differ
    torch.testing.assert_close(QuantisedDefence(clf)(x), QuantisedDefence(clf, straight_through=True)(x))
    assert masking_suspected(0.9, 0.2) and not masking_suspected(0.3, 0.25) and not masking_suspected(0.2, 0.9)
    # on n scans a gap of one scan never counts (8 scans: 3/8 vs 2/8 is one scan), two scans do
    assert masking_suspected(3 / 8, 2 / 8) and not masking_suspected(3 / 8, 2 / 8, n=8)
    assert masking_suspected(4 / 8, 2 / 8, n=8) and masking_suspected(0.4, 0.25, n=180)
    with pytest.raises(ValueError, match="levels"):
        QuantisedDefence(clf, levels=1)


def test_budget_and_option_parsing() -> None:
    from medfedpure.eval.runner import Budget, EvalConfig, EvalError, parse_attacks, parse_eps

    full = Budget.preset("full")
    assert full.is_full and full.steps >= 100 and full.eot >= 10 and full.eot_apgd >= 20 and full.repeats >= 5
    assert full.limit == 0 and not Budget.preset("quick").is_full
    assert Budget.preset("full", steps=200).name == "full"  # still the full budget
    assert Budget.preset("full", steps=10).name == "full+custom" and not Budget.preset("full", steps=10).is_full
    with pytest.raises(ValueError, match="steps"):
        Budget(steps=0)
    with pytest.raises(ValueError, match="budget"):
        Budget.preset("huge")
    assert parse_attacks("paper") == (1,) and parse_attacks("ladder") == (1, 2, 3, 4, 5, 6)
    assert parse_attacks("6, 2") == (2, 6)
    with pytest.raises(EvalError, match="--attacks"):
        parse_attacks("2,9")
    eps, labels = parse_eps("1,2,4,8", "linf")
    np.testing.assert_allclose(eps, np.array([1, 2, 4, 8]) / 255) and labels == ("1/255", "2/255", "4/255", "8/255")
    assert parse_eps("0.25,0.5", "l2") == ((0.25, 0.5), ("0.25", "0.5"))
    with pytest.raises(EvalError, match="--eps"):
        parse_eps("a", "linf")
    with pytest.raises(ValueError, match="norm"):
        EvalConfig(data="d", eps=(0.1,), eps_labels=("x",), norm="l1")
    with pytest.raises(ValueError, match="rungs"):
        EvalConfig(data="d", eps=(0.1,), eps_labels=("x",), rungs=(0,))


def test_pool_concatenates_scans() -> None:
    from medfedpure.eval.runner import Row, pool

    a = Row(2, "a", 0.1, "x", undefended=np.array([True, False]), correct=np.array([[True, False], [True, True]]),
            flag=np.zeros((2, 2), bool), score=np.array([0.1, 0.2]))
    b = Row(2, "a", 0.1, "x", undefended=np.array([True]), correct=np.array([[False], [False]]),
            flag=np.ones((2, 1), bool), score=np.array([0.3]))
    (p,) = pool([[a], [b]])
    assert p.correct.shape == (2, 3) and p.to_dict(np.array([0.0, 0.05]))["defended_acc"] == pytest.approx(3 / 6)
    assert p.to_dict(None)["defended_acc_worst_of_runs"] == pytest.approx(1 / 3)
    assert p.to_dict(None)["right_or_flagged"] == pytest.approx(5 / 6)  # b's wrong scan is flagged in both runs


def test_right_or_flagged_of_a_per_scan_worst_case() -> None:
    """A combination keeps each part's own "right or flagged" per scan and run: evading the flag in one part
    and being flagged-but-wrong in another leaves the scan lost only where some part lost it."""
    from medfedpure.eval.runner import Row, _combine

    ev = Row(3, "evasion", 0.1, "x", correct=np.array([[False, True, False]]), flag=np.array([[False, False, True]]))
    fl = Row(3, "flagged", 0.1, "x", correct=np.array([[False, False, True]]), flag=np.array([[True, True, True]]))
    both = _combine(3, "worst", [ev, fl])
    d = both.to_dict(None)
    assert d["defended_acc"] == 0.0  # no scan right in both parts
    # scan 0: evaded unflagged and wrong (lost); scan 1: right, then flagged (kept); scan 2: flagged in both
    assert d["right_or_flagged"] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(both.kept_or_none(), [[False, True, True]])
    assert "right_or_flagged" not in Row(1, "no gate", 0.1, "x", correct=np.ones((1, 2), bool)).to_dict(None)
    five = _combine(5, "worst of runs", [Row(2, "p", 0.1, "x", correct=np.array([[True], [False]]),
                                             flag=np.array([[False], [False]]))], headline_worst_of_runs=True)
    assert five.to_dict(None)["right_or_flagged"] == 0.0  # rung 5: lost in one run is lost


def test_certification_report_shows_each_class_and_warns_of_a_constant_vote() -> None:
    from medfedpure.eval.report import _by_class_lines

    radii = [0.0, 0.25, 0.5, 1.0, 1.0039]
    cert = {"linf_2_255_radius": 1.0039, "per_sigma": {
        "0.5": {"radii": radii, "certified_acc_by_class": {"no_tumor": [1.0, 0.99, 0.99, 0.84, 0.83],
                                                          "tumor": [0.067, 0.033, 0.022, 0.011, 0.011]},
                "worst_class_certified_acc": [0.067, 0.033, 0.022, 0.011, 0.011]},
        "0.12": {"radii": [0.0, 0.25], "certified_acc_by_class": {"no_tumor": [1.0, 1.0], "tumor": [0.778, 0.678]},
                 "worst_class_certified_acc": [0.778, 0.678]}}}
    lines = _by_class_lines(cert)
    assert "| σ | class | r 0 | r 0.25 | r 0.5 | r 1 | r 1.0039 |" in lines
    assert "| 0.5 | tumor | 6.7 % | 3.3 % | 2.2 % | 1.1 % | 1.1 % |" in lines
    assert "| 0.5 | **worst class** | 6.7 % | 3.3 % | 2.2 % | 1.1 % | 1.1 % |" in lines
    assert "| 0.12 | tumor | 77.8 % | 67.8 % | – | – | – |" in lines  # radii σ 0.12 did not report
    warn = [ln for ln in lines if ln.startswith("- σ")]
    assert warn == ["- σ 0.5: the smoothed classifier certifies only 6.7 % of the tumor scans even at r 0 (chance "
                    "50.0 %): it votes mostly for another class, so its pooled certified accuracy says little."]
    assert _by_class_lines({"per_sigma": {"0.5": {"radii": [0.0], "certified_acc": [0.5]}}}) == []  # older reports
