"""GateSpec: the manifest's gate section round-trips exactly, bad sections are refused by name, the
format-1 section converts without changing a decision, and the one decision rule agrees with the
C++ kernel on its edge cases (score exactly τ, exactly τ_high, the floor policy)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from medfedpure.gate import (
    GateCalibration,
    GateSpec,
    decide_torch,
    patch_gate,
    patch_gate_reference,
    patch_gate_torch,
    run_gate,
)

# The gate section of the default bundle as shipped in format 1 (copied verbatim).
LEGACY_DEFAULT_GATE = {
    "config": {"policy": "adaptive", "schedule_from": "options", "stat": "hfratio", "steps": 1, "t_max": 200,
               "t_min": 60, "target_ffr": 0.05, "tau_high_k": 2.0, "topk": 0},
    "norm_pix": False, "num_val_scans": 90, "patch": 8, "policy": "adaptive", "schedule_source": "options",
    "score_quantiles": {"0.05": 0.4983330965042114, "0.25": 0.5591791868209839, "0.5": 0.5972042083740234,
                        "0.75": 0.6855834126472473, "0.95": 0.7509050965309143},
    "stat": "hfratio", "steps": 1, "t_max": 200, "t_min": 60, "target_false_flag_rate": 0.05,
    "tau": 0.7535472512245178, "tau_high": 1.0662333965301514,
    "tau_high_rule": "tau + 2.0 * (tau - median of clean val scores)", "topk": 128,
    "val_false_flag_rate": 0.044444444444444446,
}
SECTION = {"stat": "mean", "patch": 8, "topk": 0, "norm_pix": False, "tau": 0.25, "tau_high": 0.75, "t_min": 40,
           "t_max": 200, "policy": "adaptive",
           "calibration": {"target_false_flag_rate": 0.05, "val_false_flag_rate": 0.04, "num_val_scans": 25,
                           "score_quantiles": {"0.5": 0.1, "0.95": 0.24}, "tau_high_rule": "tau + 2 * spread"}}


def _shipped_manifest() -> dict:
    import medfedpure

    return json.loads((Path(medfedpure.__file__).parent / "bundles" / "default" / "manifest.json").read_text())


def _visible(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    vis = rng.random((k, n)) < 0.5
    vis[0, vis.all(axis=0)] = False
    return vis


# manifest section ---------------------------------------------------------------------------------

def test_round_trip_is_exact() -> None:
    spec = GateSpec.from_dict(SECTION)
    assert spec.to_dict() == SECTION and json.loads(json.dumps(spec.to_dict())) == SECTION
    assert GateSpec.from_dict(spec.to_dict()) == spec and hash(GateSpec.from_dict(SECTION)) == hash(spec)
    assert isinstance(spec.calibration, GateCalibration) and spec.calibration.num_val_scans == 25
    assert spec.calibration.score_quantiles == (("0.5", 0.1), ("0.95", 0.24))
    bare = {k: v for k, v in SECTION.items() if k != "calibration"}  # a gate set by hand
    assert GateSpec.from_dict(bare).to_dict() == bare and GateSpec.from_dict(bare).calibration is None
    short = {**SECTION, "calibration": {"target_false_flag_rate": 0.1, "val_false_flag_rate": 0.0, "num_val_scans": 3}}
    assert GateSpec.from_dict(short).to_dict() == short
    # numpy scalars become JSON types
    s = GateSpec(stat="topk", patch=np.int64(8), topk=np.int32(3), norm_pix=np.bool_(True), tau=np.float32(0.5),
                 tau_high=np.float64(1.0), t_min=np.int64(0), t_max=10)
    assert json.loads(json.dumps(s.to_dict())) == s.to_dict() and type(s.tau) is float and type(s.patch) is int


@pytest.mark.parametrize("edit, message", [
    ({"config": {}}, r"unknown keys \['config'\]"),
    ({"steps": 1}, r"unknown keys \['steps'\]"),
    ({"stat": "max"}, "stat = 'max' is not implemented"),
    ({"stat": 1}, "stat = 1: expected a string"),
    ({"patch": "8"}, "patch = '8': expected an int"),
    ({"patch": 8.0}, "patch = 8.0: expected an int"),
    ({"patch": 0}, "patch = 0"),
    ({"topk": True}, "topk = True: expected an int"),
    ({"topk": -1}, "topk = -1"),
    ({"stat": "topk", "topk": 0}, "stat 'topk'"),
    ({"stat": "hfratio", "norm_pix": True}, "norm_pix = True with stat 'hfratio'"),
    ({"stat": "hfratio", "patch": 2}, "patch = 2 with stat 'hfratio'"),
    ({"norm_pix": 0}, "norm_pix = 0: expected true or false"),
    ({"tau": "x"}, "tau = 'x': expected a finite number"),
    ({"tau": float("nan")}, "tau = nan"),
    ({"tau_high": None}, "tau_high = None"),
    ({"tau_high": 0.25}, "tau_high = 0.25 must be > tau"),
    ({"tau_high": 0.1}, "tau_high = 0.1 must be > tau"),
    ({"tau": 1.0, "tau_high": 1.0 + 1e-12}, "after rounding both to float32"),
    ({"t_min": 50, "t_max": 40}, "t_min = 50, t_max = 40"),
    ({"t_min": -1}, "t_min = -1"),
    ({"t_max": 200.0}, "t_max = 200.0: expected an int"),
    ({"policy": "always"}, "policy = 'always' is not implemented"),
    ({"calibration": None}, "gate.calibration: expected an object"),
    ({"calibration": {**SECTION["calibration"], "seed": 1}}, r"gate.calibration: unknown keys \['seed'\]"),
    ({"calibration": {"target_false_flag_rate": 0.05}}, "missing keys"),
    ({"calibration": {**SECTION["calibration"], "target_false_flag_rate": 0}}, "target_false_flag_rate = 0"),
    ({"calibration": {**SECTION["calibration"], "val_false_flag_rate": 1.5}}, "val_false_flag_rate = 1.5"),
    ({"calibration": {**SECTION["calibration"], "num_val_scans": 0}}, "num_val_scans = 0"),
    ({"calibration": {**SECTION["calibration"], "score_quantiles": [0.5]}}, "score_quantiles"),
    ({"calibration": {**SECTION["calibration"], "score_quantiles": {"median": 0.5}}}, "key 'median'"),
    ({"calibration": {**SECTION["calibration"], "tau_high_rule": 2}}, "tau_high_rule = 2"),
])
def test_bad_sections_are_refused_by_name(edit: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GateSpec.from_dict({**SECTION, **edit})


def test_missing_keys_and_non_objects_refused() -> None:
    with pytest.raises(ValueError, match=r"missing keys \['tau'\]"):
        GateSpec.from_dict({k: v for k, v in SECTION.items() if k != "tau"})
    with pytest.raises(ValueError, match="expected an object"):
        GateSpec.from_dict(["mean"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="GateCalibration"):
        GateSpec(stat="mean", patch=8, topk=0, norm_pix=False, tau=0.1, tau_high=0.2, t_min=0, t_max=1,
                 calibration={"target_false_flag_rate": 0.1})  # type: ignore[arg-type]


def test_with_policy() -> None:
    spec = GateSpec.from_dict(SECTION)
    floor = spec.with_policy("floor")
    assert floor.policy == "floor" and spec.policy == "adaptive" and floor == dataclasses.replace(spec, policy="floor")
    with pytest.raises(ValueError, match="policy = 'sometimes'"):
        spec.with_policy("sometimes")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tau = 0.3  # type: ignore[misc]


# format 1 -----------------------------------------------------------------------------------------

def test_legacy_conversion_of_the_shipped_section() -> None:
    spec = GateSpec.from_legacy_dict(LEGACY_DEFAULT_GATE)
    assert (spec.stat, spec.patch, spec.topk, spec.norm_pix, spec.policy) == ("hfratio", 8, 128, False, "adaptive")
    assert (spec.tau, spec.tau_high, spec.t_min, spec.t_max) == (0.7535472512245178, 1.0662333965301514, 60, 200)
    cal = spec.calibration
    assert cal is not None and (cal.target_false_flag_rate, cal.num_val_scans) == (0.05, 90)
    assert dict(cal.score_quantiles or ()) == LEGACY_DEFAULT_GATE["score_quantiles"]
    assert cal.tau_high_rule == LEGACY_DEFAULT_GATE["tau_high_rule"]
    assert GateSpec.from_legacy_dict(spec.to_legacy_dict()) == spec


def test_the_shipped_gate_section_round_trips() -> None:
    """The default bundle's gate (format 2) parses, is calibrated, and writes back to the same section."""
    shipped = _shipped_manifest()["gate"]
    spec = GateSpec.from_dict(shipped)
    assert spec.to_dict() == shipped
    assert GateSpec.from_dict(spec.to_dict()) == spec
    assert spec.stat == "hfratio" and spec.policy == "adaptive" and 0 < spec.tau < spec.tau_high
    assert spec.calibration is not None and spec.calibration.num_val_scans > 0


def test_legacy_defaults_and_refusals() -> None:
    minimal = {"patch": 8, "tau": 0.1, "tau_high": 0.2, "t_min": 40, "t_max": 200, "steps": 2}
    spec = GateSpec.from_legacy_dict(minimal)  # as the format-1 runtime read it
    assert (spec.stat, spec.topk, spec.norm_pix, spec.policy, spec.calibration) == ("mean", 0, False, "adaptive", None)
    with pytest.raises(ValueError, match=r"unknown keys \['gate_version'\]"):
        GateSpec.from_legacy_dict({**minimal, "gate_version": 3})
    with pytest.raises(ValueError, match="calibration record incomplete"):
        GateSpec.from_legacy_dict({**minimal, "num_val_scans": 3})
    with pytest.raises(ValueError, match="without the calibration record"):
        GateSpec.from_legacy_dict({**minimal, "tau_high_rule": "x"})
    with pytest.raises(ValueError, match="stat = 'hfratio2'"):
        GateSpec.from_legacy_dict({**minimal, "stat": "hfratio2"})
    with pytest.raises(ValueError, match=r"unknown keys \['calibration'\]"):
        GateSpec.from_legacy_dict(SECTION)  # the new section is not a format-1 one


def test_legacy_conversion_gives_identical_decisions() -> None:
    """The format-1 runtime called patch_gate with the section's keys; the converted spec gives the same
    scores, flags and t* under both policies (hfratio with topk 128 = Np // 2 at S = 128, P = 8)."""
    legacy = LEGACY_DEFAULT_GATE
    spec = GateSpec.from_legacy_dict(legacy)
    rng = np.random.default_rng(11)
    b, k, s = 6, 4, 128
    x = rng.random((b, s, s), dtype=np.float32) * np.float32(0.05) + np.linspace(0.2, 0.8, s, dtype=np.float32)
    recon = (x[:, None] + 0.02 * rng.standard_normal((b, k, s, s), dtype=np.float32)).astype(np.float32)
    vis = _visible(rng, k, (s // 8) ** 2)
    score = patch_gate(x, recon, vis, patch=8, stat="hfratio", tau=0.0, tau_high=1.0, t_min=0, t_max=1).score
    # put the threshold among the scores: some flagged, some not, one exactly at τ
    legacy = {**legacy, "tau": float(np.sort(score)[2]), "tau_high": float(np.sort(score)[4])}
    spec = GateSpec.from_legacy_dict(legacy)
    for policy in ("adaptive", "floor"):
        old = patch_gate(x, recon, vis, patch=int(legacy["patch"]), stat=legacy.get("stat", "mean"),
                         topk=int(legacy.get("topk", 0)), norm_pix=bool(legacy.get("norm_pix", False)),
                         tau=float(legacy["tau"]), tau_high=float(legacy["tau_high"]), t_min=int(legacy["t_min"]),
                         t_max=int(legacy["t_max"]), floor=policy == "floor")
        new = run_gate(spec.with_policy(policy), x, recon, vis)
        for a, c in zip(old[:3], new[:3], strict=True):
            np.testing.assert_array_equal(a, c)
        assert 0 < new.flag.sum() < b
    zero = run_gate(dataclasses.replace(spec, topk=0), x, recon, vis)  # 0 means Np // 2 = 128
    np.testing.assert_array_equal(zero.score, new.score)


# the decision rule --------------------------------------------------------------------------------

def test_decide_by_hand() -> None:
    spec = GateSpec(stat="mean", patch=8, topk=0, norm_pix=False, tau=0.0, tau_high=2.0, t_min=0, t_max=3)
    score = np.array([-0.5, 0.0, 0.5, 1.0, 2.0, 7.0], np.float32)
    flag, t = spec.decide(score)
    assert flag.tolist() == [False, True, True, True, True, True]
    assert t.dtype == np.int32 and t.tolist() == [0, 0, 1, 2, 3, 3]  # 0.75 → 1, 1.5 → 2 (half up), clipped at t_max
    spec = dataclasses.replace(spec, t_min=10, t_max=20, policy="floor")
    assert spec.decide(score)[1].tolist() == [10, 10, 13, 15, 20, 20]  # unflagged: t_min under "floor"


@pytest.mark.parametrize("policy", ["adaptive", "floor"])
def test_decide_equals_the_cpp_kernel_on_edge_cases(policy: str) -> None:
    """τ exactly at a score, τ_high exactly at a score, one ulp either side: GateSpec.decide and the torch
    decision give the kernel's flag and t* for the kernel's own float32 scores."""
    rng = np.random.default_rng(5)
    b, k, s = 8, 2, 32
    x = rng.random((b, s, s), dtype=np.float32)
    recon = (x[:, None] + rng.standard_normal((b, k, s, s), dtype=np.float32) * rng.random((b, 1, 1, 1),
                                                                                          dtype=np.float32))
    vis = _visible(rng, k, 16)
    score = patch_gate(x, recon.astype(np.float32), vis, patch=8, tau=0.0, tau_high=1.0, t_min=0, t_max=1).score
    srt = np.sort(score)
    up = np.nextafter(srt, np.float32(np.inf))
    cases = [(srt[0], srt[-1]), (srt[3], srt[5]), (up[3], srt[5]), (np.nextafter(srt[3], np.float32(0)), srt[3] * 2),
             (srt[2], up[2]), (srt[-1], srt[-1] * 2), (srt[0] / 2, srt[1])]
    for tau, tau_high in cases:
        spec = GateSpec(stat="mean", patch=8, topk=0, norm_pix=False, tau=float(tau), tau_high=float(tau_high),
                        t_min=7, t_max=91, policy=policy)
        got = run_gate(spec, x, recon.astype(np.float32), vis, backend="cpp")
        np.testing.assert_array_equal(got.score, score)
        flag, t_star = spec.decide(got.score)
        np.testing.assert_array_equal(flag, got.flag)
        np.testing.assert_array_equal(t_star, got.t_star)
        tf, tt = decide_torch(torch.from_numpy(got.score), spec.tau, spec.tau_high, spec.t_min, spec.t_max,
                              policy == "floor")
        np.testing.assert_array_equal(tf.numpy(), got.flag)
        np.testing.assert_array_equal(tt.numpy(), got.t_star)
        at_tau = got.score == np.float32(tau)
        assert got.flag[at_tau].all() and (got.t_star[at_tau] == 7).all()  # at τ: flagged, t* = t_min
        at_high = got.score == np.float32(tau_high)
        assert (got.t_star[at_high] == 91).all()  # at τ_high: t_max
        rest = 7 if policy == "floor" else 0
        assert (got.t_star[~got.flag] == rest).all()


# run_gate and the torch version -------------------------------------------------------------------

def test_run_gate_is_patch_gate_with_the_spec() -> None:
    rng = np.random.default_rng(2)
    x = rng.random((3, 32, 32), dtype=np.float32)
    recon = (x[:, None] + 0.1 * rng.standard_normal((3, 2, 32, 32), dtype=np.float32)).astype(np.float32)
    vis = _visible(rng, 2, 16)
    spec = GateSpec(stat="topk", patch=8, topk=4, norm_pix=True, tau=0.5, tau_high=2.0, t_min=5, t_max=50,
                    policy="floor")
    got = run_gate(spec, x, recon, vis, backend="reference", return_patch_err=True)
    ref = patch_gate_reference(x, recon, vis, patch=8, stat="topk", topk=4, norm_pix=True, tau=0.5, tau_high=2.0,
                               t_min=5, t_max=50, floor=True, return_patch_err=True)
    for a, c in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, c)
    with pytest.raises(TypeError, match="GateSpec"):
        run_gate(SECTION, x, recon, vis)  # type: ignore[arg-type]


@pytest.mark.parametrize("stat", ["mean", "topk", "hfratio"])
def test_torch_gate_is_differentiable(stat: str) -> None:
    rng = np.random.default_rng(4)
    x0 = rng.random((2, 32, 32), dtype=np.float32)
    r0 = (x0[:, None] + 0.1 * rng.standard_normal((2, 2, 32, 32), dtype=np.float32)).astype(np.float32)
    vis = _visible(rng, 2, 16)
    x = torch.from_numpy(x0).requires_grad_(True)
    recon = torch.from_numpy(r0).requires_grad_(True)
    kw = dict(patch=8, stat=stat, topk=3, tau=0.01, tau_high=0.02, t_min=1, t_max=9)
    got = patch_gate_torch(x, recon, vis, **kw)
    gx, gr = torch.autograd.grad(got.score.sum(), (x, recon), allow_unused=True)
    assert torch.isfinite(gx).all() and float(gx.abs().sum()) > 0
    if stat != "hfratio":  # hfratio takes only its tissue selection from recon: no gradient there
        assert torch.isfinite(gr).all() and float(gr.abs().sum()) > 0
    ref = patch_gate_reference(x0, r0, vis, **kw)
    np.testing.assert_allclose(got.score.detach().numpy(), ref.score, rtol=1e-5)
    np.testing.assert_array_equal(got.t_star.numpy(), ref.t_star)  # no score near τ here
    assert got.flag.dtype == torch.bool and got.t_star.dtype == torch.int32


def test_engine_takes_a_gate_spec() -> None:
    from medfedpure.runtime.engines.base import Engine

    class Host(Engine):
        def mae(self, x):  # pragma: no cover - not called
            raise NotImplementedError

        def denoise(self, x_t, t):  # pragma: no cover
            raise NotImplementedError

        def classify(self, x):  # pragma: no cover
            raise NotImplementedError

    rng = np.random.default_rng(8)
    vis = _visible(rng, 2, 16)
    spec = GateSpec.from_dict(SECTION)
    eng = Host(spec, vis, np.linspace(1, 0.1, 11), 1)
    x = rng.random((3, 1, 32, 32), dtype=np.float32)
    recon = (x + 0.3 * rng.standard_normal((3, 2, 32, 32), dtype=np.float32)).astype(np.float32)
    got = eng.gate(x, recon, policy="floor")
    want = run_gate(spec.with_policy("floor"), x[:, 0], recon, vis)
    for a, c in zip(got[:3], want[:3], strict=True):
        np.testing.assert_array_equal(a, c)
    assert eng.gate_spec is spec  # the override does not change the engine
    with pytest.raises(TypeError, match="GateSpec"):
        Host(SECTION, vis, np.linspace(1, 0.1, 11), 1)  # type: ignore[arg-type]
