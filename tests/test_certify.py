"""Certification by denoised randomized smoothing: the statistics, σ → t, CERTIFY / PREDICT on toy engines
with known answers, keyed replay, backends agreeing on the tiny bundle, and the CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from medfedpure import Defender
from medfedpure.models.diffusion import make_alphas_cumprod
from medfedpure.runtime.certify import (
    Certificate,
    DenoisedSmoothing,
    SmoothingConfig,
    binom_test_half,
    certified_accuracy,
    certified_accuracy_by_class,
    clopper_pearson_lower,
    noise_level,
    sigma_to_t,
)
from medfedpure.runtime.sampler import interp_alpha_bar
from PIL import Image
from tiny_bundle import cached_tiny_bundle, tiny_scans

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)
stats = pytest.importorskip("scipy.stats")

COSINE = make_alphas_cumprod("cosine", 1000).numpy()
LINEAR = make_alphas_cumprod("linear", 1000).numpy()


# ----------------------------------------------------------------------------------------------
# statistics
def test_clopper_pearson_hand_computed() -> None:
    # k = n: P(Bin(n, p) ≥ n) = pⁿ = α  →  p_lower = α^(1/n)
    assert clopper_pearson_lower(1000, 1000, 0.001) == pytest.approx(0.001 ** (1 / 1000), rel=0, abs=1e-13)
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10), rel=0, abs=1e-13)
    # k = 1, n = 1: p_lower = α; k = 0: 0
    assert clopper_pearson_lower(1, 1, 0.01) == pytest.approx(0.01, abs=1e-15)
    assert clopper_pearson_lower(0, 50, 0.001) == 0.0


@pytest.mark.parametrize(("k", "n", "alpha"), [(990, 1000, 0.001), (731, 1000, 0.001), (500, 1000, 0.001),
                                               (1, 10, 0.05), (73, 100, 0.01), (99_990, 100_000, 0.001),
                                               (3, 100_000, 0.01)])
def test_clopper_pearson_matches_scipy(k: int, n: int, alpha: float) -> None:
    ref = stats.beta.ppf(alpha, k, n - k + 1)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    got = clopper_pearson_lower(k, n, alpha)
    assert got == pytest.approx(ref, rel=1e-9)
    assert got == pytest.approx(ci, rel=1e-8)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (5, 10), (60, 100), (40, 100), (520, 1000), (3, 7),
                                      (1, 1), (4999, 10_000)])
def test_binom_test_half_matches_scipy(k: int, n: int) -> None:
    assert binom_test_half(k, n) == pytest.approx(stats.binomtest(k, n, 0.5).pvalue, rel=1e-9, abs=1e-15)
    assert binom_test_half(0, 0) == 1.0


@pytest.mark.parametrize(("k", "n", "alpha"), [(-1, 10, 0.01), (11, 10, 0.01), (5, 0, 0.01), (5, 10, 0.0),
                                               (5, 10, 0.5), (5, 10, True), (5.0, 10, 0.01)])
def test_clopper_pearson_refuses_bad_arguments(k, n, alpha) -> None:
    with pytest.raises(ValueError):
        clopper_pearson_lower(k, n, alpha)


# ----------------------------------------------------------------------------------------------
# σ → t
@pytest.mark.parametrize("table", [COSINE, LINEAR], ids=["cosine", "linear"])
@pytest.mark.parametrize("sigma", [0.005, 0.05, 0.12, 0.25, 0.5, 1.0, 2.0])
def test_sigma_to_t_inverts_the_schedule(table: np.ndarray, sigma: float) -> None:
    t = sigma_to_t(table, sigma)
    assert 0 < t < 1000
    assert abs(noise_level(table, t) - 2 * sigma) < 1e-3
    # exact on the interpolated float64 ᾱ: ᾱ_t = 1/(1 + 4σ²)
    lo = math.floor(t)
    ab = table[lo] * (1 - (t - lo)) + table[lo + 1] * (t - lo)
    assert ab == pytest.approx(1 / (1 + 4 * sigma**2), rel=1e-12)


def test_sigma_to_t_is_monotone_and_refuses_bad_sigma() -> None:
    ts = [sigma_to_t(COSINE, s) for s in (0.01, 0.1, 0.25, 0.5, 1.0)]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    for bad in (0.0, -0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="sigma"):
            sigma_to_t(COSINE, bad)
    top = math.sqrt((1 - LINEAR[-1]) / LINEAR[-1]) / 2
    with pytest.raises(ValueError, match="largest noise level"):
        sigma_to_t(LINEAR, top * 1.01)


@pytest.mark.parametrize("kw", [{"sigma": 0}, {"sigma": -1.0}, {"n0": 0}, {"n": 0}, {"alpha": 0.0},
                                {"alpha": 0.5}, {"batch": 0}, {"n": 2.5}, {"sigma": float("nan")}])
def test_smoothing_config_refuses_bad_values(kw: dict) -> None:
    with pytest.raises(ValueError):
        SmoothingConfig(**kw)


# ----------------------------------------------------------------------------------------------
# toy engines with a known smoothed classifier
class ToyEngine:
    """A toy base classifier with a known answer behind the Engine interface.

    ``denoise`` recovers the noisy scan exactly (x_t/√ᾱ_t, back in [0, 1] units and unclipped: x + δ),
    lets ``vote(z [B, S, S]) -> (class [B], finite [B])`` decide on it, and hands the vote to
    ``classify`` in pixel [0, 0] (NaN rows for non-finite outputs); so f(x + δ) = vote(x + δ)."""

    name = "toy"

    def __init__(self, vote, size: int = 8) -> None:
        self.vote = vote
        self.alphas_cumprod = COSINE
        self.size = size
        self.calls = 0

    def to_native(self, a: np.ndarray) -> np.ndarray:
        return a

    def to_numpy(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)

    def denoise(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        self.calls += 1
        ab = interp_alpha_bar(self.alphas_cumprod, t).reshape(-1, 1, 1, 1)
        noisy = (x_t / np.sqrt(ab) + 1) / 2  # x + δ, exactly (no clipping)
        cls, ok = self.vote(noisy[:, 0].astype(np.float64))
        out = np.full_like(x_t, -1.0)  # encode the vote in pixel [0, 0]: −1 → class 0, +1 → class 1
        out[:, 0, 0, 0] = np.where(cls == 1, 1.0, -1.0)
        out[~ok] = np.nan
        return out

    def classify(self, img: np.ndarray) -> np.ndarray:
        p1 = img[:, 0, 0, 0].astype(np.float32)
        return np.stack([1 - p1, p1], axis=1)


def linear_vote(w: np.ndarray, b: float):
    def vote(z: np.ndarray):
        return ((z * w).sum(axis=(1, 2)) + b > 0).astype(np.int64), np.ones(z.shape[0], bool)
    return vote


def _linear_case(size: int, radius: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """x in [0,1] [1,S,S], w, b with w·x + b = radius·‖w‖ (so the true smoothed radius is ``radius``)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 0.8, (1, size, size)).astype(np.float32)
    w = rng.standard_normal((size, size))
    b = radius * np.linalg.norm(w) - float((w * x[0].astype(np.float64)).sum())
    return x, w, b


def test_linear_classifier_certified_at_its_known_radius() -> None:
    """f(x) = [w·x + b > 0]: P(f(x + δ) = 1) = Φ((w·x + b)/(σ‖w‖)), so the smoothed radius is exactly
    (w·x + b)/‖w‖; CERTIFY must find it up to the Clopper–Pearson slack of n draws, and not exceed it."""
    sigma, r_true, n = 0.25, 0.4, 20_000
    x, w, b = _linear_case(8, r_true)
    eng = ToyEngine(linear_vote(w, b))
    c = DenoisedSmoothing(eng, ("neg", "pos")).certify(x, SmoothingConfig(sigma=sigma, n0=100, n=n, alpha=0.001,
                                                                          batch=512), seed=7)
    assert c.label == "pos" and c.top == "pos" and c.invalid == 0
    assert sum(c.counts.values()) == n and sum(c.counts0.values()) == 100
    p_true = NormalDist().cdf(r_true / sigma)
    sd = math.sqrt(p_true * (1 - p_true) / n)
    assert abs(c.counts["pos"] / n - p_true) < 5 * sd  # the toy sees exactly x + σ·ε
    r_min = sigma * NormalDist().inv_cdf(clopper_pearson_lower(int(n * (p_true - 5 * sd)), n, 0.001))
    assert r_min < c.radius <= r_true
    assert r_true - c.radius < 0.05
    assert c.radius == pytest.approx(sigma * NormalDist().inv_cdf(c.p_lower), rel=1e-12)
    assert c.p_lower == pytest.approx(stats.beta.ppf(0.001, c.counts["pos"], n - c.counts["pos"] + 1), rel=1e-9)
    assert abs(noise_level(COSINE, c.t) - 2 * sigma) < 1e-3
    assert eng.calls == math.ceil(100 / 512) + math.ceil(n / 512)  # one denoiser call per batch


def test_negative_side_certifies_the_other_class() -> None:
    x, w, b = _linear_case(8, -0.3, seed=1)
    c = DenoisedSmoothing(ToyEngine(linear_vote(w, b)), ("neg", "pos")).certify(
        x, SmoothingConfig(sigma=0.25, n0=50, n=5000, batch=1000), seed=3)
    assert c.label == "neg" and 0.2 < c.radius <= 0.3


def test_fifty_fifty_classifier_abstains() -> None:
    """On the decision boundary (w·x + b = 0) each class has probability ½: CERTIFY and PREDICT abstain."""
    x, w, b = _linear_case(8, 0.0, seed=2)
    sm = DenoisedSmoothing(ToyEngine(linear_vote(w, b)), ("neg", "pos"))
    cfg = SmoothingConfig(sigma=0.25, n0=100, n=1000, alpha=0.001, batch=250)
    c = sm.certify(x, cfg, seed=11)
    assert c.label is None and c.abstained and c.radius == 0.0 and c.p_lower < 0.5
    assert 400 < c.counts[c.top] < 600
    p = sm.predict(x, cfg, seed=11)
    assert p.label is None and p.p_value > 0.001 and sum(p.counts.values()) == 1000
    assert p.p_value == pytest.approx(stats.binomtest(max(p.counts.values()), 1000, 0.5).pvalue, rel=1e-9)


def test_predict_answers_far_from_the_boundary() -> None:
    x, w, b = _linear_case(8, 0.5, seed=4)
    p = DenoisedSmoothing(ToyEngine(linear_vote(w, b)), ("neg", "pos")).predict(
        x, SmoothingConfig(sigma=0.25, n=500, batch=100), seed=5)
    assert p.label == "pos" and p.p_value < 1e-6


def test_abstains_when_the_bound_is_at_most_half() -> None:
    """A vote of 60 % over n = 100 is a majority, but its 99.9 % lower bound is < ½: abstain."""
    assert clopper_pearson_lower(60, 100, 0.001) < 0.5 < clopper_pearson_lower(70, 100, 0.001)

    def vote(z: np.ndarray):  # class 1 where the noisy pixel [0, 0] is above the 40th percentile of x + δ
        return (z[:, 0, 0] > 0.5 + 0.25 * NormalDist().inv_cdf(0.4)).astype(np.int64), np.ones(len(z), bool)

    x = np.full((1, 8, 8), 0.5, np.float32)
    c = DenoisedSmoothing(ToyEngine(vote), ("a", "b")).certify(x, SmoothingConfig(sigma=0.25, n0=20, n=100), seed=0)
    assert c.top == "b" and 45 <= c.counts["b"] <= 75
    assert (c.label is None) == (clopper_pearson_lower(c.counts["b"], 100, 0.001) <= 0.5)


def test_non_finite_draws_vote_for_no_class() -> None:
    def vote(z: np.ndarray):  # always class 1, but the output is NaN where pixel [1, 1] is high (p ≈ ½)
        return np.ones(len(z), np.int64), z[:, 1, 1] < 0.5

    x = np.full((1, 8, 8), 0.5, np.float32)
    c = DenoisedSmoothing(ToyEngine(vote), ("a", "b")).certify(x, SmoothingConfig(sigma=0.25, n0=10, n=400), seed=1)
    assert 120 < c.invalid < 280 and c.counts["a"] == 0 and c.counts["b"] + c.invalid == 400
    assert c.p_lower == clopper_pearson_lower(c.counts["b"], 400, 0.001) and c.label is None


def test_replay_by_seed_and_independence_of_the_batch() -> None:
    x, w, b = _linear_case(8, 0.05, seed=5)
    sm = DenoisedSmoothing(ToyEngine(linear_vote(w, b)), ("neg", "pos"))

    def strip(c) -> dict:
        d = c.to_dict()
        del d["latency_ms"]
        return d

    a = sm.certify(x, SmoothingConfig(sigma=0.25, n0=30, n=300, batch=64), seed=123)
    again = sm.certify(x, SmoothingConfig(sigma=0.25, n0=30, n=300, batch=64), seed=a.seed)
    other_batch = sm.certify(x, SmoothingConfig(sigma=0.25, n0=30, n=300, batch=7), seed=123)
    other_seed = sm.certify(x, SmoothingConfig(sigma=0.25, n0=30, n=300, batch=64), seed=124)
    assert strip(a) == strip(again) == strip(other_batch)
    assert other_seed.counts != a.counts
    fresh = sm.certify(x, SmoothingConfig(sigma=0.25, n0=30, n=300), seed=None)
    assert 0 <= fresh.seed < 2**63
    assert strip(sm.certify(x, SmoothingConfig(sigma=0.25, n0=30, n=300), seed=fresh.seed)) == strip(fresh)
    json.loads(a.to_json())
    with pytest.raises(ValueError, match="seed"):
        sm.certify(x, SmoothingConfig(), seed=-1)


def test_refuses_input_that_is_not_one_preprocessed_scan() -> None:
    sm = DenoisedSmoothing(ToyEngine(linear_vote(np.ones((8, 8)), 0.0)), ("a", "b"))
    cfg = SmoothingConfig(n0=1, n=1)
    for bad in (np.zeros((2, 1, 8, 8), np.float32), np.zeros((8, 8), np.float32), np.zeros((1, 8, 8)),
                np.full((1, 8, 8), 1.5, np.float32), np.full((1, 8, 8), np.nan, np.float32)):
        with pytest.raises(ValueError):
            sm.certify(bad, cfg, seed=0)


def test_certified_accuracy() -> None:
    x, w, b = _linear_case(8, 0.3, seed=6)
    sm = DenoisedSmoothing(ToyEngine(linear_vote(w, b)), ("neg", "pos"))
    c = sm.certify(x, SmoothingConfig(sigma=0.25, n0=20, n=2000, batch=500), seed=0)
    assert c.label == "pos" and 0.2 < c.radius < 0.3
    acc = certified_accuracy([c, c], ["pos", "neg"], [0.0, 0.2, 0.3])
    assert acc == {0.0: 0.5, 0.2: 0.5, 0.3: 0.0}
    with pytest.raises(ValueError):
        certified_accuracy([c], ["pos", "neg"], [0.0])


def test_certified_accuracy_by_class_exposes_a_constant_vote() -> None:
    """A smoothed classifier that always says "neg" certifies every neg scan and no pos scan: pooled it
    still reads 50 % on a balanced set; within each class it reads 100 % and 0 %."""
    def cert(label: str | None, radius: float) -> Certificate:
        return Certificate(label=label, radius=radius, p_lower=0.99, top=label or "neg", counts0={}, counts={},
                           invalid=0, sigma=0.5, t=496.0, n0=1, n=1, alpha=0.001, seed=0, latency_ms={},
                           backend="toy")
    certs = [cert("neg", 1.2), cert("neg", 0.8), cert("neg", 1.1), cert(None, 0.0)]
    labels = ["neg", "neg", "pos", "pos"]
    assert certified_accuracy(certs, labels, [0.0, 1.0]) == {0.0: 0.5, 1.0: 0.25}
    by = certified_accuracy_by_class(certs, labels, [0.0, 1.0])
    assert list(by) == ["neg", "pos"]
    assert by == {"neg": {0.0: 1.0, 1.0: 0.5}, "pos": {0.0: 0.0, 1.0: 0.0}}
    with pytest.raises(ValueError):
        certified_accuracy_by_class(certs, labels[:3], [0.0])


# ----------------------------------------------------------------------------------------------
# the tiny bundle: Defender.certify, backends, CLI
@pytest.fixture(scope="module")
def bundle_path() -> Path:
    return cached_tiny_bundle()


@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    return (tiny_scans(1, 31)[0, 0] * 255).astype(np.uint8)


def test_defender_certify_backends_agree_and_replay(bundle_path: Path, scan: np.ndarray) -> None:
    kw = {"sigma": 0.25, "n0": 8, "n": 40, "alpha": 0.01, "seed": 99, "batch": 16}
    with Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1) as d_ort:
        a = d_ort.certify(scan, **kw)
        again = d_ort.certify(scan, **{**kw, "batch": 5})
        p = d_ort.smoothed_predict(scan, sigma=0.25, n=40, alpha=0.01, seed=99)
        # the base classifier by hand for the first selection draws: the same noise stream, one denoiser call
        sm = DenoisedSmoothing(d_ort.engine, d_ort.classes)
        from medfedpure.scan import preprocess
        x = preprocess(scan, d_ort.image_size)
        eps = np.random.Generator(np.random.Philox(key=(1 << 64) | 99)).standard_normal((8, 1, 32, 32),
                                                                                       dtype=np.float32)
        t = sigma_to_t(d_ort.engine.alphas_cumprod, 0.25)
        ab = float(interp_alpha_bar(d_ort.engine.alphas_cumprod, np.array([t], np.float32))[0])
        x_t = (np.float32(math.sqrt(ab)) * ((x[None] + np.float32(0.25) * eps) * 2 - 1)).astype(np.float32)
        x0 = d_ort.engine.denoise(x_t, np.full(8, t, np.float32))
        probs = d_ort.engine.classify(np.clip((x0 + 1) / 2, 0, 1).astype(np.float32))
        by_hand = np.bincount(probs.argmax(axis=1), minlength=2)
    with Defender.load(bundle_path, backend="torch", device="cpu") as d_torch:
        b = d_torch.certify(scan, **kw)
    assert a.backend == "onnxruntime" and b.backend == "torch"
    assert a.bundle_id == b.bundle_id and a.t == b.t and a.sigma == 0.25 and a.n == 40 and a.n0 == 8
    assert [a.counts0[c] for c in ("no_tumor", "tumor")] == by_hand.tolist()
    assert sm.base_votes(x, eps, 0.25, t).tolist() == probs.argmax(axis=1).tolist()
    for k in ("label", "radius", "p_lower", "top", "counts0", "counts", "invalid", "seed"):
        assert getattr(a, k) == getattr(b, k), k
        assert getattr(a, k) == getattr(again, k), k
    assert sum(a.counts.values()) == 40 and a.invalid == 0
    assert p.n == 40 and sum(p.counts.values()) == 40 and p.bundle_id == a.bundle_id
    with Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1) as d:
        for bad in ({"sigma": -0.1}, {"n": 0}, {"alpha": 0.7}, {"sigma": 1e6}):
            with pytest.raises(ValueError):
                d.certify(scan, **{**kw, **bad})


def test_cli_certify(bundle_path: Path, scan: np.ndarray, tmp_path: Path) -> None:
    from medfedpure.cli import app
    from typer.testing import CliRunner

    png = tmp_path / "s.png"
    Image.fromarray(scan).save(png)
    runner = CliRunner()
    args = ["certify", str(png), "--bundle", str(bundle_path), "--sigma", "0.25", "--n0", "8", "--n", "40",
            "--alpha", "0.01", "--seed", "99", "--threads", "1", "--backend", "onnxruntime", "--device", "cpu"]
    res = runner.invoke(app, [*args, "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])
    with Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=1) as d:
        ref = d.certify(png, sigma=0.25, n0=8, n=40, alpha=0.01, seed=99)
    assert row["scan"] == str(png)
    for k in ("label", "radius", "p_lower", "counts0", "counts", "seed", "t", "n0", "n", "alpha", "sigma"):
        assert row[k] == getattr(ref, k), k
    res = runner.invoke(app, args)  # the table (progress bar on stderr)
    assert res.exit_code == 0 and "p_A lower" in res.output and f"{ref.p_lower:.4f}" in res.output
    for bad in (["--sigma", "0"], ["--n", "0"], ["--alpha", "0.9"]):
        res = runner.invoke(app, [*args, *bad])
        assert res.exit_code == 2 and "error:" in res.output
    res = runner.invoke(app, ["certify", str(tmp_path / "missing.png"), "--bundle", str(bundle_path)])
    assert res.exit_code == 2
