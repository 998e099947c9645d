"""The fused patch gate: hand-computed semantics, C++ and CUDA against the numpy oracle, validation.

The implementations follow one arithmetic contract (kernels/patch_gate.h), so patch errors and
scores must be bit-identical, and flags / t* identical even with τ placed exactly on a score.
The documented tolerance (score to 1e-5 relative) is asserted as well, as the weaker public promise.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medfedpure import gate as ops
from medfedpure.gate import dispatch, patch_gate, patch_gate_reference, patch_gate_torch

BASE = dict(tau=0.5, tau_high=1.0, t_min=10, t_max=100)


def make_visible(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """Random mask sets [K, Np] in which every patch is hidden by at least one set."""
    vis = rng.random((k, n)) < 0.6
    never = np.flatnonzero(vis.all(axis=0))
    vis[rng.integers(0, k, never.size), never] = False
    return vis


def make_case(seed: int, b: int, k: int, s: int, dtype_x: str, dtype_r: str, scale: float = 0.3):
    """x [B,S,S] in [0, 1) and recon = x + noise (so errors look like an MAE's, with some spread)."""
    rng = np.random.default_rng(seed)
    x = rng.random((b, s, s), dtype=np.float32)
    noise = rng.standard_normal((b, k, s, s), dtype=np.float32) * np.float32(scale)
    noise *= rng.random((b, k, 1, 1), dtype=np.float32)  # scans differ in error level
    recon = x[:, None] + noise
    return x.astype(dtype_x), recon.astype(dtype_r), rng


def thresholds(score: float, mode: str, rng: np.random.Generator) -> tuple[float, float]:
    """τ and τ_high placed at, just around, or well away from a computed (float32) score."""
    s32 = np.float32(score)
    tau = {
        "at": s32,
        "ulp_above": np.nextafter(s32, np.float32(np.inf)),
        "ulp_below": np.nextafter(s32, np.float32(0)),
        "below": s32 * np.float32(0.7),
        "above": s32 * np.float32(1.3) + np.float32(1e-3),
    }[mode]
    spread = {0: np.float32(0), 1: s32 * np.float32(0.25) + np.float32(1e-6), 2: s32 * np.float32(3)}[int(rng.integers(0, 3))]
    tau_high = max(np.float32(tau + spread), np.nextafter(tau, np.float32(np.inf)))
    return float(tau), float(tau_high)


def assert_same(got: ops.GateResult, ref: ops.GateResult, context: str = "") -> None:
    g = [a.cpu().numpy() if hasattr(a, "cpu") else np.asarray(a) for a in got]
    r = list(ref)
    np.testing.assert_allclose(g[0], r[0], rtol=1e-5, atol=0, err_msg=f"score {context}")
    np.testing.assert_array_equal(g[0], r[0], err_msg=f"score not bit-identical {context}")
    np.testing.assert_array_equal(g[3], r[3], err_msg=f"patch_err not bit-identical {context}")
    np.testing.assert_array_equal(g[1], r[1], err_msg=f"flag {context}")
    np.testing.assert_array_equal(g[2], r[2], err_msg=f"t_star {context}")
    assert g[1].dtype == np.bool_ and g[2].dtype == np.int32 and g[0].dtype == np.float32


# ------------------------------------------------------------------------------------------------
# semantics on hand-computed cases (the oracle itself is checked here, not only agreement)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpp", "torch"])
def test_patch_errors_by_hand(backend: str) -> None:
    # S = 4, P = 2: patches 0 1 / 2 3. Target x = 0; recon[k] is constant c_k,p on patch p.
    x = np.zeros((1, 4, 4), np.float32)
    c = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], np.float32)  # [K, Np]
    recon = np.kron(c.reshape(2, 2, 2), np.ones((2, 2), np.float32))[None]  # [1, 2, 4, 4]
    visible = np.array([[False, True, False, True], [False, False, True, True]])
    visible[1, 3] = False  # patch 3 hidden by set 1 only; patch 0 by both
    expected = np.array([(1 + 25) / 2, 36, 9, 64], np.float32)
    xin, rin = (torch.from_numpy(x), torch.from_numpy(recon)) if backend == "torch" else (x, recon)
    got = patch_gate(xin, rin, visible, patch=2, return_patch_err=True, backend=backend, **BASE)
    np.testing.assert_array_equal(np.asarray(got.patch_err), expected[None])
    np.testing.assert_allclose(np.asarray(got.score), [expected.mean()], rtol=1e-7)
    top2 = patch_gate(xin, rin, visible, patch=2, stat="topk", topk=2, backend=backend, **BASE)
    np.testing.assert_allclose(np.asarray(top2.score), [(64 + 36) / 2], rtol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "cpp", "torch"])
def test_norm_pix_target_by_hand(backend: str) -> None:
    # One 2x2 patch [0 1; 2 3]: mean 1.5, population variance 1.25; recon 0 → error = var/(var+1e-6).
    x = np.array([[[0.0, 1.0], [2.0, 3.0]]], np.float32)
    recon = np.zeros((1, 1, 2, 2), np.float32)
    vis = np.zeros((1, 1), bool)
    xin, rin = (torch.from_numpy(x), torch.from_numpy(recon)) if backend == "torch" else (x, recon)
    got = patch_gate(xin, rin, vis, patch=2, norm_pix=True, backend=backend, **BASE)
    np.testing.assert_allclose(np.asarray(got.score), [1.25 / (1.25 + 1e-6)], rtol=1e-6)
    raw = patch_gate(xin, rin, vis, patch=2, norm_pix=False, backend=backend, **BASE)
    np.testing.assert_allclose(np.asarray(raw.score), [(0 + 1 + 4 + 9) / 4], rtol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize(
    ("score", "tau", "tau_high", "t_min", "t_max", "floor", "flag", "t_star"),
    [
        (1.0, 0.0, 2.0, 0, 1, False, True, 1),  # v = 0.5 exactly: round half up
        (1.0, 0.0, 2.0, 0, 3, False, True, 2),  # v = 1.5 → 2
        (1.0, 0.0, 2.0, 10, 12, False, True, 11),  # v = 11.0
        (1.0, 1.0, 2.0, 10, 100, False, True, 10),  # score == tau: flagged, t* = t_min
        (1.0, 1.0, 2.0, 10, 100, True, True, 10),
        (4.0, 1.0, 2.0, 10, 100, False, True, 100),  # above tau_high: clipped to t_max
        (1.0, 1.5, 2.0, 10, 100, False, False, 0),  # below tau
        (1.0, 1.5, 2.0, 10, 100, True, False, 10),  # below tau, floor policy
        (0.25, 0.0, 1.0, 0, 6, False, True, 2),  # v = 1.5 → 2
        (0.75, 0.0, 1.0, 0, 2, False, True, 2),  # v = 1.5 → 2 (half up, not half even)
    ],
)
def test_decision_exact(backend, score, tau, tau_high, t_min, t_max, floor, flag, t_star) -> None:
    # x = 0, recon = sqrt(score) everywhere → every e and the score equal `score` exactly.
    x = np.zeros((1, 8, 8), np.float32)
    recon = np.full((1, 1, 8, 8), np.sqrt(score), np.float32)
    vis = np.zeros((1, 4), bool)
    got = patch_gate(x, recon, vis, patch=4, tau=tau, tau_high=tau_high, t_min=t_min, t_max=t_max, floor=floor, backend=backend)
    assert float(got.score[0]) == score
    assert bool(got.flag[0]) is flag
    assert int(got.t_star[0]) == t_star


def test_topk_ties_and_full() -> None:
    # Errors with ties; topk = Np equals the mean; topk = 1 is the max.
    x = np.zeros((2, 16, 16), np.float32)
    vals = np.array([1, 3, 3, 2] * 4, np.float32).reshape(4, 4)
    recon = np.kron(np.sqrt(vals), np.ones((4, 4), np.float32))[None, None].repeat(2, 0)
    vis = np.zeros((1, 16), bool)
    for topk, expected in ((1, 3.0), (3, 3.0), (9, (8 * 3 + 2) / 9), (16, vals.mean())):
        for backend in ("reference", "cpp"):
            got = patch_gate(x, recon, vis, patch=4, stat="topk", topk=topk, backend=backend, **BASE)
            np.testing.assert_allclose(got.score, [expected] * 2, rtol=1e-6, err_msg=f"{backend} topk={topk}")


# ------------------------------------------------------------------------------------------------
# C++ against the oracle on drawn inputs
# ------------------------------------------------------------------------------------------------

case_strategy = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "b": st.integers(1, 3),
        "k": st.sampled_from([1, 2, 4]),
        "patch": st.sampled_from([4, 8, 16]),
        "side_mult": st.integers(2, 8),  # S = patch * side, within 32..128 below
        "dtype_x": st.sampled_from(["float32", "float16"]),
        "dtype_r": st.sampled_from(["float32", "float16"]),
        "stat": st.sampled_from(["mean", "topk", "hfratio"]),
        "norm_pix": st.booleans(),
        "floor": st.booleans(),
        "mode": st.sampled_from(["at", "ulp_above", "ulp_below", "below", "above"]),
        "t_range": st.sampled_from([(0, 0), (0, 1), (10, 100), (50, 999)]),
    }
)


def _size(c: dict) -> int:
    s = c["patch"] * c["side_mult"]
    while s < 32:
        s *= 2
    return min(s, 128)


def _run_case(c: dict, backend: str, to_device=None):
    s = _size(c)
    x, recon, rng = make_case(c["seed"], c["b"], c["k"], s, c["dtype_x"], c["dtype_r"])
    n = (s // c["patch"]) ** 2
    vis = make_visible(rng, c["k"], n)
    topk = {"topk": int(rng.integers(1, n + 1)), "hfratio": int(rng.integers(0, n + 1))}.get(c["stat"], 0)
    norm_pix = c["norm_pix"] and c["stat"] != "hfratio"  # hfratio: pixel-space MAE only
    kw = dict(patch=c["patch"], stat=c["stat"], topk=topk, norm_pix=norm_pix, floor=c["floor"],
              t_min=c["t_range"][0], t_max=c["t_range"][1], return_patch_err=True)
    probe = patch_gate_reference(x, recon, vis, tau=0.0, tau_high=1.0, **kw)
    pick = int(rng.integers(0, c["b"]))
    tau, tau_high = thresholds(float(probe.score[pick]), c["mode"], rng)
    ref = patch_gate_reference(x, recon, vis, tau=tau, tau_high=tau_high, **kw)
    xin, rin = (x, recon) if to_device is None else (to_device(x), to_device(recon))
    got = patch_gate(xin, rin, vis, tau=tau, tau_high=tau_high, backend=backend, **kw)
    return got, ref, f"case={c} S={s} topk={topk} tau={tau!r} tau_high={tau_high!r}"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=case_strategy)
def test_cpp_matches_reference(c: dict) -> None:
    got, ref, ctx = _run_case(c, "cpp")
    assert_same(got, ref, ctx)
    if c["mode"] == "at":  # τ on the score of the probed scan: flagged, exactly t_min
        assert ref.flag.any()


@settings(max_examples=15, deadline=None)
@given(c=case_strategy)
def test_torch_cpu_tensors_go_to_cpp(c: dict) -> None:
    got, ref, ctx = _run_case(c, "auto", to_device=torch.from_numpy)
    assert isinstance(got.score, torch.Tensor) and got.score.device.type == "cpu"
    assert_same(got, ref, ctx)


def test_cpp_threads_agree() -> None:
    x, recon, rng = make_case(1, 9, 4, 128, "float32", "float16")
    vis = make_visible(rng, 4, 256)
    kw = dict(patch=8, stat="topk", topk=20, norm_pix=True, return_patch_err=True, **BASE)
    one = patch_gate(x, recon, vis, num_threads=1, **kw)
    for n in (2, 4, 16):
        many = patch_gate(x, recon, vis, num_threads=n, **kw)
        for a, b in zip(one, many, strict=True):
            np.testing.assert_array_equal(a, b)


def test_torch_chain_agrees_to_rounding() -> None:
    x, recon, rng = make_case(3, 4, 4, 64, "float32", "float32")
    vis = make_visible(rng, 4, 64)
    for stat, topk in (("mean", 0), ("topk", 7)):
        for norm in (False, True):
            kw = dict(patch=8, stat=stat, topk=topk, norm_pix=norm, return_patch_err=True, t_min=5, t_max=50)
            ref = patch_gate_reference(x, recon, vis, tau=0.0, tau_high=1.0, **kw)
            tau = float(np.median(ref.score))
            tau = tau * 1.01 if np.isclose(ref.score, tau, rtol=1e-4).any() else tau  # keep away from ties
            ref = patch_gate_reference(x, recon, vis, tau=tau, tau_high=2 * tau, **kw)
            got = patch_gate_torch(torch.from_numpy(x), torch.from_numpy(recon), vis, tau=tau, tau_high=2 * tau, **kw)
            np.testing.assert_allclose(got.score.numpy(), ref.score, rtol=1e-5)
            np.testing.assert_allclose(got.patch_err.numpy(), ref.patch_err, rtol=1e-5)
            np.testing.assert_array_equal(got.flag.numpy(), ref.flag)
            assert np.abs(got.t_star.numpy() - ref.t_star).max() <= 1


def test_results_only_on_request_and_inputs_untouched() -> None:
    x, recon, rng = make_case(5, 2, 2, 32, "float16", "float32")
    vis = make_visible(rng, 2, 16)
    x0, r0, v0 = x.copy(), recon.copy(), vis.copy()
    xs = np.asfortranarray(x)  # non-contiguous input is accepted (copied, never modified)
    got = patch_gate(xs, recon, vis, patch=8, **BASE)
    assert got.patch_err is None
    assert got.score.shape == (2,) and got.flag.shape == (2,) and got.t_star.shape == (2,)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(recon, r0)
    np.testing.assert_array_equal(vis, v0)
    ref = patch_gate_reference(x, recon, vis, patch=8, **BASE)
    np.testing.assert_array_equal(got.score, ref.score)


def test_fallback_to_reference_warns_only_without_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    x, recon, rng = make_case(2, 2, 2, 32, "float32", "float32")
    vis = make_visible(rng, 2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        built = patch_gate(x, recon, vis, patch=8, **BASE)
    monkeypatch.setattr(dispatch, "_C", None)
    with pytest.warns(RuntimeWarning, match="not built"):
        fallback = patch_gate(x, recon, vis, patch=8, **BASE)
    np.testing.assert_array_equal(fallback.score, built.score)
    with pytest.raises(RuntimeError, match="needs medfedpure._C"):
        patch_gate(x, recon, vis, patch=8, backend="cpp", **BASE)


# ------------------------------------------------------------------------------------------------
# stat "hfratio": semantics by hand, ties, C++ on drawn inputs, agreement with the research code
# ------------------------------------------------------------------------------------------------


def hfratio_hand_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """S = 6, P = 3, Np = 4. Patch p of x = checkerboard (−1)^(r+c) + β_p·r·c: the corner-band filter
    sees only the checkerboard, l = ±4 → h = 16; the diagonal difference is ±2 + β/2 → d = 4 + β²/4;
    so e = 16 / (4 + β²/4 + 1e-6) = 4, 2, 0.8, 0.4 for β = 0, 4, 8, 12. recon is constant per
    (set, patch); with the mask sets below the tissue levels are w = [3, 1, 2, 4]."""
    r, c = np.mgrid[0:3, 0:3].astype(np.float64)
    betas = np.array([0.0, 4.0, 8.0, 12.0])
    blocks = [(-1.0) ** (r + c) + bt * r * c for bt in betas]
    x = np.block([[blocks[0], blocks[1]], [blocks[2], blocks[3]]]).astype(np.float32)[None]
    consts = np.array([[2.0, 100.0, 2.0, 4.0], [4.0, 1.0, 2.0, 100.0]])  # [K, Np]
    recon = np.stack([np.kron(k.reshape(2, 2), np.ones((3, 3))) for k in consts]).astype(np.float32)[None]
    visible = np.array([[False, True, False, False], [False, False, False, True]])
    # w: p0 = (2 + 4)/2 = 3 (both sets), p1 = 1 (set 1 only), p2 = 2, p3 = 4 (set 0 only)
    e = 16.0 / (4.0 + betas**2 / 4 + 1e-6)
    return x, recon, visible, e


@pytest.mark.parametrize("backend", ["reference", "cpp", "torch"])
def test_hfratio_by_hand(backend: str) -> None:
    x, recon, vis, e = hfratio_hand_case()
    xin, rin = (torch.from_numpy(x), torch.from_numpy(recon)) if backend == "torch" else (x, recon)
    # selection by w descending: p3 (4), p0 (3), p2 (2), p1 (1)
    for m, expected in ((1, e[3]), (2, (e[3] + e[0]) / 2), (3, e[2]), (4, (e[2] + e[1]) / 2), (0, (e[3] + e[0]) / 2)):
        got = patch_gate(xin, rin, vis, patch=3, stat="hfratio", topk=m, return_patch_err=True, backend=backend, **BASE)
        np.testing.assert_allclose(np.asarray(got.patch_err)[0], e, rtol=1e-6, err_msg=f"{backend} m={m}")
        np.testing.assert_allclose(np.asarray(got.score), [expected], rtol=1e-6, err_msg=f"{backend} m={m}")
        assert bool(np.asarray(got.flag)[0]) is bool(expected >= BASE["tau"])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_hfratio_ties_in_w_take_the_lower_patch_index(backend: str) -> None:
    x, recon, vis, e = hfratio_hand_case()
    recon = np.ones_like(recon)  # every w = 1: the m selected patches are 0 .. m-1
    for m in (1, 2, 3):
        got = patch_gate(x, recon, vis, patch=3, stat="hfratio", topk=m, backend=backend, **BASE)
        np.testing.assert_allclose(got.score, [np.median(e[:m])], rtol=1e-6, err_msg=f"m={m}")


def smooth_scans(seed: int, b: int, s: int, k: int, attack: float = 0.0):
    """Realistic gate inputs: a smooth image plus band-limited 'scanner' noise (k-space truncated to
    the central ~half, as an MR reconstruction does), recon = x + a small white MAE error; with
    `attack`, x gets ±attack sign noise (an ℓ∞ FGSM-like perturbation) after recon is made."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s] / s
    base = 0.2 + 0.6 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.08) * (1 + 0.2 * np.sin(9 * xx) * np.cos(7 * yy))
    f = np.abs(np.fft.fftfreq(s))
    keep = (f[:, None] < 0.26) & (f[None, :] < 0.26)
    noise = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((b, s, s))) * keep))
    x = base[None] + 0.03 * noise / noise.std()
    recon = x[:, None] + 0.04 * rng.standard_normal((b, k, s, s))
    if attack:
        x = x + attack * np.sign(rng.standard_normal(x.shape))
    n = (s // 8) ** 2
    vis = np.zeros((k, n), bool)
    for kk, group in enumerate(np.array_split(rng.permutation(n), k)):
        vis[kk, group] = True
    return x.astype(np.float32), recon.astype(np.float32), vis


def _hfratio_plain(x: np.ndarray, recon: np.ndarray, vis: np.ndarray, patch: int, m: int) -> np.ndarray:
    """hfratio written independently of the gate: numpy's own reductions (pairwise sums, np.median),
    patches cut with reshape/swapaxes. Agrees with the oracle to float rounding."""
    b, s = x.shape[0], x.shape[-1]
    g = s // patch

    def cut(a: np.ndarray) -> np.ndarray:
        lead = a.shape[:-2]
        return a.reshape(*lead, g, patch, g, patch).swapaxes(-3, -2).reshape(*lead, g * g, patch, patch)

    z, r = cut(x.astype(np.float32)), cut(recon.astype(np.float32))
    a = z[..., :, :-2] - 2 * z[..., :, 1:-1] + z[..., :, 2:]
    lap = (a[..., :-2, :] - 2 * a[..., 1:-1, :] + a[..., 2:, :]) / 4
    dia = (z[..., :-1, :-1] - z[..., :-1, 1:] - z[..., 1:, :-1] + z[..., 1:, 1:]) / 2
    e = (lap * lap).mean(axis=(-1, -2)) / ((dia * dia).mean(axis=(-1, -2)) + np.float32(1e-6))
    hidden = ~vis
    w = (r.mean(axis=(-1, -2)) * hidden[None]).sum(axis=1) / hidden.sum(axis=0)[None]
    m = m or max(1, e.shape[1] // 2)
    sel = np.take_along_axis(e, np.argsort(-w, axis=1, kind="stable")[:, :m], axis=1)
    assert sel.shape == (b, m)
    return np.median(sel, axis=1).astype(np.float32)


def test_hfratio_reference_agrees_with_plain_numpy_and_detects_sign_noise() -> None:
    scores = {}
    for attack in (0.0, 8 / 255):
        x, recon, vis = smooth_scans(7, 4, 128, 4, attack)
        for m in (0, 10, 256):
            ref = patch_gate_reference(x, recon, vis, patch=8, stat="hfratio", topk=m, return_patch_err=True, **BASE)
            np.testing.assert_allclose(ref.score, _hfratio_plain(x, recon, vis, 8, m), rtol=1e-5, atol=0,
                                       err_msg=f"attack={attack} m={m}")
            score, e = ops.gate_scores(x, recon, vis, patch=8, stat="hfratio", topk=m)  # calibration's view
            np.testing.assert_array_equal(score, ref.score)
            np.testing.assert_array_equal(e, ref.patch_err)
            assert_same(patch_gate(x, recon, vis, patch=8, stat="hfratio", topk=m, return_patch_err=True, **BASE), ref)
        direct = patch_gate_reference(x, recon, vis, patch=8, stat="hfratio", **BASE).score  # m = Np // 2
        np.testing.assert_allclose(direct, _hfratio_plain(x, recon, vis, 8, 128), rtol=1e-5)
        scores[attack] = direct
    clean, attacked = scores[0.0], scores[8 / 255]
    assert clean.max() < 0.8 and attacked.min() > 1.5, (clean, attacked)  # band-limited ≪ 2.25 ≈ white
    assert attacked.min() > 2.5 * clean.max()


def test_tissue_patches_is_the_oracles_selection() -> None:
    """tissue_patches (the evasion attack's selection) picks exactly the patches the hfratio score takes
    its median over: the median of e over them is the oracle's score, bit for bit."""
    x, recon, vis = smooth_scans(5, 3, 64, 4, 2 / 255)
    for m in (0, 1, 7, 64):
        ref = patch_gate_reference(x, recon, vis, patch=8, stat="hfratio", topk=m, return_patch_err=True, **BASE)
        sel = ops.tissue_patches(recon, vis, patch=8, m=m)
        mm = m or 32
        assert sel.shape == (3, mm) and sel.dtype == np.int64
        srt = np.sort(np.take_along_axis(ref.patch_err, sel, axis=1), axis=1)
        lo, hi = srt[:, (mm - 1) // 2], srt[:, mm // 2]
        np.testing.assert_array_equal(lo if mm % 2 else (lo + hi) / np.float32(2), ref.score)
    with pytest.raises(ValueError, match="m = 65"):
        ops.tissue_patches(recon, vis, patch=8, m=65)
    with pytest.raises(ValueError, match="visible"):
        ops.tissue_patches(recon, vis[:, :10], patch=8, m=3)


def test_torch_chain_hfratio_agrees_to_rounding() -> None:
    x, recon, vis = smooth_scans(3, 3, 64, 4, 2 / 255)
    for m in (0, 7, 64):
        kw = dict(patch=8, stat="hfratio", topk=m, return_patch_err=True, t_min=5, t_max=50, tau=0.5, tau_high=1.0)
        ref = patch_gate_reference(x, recon, vis, **kw)
        got = patch_gate_torch(torch.from_numpy(x), torch.from_numpy(recon), vis, **kw)
        np.testing.assert_allclose(got.score.numpy(), ref.score, rtol=1e-5)
        np.testing.assert_allclose(got.patch_err.numpy(), ref.patch_err, rtol=1e-5)


hf_strategy = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "b": st.integers(1, 3),
        "k": st.sampled_from([1, 2, 4]),
        "patch": st.sampled_from([3, 4, 5, 7, 8, 16]),
        "side": st.integers(1, 8),
        "dtype_x": st.sampled_from(["float32", "float16"]),
        "dtype_r": st.sampled_from(["float32", "float16"]),
        "levels": st.sampled_from([0, 2, 5]),  # 0: continuous; else quantised x and recon → ties in e and w
        "floor": st.booleans(),
        "mode": st.sampled_from(["at", "ulp_above", "ulp_below", "below", "above"]),
    }
)


def _run_hf_case(c: dict, backend: str, to_device=None):
    s = c["patch"] * c["side"]
    rng = np.random.default_rng(c["seed"])
    x = rng.random((c["b"], s, s), dtype=np.float32)
    recon = x[:, None] + np.float32(0.2) * rng.standard_normal((c["b"], c["k"], s, s), dtype=np.float32)
    if c["levels"]:
        x = np.floor(x * c["levels"]) / np.float32(c["levels"])
        recon = np.floor(np.clip(recon, 0, 1) * c["levels"]) / np.float32(c["levels"])
    x, recon = x.astype(c["dtype_x"]), recon.astype(c["dtype_r"])
    n = c["side"] ** 2
    vis = make_visible(rng, c["k"], n)
    kw = dict(patch=c["patch"], stat="hfratio", topk=int(rng.integers(0, n + 1)), floor=c["floor"], t_min=10, t_max=100,
              return_patch_err=True)
    probe = patch_gate_reference(x, recon, vis, tau=0.0, tau_high=1.0, **kw)
    tau, tau_high = thresholds(float(probe.score[int(rng.integers(0, c["b"]))]), c["mode"], rng)
    ref = patch_gate_reference(x, recon, vis, tau=tau, tau_high=tau_high, **kw)
    xin, rin = (x, recon) if to_device is None else (to_device(x), to_device(recon))
    got = patch_gate(xin, rin, vis, tau=tau, tau_high=tau_high, backend=backend, **kw)
    return got, ref, f"case={c} S={s} m={kw['topk']} tau={tau!r}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=hf_strategy)
def test_cpp_hfratio_matches_reference(c: dict) -> None:
    got, ref, ctx = _run_hf_case(c, "cpp")
    assert_same(got, ref, ctx)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

X = np.zeros((2, 32, 32), np.float32)
R = np.zeros((2, 2, 32, 32), np.float32)
V = np.zeros((2, 16), bool)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(patch=7), ValueError, "patch 7 does not divide the scan size S = 32"),
        (dict(patch=0), ValueError, "patch must be a positive int"),
        (dict(x=np.zeros((2, 32, 31), np.float32)), ValueError, r"expected \[B, S, S\]"),
        (dict(x=np.zeros((32, 32), np.float32)), ValueError, r"expected \[B, S, S\]"),
        (dict(recon=np.zeros((2, 32, 32), np.float32)), ValueError, r"expected \[B, K, S, S\]"),
        (dict(recon=np.zeros((3, 2, 32, 32), np.float32)), ValueError, r"recon has shape \(3, 2, 32, 32\)"),
        (dict(x=np.zeros((2, 32, 32), np.float64)), TypeError, "x has dtype float64: expected float32 or float16"),
        (dict(recon=np.zeros((2, 2, 32, 32), np.int32)), TypeError, "recon has dtype int32"),
        (dict(visible=np.zeros((3, 16), bool)), ValueError, r"expected \[K, Np\] = \[2, 16\]"),
        (dict(visible=np.zeros((2, 64), bool)), ValueError, r"Np = \(S/patch\)\^2"),
        (dict(visible=np.array([[True] + [False] * 15] * 2)), ValueError, r"patches \[0\] are visible in every mask set"),
        (dict(visible=np.full((2, 16), 0.5)), TypeError, "visible must be a bool array"),
        (dict(stat="median"), ValueError, "stat 'median' is unknown"),
        (dict(stat="topk", topk=0), ValueError, r"1 <= topk <= Np = 16"),
        (dict(stat="topk", topk=17), ValueError, r"1 <= topk <= Np = 16"),
        (dict(stat="hfratio", topk=17), ValueError, r"with stat 'hfratio'.*0 <= topk <= Np = 16"),
        (dict(stat="hfratio", topk=-1), ValueError, r"with stat 'hfratio'"),
        (dict(stat="hfratio", norm_pix=True), ValueError, "needs a pixel-space MAE: norm_pix=True is not supported"),
        (dict(stat="hfratio", patch=2, visible=np.zeros((2, 256), bool)), ValueError, "at least 3x3 pixels"),
        (dict(tau=1.0, tau_high=1.0), ValueError, "tau_high = 1.0 must be > tau"),
        (dict(tau=1.0, tau_high=1.0 + 1e-12), ValueError, "after rounding both to float32"),
        (dict(tau=float("nan")), ValueError, "must be finite"),
        (dict(t_min=5, t_max=4), ValueError, "0 <= t_min <= t_max"),
        (dict(t_min=-1), ValueError, "0 <= t_min <= t_max"),
        (dict(t_min=1.5), ValueError, "t_min must be an int"),
        (dict(backend="tpu"), ValueError, "backend 'tpu' is unknown"),
        (dict(backend="cuda"), ValueError, "needs torch CUDA tensors"),
        (dict(recon=torch.zeros(2, 2, 32, 32)), TypeError, "must both be numpy arrays or both torch tensors"),
    ],
)
def test_bad_input_is_refused(kwargs: dict, error: type, match: str) -> None:
    args = dict(x=X, recon=R, visible=V, patch=8, tau=0.5, tau_high=1.0, t_min=0, t_max=10)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        patch_gate(**args)


def test_reference_validates_too() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        patch_gate_reference(X, R, V, patch=5, tau=0.5, tau_high=1.0, t_min=0, t_max=10)


def test_cpp_binding_checks_direct_calls() -> None:
    kw = dict(patch=8, stat=0, topk=0, norm_pix=False, tau=0.5, tau_high=1.0, t_min=0, t_max=10, floor=False)
    with pytest.raises(ValueError, match="C-contiguous"):
        dispatch._C.patch_gate(np.asfortranarray(np.zeros((2, 32, 32), np.float32)), R, V, **kw)
    with pytest.raises(TypeError, match="float32 or float16"):
        dispatch._C.patch_gate(X.astype(np.float64), R, V, **kw)
    with pytest.raises(ValueError, match="patch must divide"):
        dispatch._C.patch_gate(X, R, V, **{**kw, "patch": 5})
    with pytest.raises(ValueError, match="hidden by at least one set"):
        dispatch._C.patch_gate(X, R, np.ones((2, 16), bool), **kw)
    with pytest.raises(ValueError, match="tau_high must be > tau"):
        dispatch._C.patch_gate(X, R, V, **{**kw, "tau_high": 0.5})
    hf = {**kw, "stat": dispatch._C.STAT_HFRATIO}
    assert dispatch._C.STAT_HFRATIO == ops.STATS["hfratio"]
    with pytest.raises(ValueError, match="hfratio needs a pixel-space MAE"):
        dispatch._C.patch_gate(X, R, V, **{**hf, "norm_pix": True})
    with pytest.raises(ValueError, match="hfratio needs patch >= 3"):
        dispatch._C.patch_gate(X, R, np.zeros((2, 256), bool), **{**hf, "patch": 2})
    with pytest.raises(ValueError, match=r"hfratio: topk \(m\) must be in \[0, Np\]"):
        dispatch._C.patch_gate(X, R, V, **{**hf, "topk": 17})


# ------------------------------------------------------------------------------------------------
# C++ code paths: vector / scalar, the strip split across threads, the prepared repeat call
# ------------------------------------------------------------------------------------------------


def _bare(x, recon, vis, kw: dict, **extra):
    """The binding with the oracle's keywords (stat name → code, return_patch_err dropped)."""
    args = {k: v for k, v in kw.items() if k != "return_patch_err"}
    args["stat"] = ops.STATS[args["stat"]]
    return dispatch._C.patch_gate(x, recon, vis, **args, **extra)


simd_strategy = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "b": st.integers(1, 3),
        "k": st.sampled_from([1, 3, 4]),
        "patch": st.sampled_from([3, 4, 5, 8, 12, 16, 24]),  # 8 | P reads in place; else padded copies
        "side": st.integers(1, 6),
        "dtype_x": st.sampled_from(["float32", "float16"]),
        "dtype_r": st.sampled_from(["float32", "float16"]),
        "stat": st.sampled_from(["mean", "topk", "hfratio"]),
        "norm_pix": st.booleans(),
        "threads": st.sampled_from([1, 2, 3, 8]),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=simd_strategy)
def test_cpp_vector_and_scalar_paths_equal_oracle(c: dict) -> None:
    if c["stat"] == "hfratio" and c["patch"] < 3:
        return
    s = c["patch"] * c["side"]
    x, recon, rng = make_case(c["seed"], c["b"], c["k"], s, c["dtype_x"], c["dtype_r"])
    n = c["side"] ** 2
    vis = make_visible(rng, c["k"], n)
    topk = {"topk": int(rng.integers(1, n + 1)), "hfratio": int(rng.integers(0, n + 1))}.get(c["stat"], 0)
    kw = dict(patch=c["patch"], stat=c["stat"], topk=topk, norm_pix=c["norm_pix"] and c["stat"] != "hfratio",
              tau=0.05, tau_high=0.5, t_min=10, t_max=100, floor=False)
    ref = patch_gate_reference(x, recon, vis, return_patch_err=True, **kw)
    for simd in (True, False):
        got = _bare(x, recon, vis, kw, num_threads=c["threads"], simd=simd)
        for name, g, r in zip(("score", "flag", "t_star", "patch_err"), got, ref, strict=True):
            np.testing.assert_array_equal(g, r, err_msg=f"{name} simd={simd} case={c} S={s}")


def test_cpp_vector_path_is_used_where_available() -> None:
    import platform
    from pathlib import Path

    if platform.system() != "Linux":
        pytest.skip("reads the CPU flags from /proc/cpuinfo")
    flags = Path("/proc/cpuinfo").read_text().split()
    expected = platform.machine() == "x86_64" and "avx2" in flags and "f16c" in flags
    assert dispatch._C.SIMD is expected


@pytest.mark.parametrize(("b", "patch", "stat"), [(1, 8, "mean"), (1, 16, "hfratio"), (2, 8, "topk"), (5, 16, "mean")])
def test_cpp_strip_split_across_threads_agrees(b: int, patch: int, stat: str) -> None:
    # One scan's strips (rows of patches) go to different threads when the batch is small: the
    # results must not depend on how the strips were shared out.
    x, recon, rng = make_case(11 + b, b, 4, 128, "float32", "float32")
    n = (128 // patch) ** 2
    vis = make_visible(rng, 4, n)
    kw = dict(patch=patch, stat=stat, topk=7 if stat == "topk" else 0, norm_pix=stat == "topk", tau=0.05,
              tau_high=0.5, t_min=10, t_max=100, floor=True)
    ref = patch_gate_reference(x, recon, vis, return_patch_err=True, **kw)
    for threads in (1, 2, 3, 16, 0):
        for _ in range(3):
            got = _bare(x, recon, vis, kw, num_threads=threads)
            for name, g, r in zip(("score", "flag", "t_star", "patch_err"), got, ref, strict=True):
                np.testing.assert_array_equal(g, r, err_msg=f"{name} threads={threads}")


def test_cpp_concurrent_callers_share_the_pool() -> None:
    # Python threads call the kernel at once (the GIL is released): one of them gets the worker pool,
    # the others run on their own thread; every result is still exact.
    from concurrent.futures import ThreadPoolExecutor

    cases = []
    for seed in range(6):
        x, recon, rng = make_case(seed, 1 + seed % 3, 4, 64, "float32", "float16")
        vis = make_visible(rng, 4, 64)
        kw = dict(patch=8, stat="hfratio" if seed % 2 else "mean", topk=0, norm_pix=False, tau=0.05, tau_high=0.5,
                  t_min=10, t_max=100, floor=False)
        cases.append((x, recon, vis, kw, patch_gate_reference(x, recon, vis, return_patch_err=True, **kw)))

    def run(i: int) -> bool:
        x, recon, vis, kw, ref = cases[i % len(cases)]
        got = _bare(x, recon, vis, kw, num_threads=2)
        return all(np.array_equal(g, r) for g, r in zip(got, ref, strict=True))

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(run, range(48)))


def test_repeated_host_calls_use_the_prepared_kernel_and_stay_checked() -> None:
    x, recon, rng = make_case(4, 2, 4, 64, "float32", "float32")
    vis = make_visible(rng, 4, 64)
    kw = dict(patch=8, stat="topk", topk=5, tau=0.05, tau_high=0.5, t_min=10, t_max=100, return_patch_err=True)
    dispatch._HOST_CALLS.clear()
    first = patch_gate(x, recon, vis, **kw)
    assert len(dispatch._HOST_CALLS) == 1 and isinstance(next(iter(dispatch._HOST_CALLS.values())), dispatch._C.Prepared)
    again = patch_gate(x, recon, vis, **kw)
    assert len(dispatch._HOST_CALLS) == 1
    ref = patch_gate_reference(x, recon, vis, **kw)
    for g, a, r in zip(first, again, ref, strict=True):
        np.testing.assert_array_equal(g, r)
        np.testing.assert_array_equal(a, r)
    # other mask sets of the same shape, other thresholds: not the cached call
    vis2 = make_visible(rng, 4, 64)
    np.testing.assert_array_equal(patch_gate(x, recon, vis2, **kw).patch_err,
                                  patch_gate_reference(x, recon, vis2, **kw).patch_err)
    tau = float(ref.score.max()) * 2
    assert not patch_gate(x, recon, vis, **{**kw, "tau": tau, "tau_high": 2 * tau}).flag.any()
    # arguments equal to cached ones as values but of another type are validated afresh
    with pytest.raises(ValueError, match="topk must be an int"):
        patch_gate(x, recon, vis, **{**kw, "topk": 5.0})
    with pytest.raises(ValueError, match="patch must be a positive int"):
        patch_gate(x, recon, vis, **{**kw, "patch": np.float32(8)})
    with pytest.raises(ValueError, match="visible in every mask set"):
        patch_gate(x, recon, np.ones((4, 64), bool), **kw)
    # non-contiguous input takes the full path and is copied
    xs = np.asfortranarray(x)
    np.testing.assert_array_equal(patch_gate(xs, recon, vis, **kw).score, ref.score)


def test_prepared_binding_checks_shapes() -> None:
    prep = dispatch._C.Prepared(V, patch=8, stat=0, topk=0, norm_pix=False, tau=0.5, tau_high=1.0, t_min=0, t_max=10,
                                floor=False)
    score, flag, t_star, err = prep(X, R, 1)
    ref = patch_gate_reference(X, R, V, patch=8, tau=0.5, tau_high=1.0, t_min=0, t_max=10, return_patch_err=True)
    np.testing.assert_array_equal(err, ref.patch_err)
    with pytest.raises(ValueError, match="visible has 16 patches per set, expected Np"):
        prep(np.zeros((2, 64, 64), np.float32), np.zeros((2, 2, 64, 64), np.float32), 1)
    with pytest.raises(ValueError, match=r"recon must have shape \[B, K, S, S\]"):
        prep(X, np.zeros((2, 2, 16, 16), np.float32), 1)
    with pytest.raises(ValueError, match="visible must be a bool/uint8 array"):
        prep(X, np.zeros((2, 3, 32, 32), np.float32), 1)


# ------------------------------------------------------------------------------------------------
# CUDA (run by benchmarks/gpu_check.sh on a lent GPU; skipped here)
# ------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or dispatch._C_cuda is None, reason="needs a CUDA GPU and medfedpure._C_cuda"
)


def _cuda(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).cuda()


@pytest.mark.cuda
@needs_cuda
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=case_strategy)
def test_cuda_matches_reference(c: dict) -> None:
    got, ref, ctx = _run_case(c, "auto", to_device=_cuda)
    assert got.score.is_cuda and got.flag.dtype == torch.bool and got.t_star.dtype == torch.int32
    assert_same(got, ref, ctx)


@pytest.mark.cuda
@needs_cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=hf_strategy)
def test_cuda_hfratio_matches_reference(c: dict) -> None:
    got, ref, ctx = _run_hf_case(c, "auto", to_device=_cuda)
    assert got.score.is_cuda
    assert_same(got, ref, ctx)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_hfratio_224px_patch8_and_research_agreement(dtype: str) -> None:
    # The largest selection: Np = 784 patches, m = 392 (even: mean of the two middle values).
    x, recon, vis = smooth_scans(5, 4, 224, 4, 4 / 255)
    x, recon = x.astype(dtype), recon.astype(dtype)
    for m in (0, 391, 784):
        kw = dict(patch=8, stat="hfratio", topk=m, return_patch_err=True, **BASE)
        ref = patch_gate_reference(x, recon, vis, **kw)
        assert_same(patch_gate(_cuda(x), _cuda(recon), vis, **kw), ref, f"224 px m={m}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("stat", ["topk", "hfratio"])
def test_cuda_unaligned_and_strided_inputs(dtype: str, stat: str) -> None:
    # An odd element offset defeats the wide loads (scalar path); a transposed view is copied.
    x, recon, rng = make_case(11, 3, 2, 64, dtype, dtype)
    vis = make_visible(rng, 2, 64)
    kw = dict(patch=8, stat=stat, topk=9, norm_pix=stat == "topk", return_patch_err=True, **BASE)
    ref = patch_gate_reference(x, recon, vis, **kw)
    flat_x = torch.zeros(x.size + 1, dtype=getattr(torch, dtype), device="cuda")
    flat_x[1:] = _cuda(x).flatten()
    xu = flat_x[1:].view(x.shape)
    assert xu.data_ptr() % 16 != 0
    assert_same(patch_gate(xu, _cuda(recon), vis, **kw), ref, "unaligned x")
    xt = _cuda(np.ascontiguousarray(x.transpose(0, 2, 1))).transpose(1, 2)
    assert_same(patch_gate(xt, _cuda(recon), vis, **kw), ref, "transposed x")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("s", "patch", "sets"), [(64, 2, 4), (96, 2, 4), (92, 1, 1), (224, 4, 1)])
def test_cuda_topk_ranks_several_patches_per_thread(s: int, patch: int, sets: int) -> None:
    # Np > threads: each thread ranks several patches into its keep mask (Np = 8464 > 32 * 256 is refused).
    x, recon, rng = make_case(13, 2, sets, s, "float32", "float32")
    np_ = (s // patch) ** 2
    vis = make_visible(rng, sets, np_)
    kw = dict(patch=patch, stat="topk", topk=np_ // 3, norm_pix=False, return_patch_err=True, **BASE)
    if not ops.cuda_kernel_limits_ok(s, patch, "topk", sets):
        with pytest.raises(ValueError, match="exceeds the CUDA kernel"):
            patch_gate(_cuda(x), _cuda(recon), vis, **kw)
        return
    assert_same(patch_gate(_cuda(x), _cuda(recon), vis, **kw), patch_gate_reference(x, recon, vis, **kw), f"{s}/{patch}")


def test_cuda_kernel_limits() -> None:
    assert ops.cuda_kernel_limits_ok(224, 8, "hfratio", 4) and ops.cuda_kernel_limits_ok(224, 4, "topk", 1)
    assert not ops.cuda_kernel_limits_ok(512, 4, "mean", 4)  # Np = 16384 floats of shared memory
    assert not ops.cuda_kernel_limits_ok(92, 1, "topk", 1)  # Np = 8464 > 32 patches x 256 threads
    assert ops.cuda_kernel_limits_ok(92, 1, "mean", 1) and ops.cuda_kernel_limits_ok(90, 1, "topk", 1)


@pytest.mark.cuda
@needs_cuda
def test_cuda_side_stream_repeat_and_large_batch() -> None:
    x, recon, rng = make_case(12, 70, 4, 128, "float16", "float16")
    vis = make_visible(rng, 4, 256)
    kw = dict(patch=8, stat="mean", norm_pix=False, return_patch_err=True, **BASE)
    ref = patch_gate_reference(x, recon, vis, **kw)
    xd, rd = _cuda(x), _cuda(recon)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        runs = [patch_gate(xd, rd, vis, **kw) for _ in range(3)]  # tickets reset between launches
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for got in runs:
        assert_same(got, ref, "side stream")
    assert int(dispatch._COUNTERS[(xd.device.index, side.cuda_stream)].abs().sum()) == 0


@pytest.mark.cuda
@needs_cuda
def test_cuda_module_entry_points() -> None:
    stream = torch.cuda.current_stream().cuda_stream
    assert dispatch._C_cuda.empty_launch(stream) == 0
    assert dispatch._C_cuda.runtime_version() >= 12000
    x = torch.zeros(1, 512, 512, device="cuda")
    r = torch.zeros(1, 1, 512, 512, device="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        patch_gate(x, r, np.zeros((1, 128 * 128), bool), patch=4, **BASE)


def test_cuda_module_imports_without_a_gpu() -> None:
    # The static CUDA runtime makes the module importable anywhere; without a driver its calls
    # return an error code (35 = cudaErrorInsufficientDriver) instead of crashing.
    if dispatch._C_cuda is None:
        pytest.skip("medfedpure._C_cuda was not built (no nvcc)")
    if torch.cuda.is_available():
        assert dispatch._C_cuda.empty_launch(0) == 0
    else:
        code = dispatch._C_cuda.empty_launch(0)
        assert code != 0 and isinstance(dispatch._C_cuda.error_string(code), str)
        # the gate's launch reports the same error code (positional arguments, null pointers)
        args = (0, 0, 0, 0, 0, 1, 1, 32, 8, 0, 0, False, 0.5, 1.0, 0, 10, False, 0, 0, 0, 0, 0, 0)
        assert dispatch._C_cuda.patch_gate(*args) == code
        with pytest.raises(ValueError, match="patch must divide"):
            dispatch._C_cuda.patch_gate(*args[:8], 5, *args[9:])
