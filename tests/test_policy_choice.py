"""``medfedpure bundle choose-policy``: the rule that picks adaptive or floor from two eval reports, its refusals,
and the bundle it writes (gate policy, provenance record with the evidence, model card, signature)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
from medfedpure.cli import app
from medfedpure.eval.policy import PolicyChoiceError, PolicyReport, choose_policy
from medfedpure.runtime.bundle import verify_bundle
from signing_keys import test_key_files as key_files
from typer.testing import CliRunner

BUNDLE = "ab" * 32


def _report(policy: str, clean: float, worst: dict[str, float], *, n: int = 720, full: bool = True,
            bundle_id: str = BUNDLE, fingerprint: str | None = "f" * 64, passed: bool = True) -> dict:
    """The fields of a ``medfedpure eval`` report.json that the rule reads."""
    return {
        "schema": 1, "policy": policy, "bundle": {"id": bundle_id, "short_id": bundle_id[:16]},
        "budget": {"name": "full" if full else "quick", "full": full, "limit": 0},
        "norm": "linf", "eps_labels": list(worst), "eps": [int(k.split("/")[0]) / 255 for k in worst],
        "sites": [0, 1, 2, 3],
        "data": {"split": "test", "kind": "synthetic", "fingerprint": fingerprint},
        "pooled": {"n": n, "clean": {"defended_acc": clean},
                   "worst_rung": {k: {"robust_acc": v, "rung": 5} for k, v in worst.items()}},
        "latency_ms": {"total": 7.0 if policy == "adaptive" else 30.0}, "sanity": {"passed": passed},
    }


def _pair(adaptive: dict, floor: dict) -> list[PolicyReport]:
    return [PolicyReport(f"{r['policy']}.json", hashlib.sha256(json.dumps(r).encode()).hexdigest(), r)
            for r in (adaptive, floor)]


def test_floor_is_chosen_only_beyond_the_margin_and_without_losses():
    a = _report("adaptive", 0.95, {"2/255": 0.90, "8/255": 0.60})
    # +10 points at 8/255 over 720 scans: margin = max(2, 2·SE) = 5.0 points
    got = choose_policy(_pair(a, _report("floor", 0.95, {"2/255": 0.90, "8/255": 0.70})))
    assert got.policy == "floor" and got.rule["gain_points"] == 10.0
    assert got.rule["margin_points"] == pytest.approx(2 * 100 * ((0.6 * 0.4 + 0.7 * 0.3) / 720) ** 0.5, abs=0.01)
    assert "floor 70.0 % vs adaptive 60.0 %" in got.reason and got.budget == "full"
    assert [e["policy"] for e in got.evidence] == ["adaptive", "floor"]
    # +3 points: above min_gain 2 but inside twice the standard error (5.0): adaptive
    got = choose_policy(_pair(a, _report("floor", 0.95, {"2/255": 0.90, "8/255": 0.63})))
    assert got.policy == "adaptive" and "does not buy robustness beyond the margin" in got.reason
    # the gain is there but floor loses 8 points of clean accuracy: adaptive, and the reason names the loss
    got = choose_policy(_pair(a, _report("floor", 0.87, {"2/255": 0.90, "8/255": 0.70})))
    assert got.policy == "adaptive" and got.rule["largest_loss_at"] == "clean" and "offset" in got.reason
    # the largest radius decides, whatever order the radii were given in
    a_rev = _report("adaptive", 0.95, {"8/255": 0.60, "2/255": 0.90})
    got = choose_policy(_pair(a_rev, _report("floor", 0.95, {"8/255": 0.70, "2/255": 0.90})))
    assert got.policy == "floor" and got.rule["radius"] == "8/255"
    # min_gain raises the bar above the standard error
    got = choose_policy(_pair(a, _report("floor", 0.95, {"2/255": 0.90, "8/255": 0.70})), min_gain=12)
    assert got.policy == "adaptive" and got.rule["margin_points"] == 12


def test_per_scan_results_give_the_paired_margin():
    """The same 8-point gain on 100 scans: 8 scans flipped from wrong to right and nothing else is far beyond the
    paired error (margin 5.45 points) but inside the unpaired one (13.5), so the per-scan arrays decide it."""
    right_a = [1.0] * 60 + [0.0] * 40
    right_f = [1.0] * 68 + [0.0] * 32
    a = _report("adaptive", 0.95, {"8/255": 0.60}, n=100)
    f = _report("floor", 0.95, {"8/255": 0.68}, n=100)
    unpaired = choose_policy(_pair(a, f))
    assert unpaired.policy == "adaptive" and unpaired.rule["paired"] is False
    assert unpaired.rule["margin_points"] == pytest.approx(2 * 100 * ((0.6 * 0.4 + 0.68 * 0.32) / 100) ** 0.5, abs=0.01)
    a["pooled"]["worst_rung"]["8/255"]["right_by_scan"] = right_a
    f["pooled"]["worst_rung"]["8/255"]["right_by_scan"] = right_f
    paired = choose_policy(_pair(a, f))
    assert paired.policy == "floor" and paired.rule["paired"] is True and "paired error" in paired.reason
    assert paired.rule["margin_points"] == pytest.approx(2 * 100 * (0.08 * 0.92 * 100 / 99) ** 0.5 / 10, abs=0.01)
    assert all("right_by_scan" not in e for e in paired.evidence)  # the record keeps the numbers, not the arrays
    # without a common data fingerprint the scans cannot be matched: unpaired
    a["data"]["fingerprint"] = None
    assert choose_policy(_pair(a, f)).rule["paired"] is False


@pytest.mark.parametrize("change,match", [
    (lambda a, f: f.update(policy="adaptive"), "two reports for policy adaptive"),
    (lambda a, f: f.update(eps_labels=["2/255"], eps=[2 / 255]), "differ in eps"),
    (lambda a, f: f.update(eps=[2 / 255]), "1 radii"),
    (lambda a, f: f["budget"].update(limit=6), "differ in scan_limit"),
    (lambda a, f: f.update(sites=[2]), "differ in sites"),
    (lambda a, f: f["bundle"].update(id="cd" * 32), "differ in bundle_id"),
    (lambda a, f: f["data"].update(fingerprint="e" * 64), "different data sets"),
    (lambda a, f: f["sanity"].update(passed=False), "sanity checks failed"),
    (lambda a, f: f.pop("pooled"), "not a medfedpure eval report"),
    (lambda a, f: f.update(policy="always"), "expected one of adaptive, floor"),
])
def test_reports_that_cannot_decide_are_refused(change, match):
    a = _report("adaptive", 0.95, {"2/255": 0.90, "8/255": 0.60})
    f = _report("floor", 0.95, {"2/255": 0.90, "8/255": 0.70})
    change(a, f)
    with pytest.raises(PolicyChoiceError, match=match):
        choose_policy(_pair(a, f))


def test_a_quick_budget_decides_only_when_allowed_and_says_so():
    a = _report("adaptive", 0.95, {"8/255": 0.60}, full=False)
    f = _report("floor", 0.95, {"8/255": 0.70}, full=False)
    with pytest.raises(PolicyChoiceError, match="upper bound on robustness"):
        choose_policy(_pair(a, f))
    got = choose_policy(_pair(a, f), allow_quick=True)
    assert got.policy == "floor" and got.budget == "quick, provisional" and "quick, provisional budget" in got.reason
    with pytest.raises(PolicyChoiceError, match="no report for policy floor"):
        choose_policy(_pair(a, f)[:1], allow_quick=True)
    with pytest.raises(PolicyChoiceError, match="not of"):
        choose_policy(_pair(a, f), allow_quick=True, bundle_id="cd" * 32)
    with pytest.raises(PolicyChoiceError, match="min_gain"):
        choose_policy(_pair(a, f), min_gain=-1)
    # a fingerprint recorded by one report only does not block the comparison (reports made before it was recorded)
    a2 = copy.deepcopy(a)
    a2["data"]["fingerprint"] = None
    assert choose_policy(_pair(a2, f), allow_quick=True).policy == "floor"


def test_cli_writes_a_signed_bundle_with_the_policy_and_its_reason(tmp_path: Path):
    from medfedpure import Defender
    from tiny_bundle import cached_tiny_bundle, tiny_scans

    src = cached_tiny_bundle()
    sid = verify_bundle(src).bundle_id
    assert verify_bundle(src).spec.gate.policy == "adaptive"
    paths = []
    for rep in (_report("adaptive", 0.95, {"2/255": 0.90, "8/255": 0.60}, bundle_id=sid),
                _report("floor", 0.95, {"2/255": 0.91, "8/255": 0.70}, bundle_id=sid)):
        paths.append(tmp_path / f"{rep['policy']}.json")
        paths[-1].write_text(json.dumps(rep))
    priv, pub = key_files()
    out = tmp_path / "floor_bundle"
    args = ["bundle", "choose-policy", str(src), "--report", str(paths[0]), "--report", str(paths[1]),
            "--out", str(out), "--key", str(priv)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "policy floor (was adaptive)" in r.output and "worst rung 8/255" in r.output
    vb = verify_bundle(out, trusted_keys=[pub])
    assert vb.signer is not None and vb.spec.gate.policy == "floor"
    assert vb.spec.gate.tau == verify_bundle(src).spec.gate.tau  # only the policy changed
    rec = vb.spec.provenance["policy_choice"]
    assert rec["policy"] == "floor" and rec["previous_policy"] == "adaptive" and rec["source_bundle_id"] == sid
    assert [e["sha256"] for e in rec["evidence"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert "policy chosen by `medfedpure bundle choose-policy`" in (out / "MODEL_CARD.md").read_text()
    # the Defender now purifies every scan, flagged or not
    x = tiny_scans(4, 3)
    new = Defender.load(out, backend="torch", device="cpu").run_array(x, seeds=[1, 2, 3, 4])
    old = Defender.load(src, backend="torch", device="cpu").run_array(x, seeds=[1, 2, 3, 4])
    assert all(r.t_star >= vb.spec.gate.t_min > 0 for r in new)
    assert any(r.t_star == 0 for r in old)  # the adaptive source let unflagged scans take the early exit
    # the Defender says why its bundle runs that policy; a bundle without the record says None
    d = Defender.load(out, backend="torch", device="cpu")
    assert d.policy == "floor" and d.policy_choice["reason"] == rec["reason"] and d.policy_choice["source_bundle_id"] == sid
    assert Defender.load(src, backend="torch", device="cpu").policy_choice is None
    # refusals exit 2 with the reason: reports of another bundle, an existing --out
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(_report("floor", 0.95, {"2/255": 0.91, "8/255": 0.70})))
    r = CliRunner().invoke(app, ["bundle", "choose-policy", str(src), "--report", str(paths[0]), "--report", str(bad),
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "bundle_id" in r.output and not (tmp_path / "x").exists()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "exists" in r.output
    # an error naming a path with brackets prints the path as it is (escaped, not read as rich markup)
    odd = tmp_path / "[site a]" / "report.json"
    odd.parent.mkdir()
    odd.write_text("not json")
    r = CliRunner().invoke(app, ["bundle", "choose-policy", str(src), "--report", str(odd), "--report", str(odd),
                                 "--out", str(tmp_path / "y")], terminal_width=400)
    assert r.exit_code == 2 and f"{odd}: not JSON" in r.output, r.output
