"""Certified ℓ2 robustness by denoised randomized smoothing with the bundle's own diffusion denoiser.

The smoothed classifier (Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
Smoothing", ICML 2019) is g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ² I), on the preprocessed scan
x ∈ [0, 1] [1, S, S] (the model input space). Its base classifier f is the bundle's one-shot
denoise-then-classify pipeline (Carlini et al., "(Certified!!) Adversarial Robustness for Free!",
ICLR 2023):

1. x + σ·ε lives in [0, 1] space; the diffusion works in y = 2x − 1, where that noise is 2σ·ε;
2. the diffusion time t is the one whose EDM noise level √((1 − ᾱ_t)/ᾱ_t) equals 2σ
   (:func:`sigma_to_t`, fractional t on the manifest's ᾱ table, as ``runtime.sampler`` interpolates it);
   then √ᾱ_t·(y + 2σ·ε) = √ᾱ_t·y + √(1 − ᾱ_t)·ε is exactly a forward-noised x_t (DDPM eq. 4);
3. one denoiser call x̂₀ = denoise(x_t, t) (the student's x0-prediction, no further sampling steps);
4. the classifier on clip((x̂₀ + 1)/2, 0, 1); f's vote is the arg-max class.

CERTIFY: n0 draws pick the top class ĉ; n fresh draws count it (k); p_A's one-sided lower confidence
bound at level 1 − α is the Clopper–Pearson bound (:func:`clopper_pearson_lower`); when it exceeds ½,
g(x') = ĉ for every ‖x' − x‖₂ < R = σ·Φ⁻¹(p_lower) with probability ≥ 1 − α over the draws (Cohen et
al., Theorem 1); otherwise the procedure abstains. PREDICT (:meth:`DenoisedSmoothing.predict`):
n draws, the two most frequent classes A and B; g(x) = A when the two-sided binomial test of
n_A against n_A + n_B at ½ has p-value ≤ α, else abstain (wrong with probability ≤ α).

The statistics are computed here without scipy (the runtime's core dependencies do not include it):
exact binomial tails from log-binomial coefficients, the Clopper–Pearson bound by bisection on them,
Φ⁻¹ from :class:`statistics.NormalDist`. The tests hold them to ``scipy.stats``.

Keyed noise: the draws of one call come from ``numpy.random.Philox`` keyed by the seed and the phase
(selection, estimation, prediction each have their own stream), in a fixed order, so a certificate
depends only on its seed — not on the batch size or the backend's batching — and is replayed exactly
by passing ``Certificate.seed`` back. ``seed=None`` draws a fresh one from the OS (and records it).

A draw whose denoiser or classifier output is not finite votes for no class: it is counted in
``invalid`` and in n, never in k, which can only lower the bound (the certificate stays sound).

Only the :class:`~medfedpure.runtime.engines.base.Engine` interface is used (``denoise``, ``classify``,
``to_native``, ``to_numpy``), so every backend certifies, batched.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from medfedpure.runtime.sampler import interp_alpha_bar

__all__ = [
    "Certificate",
    "DenoisedSmoothing",
    "SmoothedPrediction",
    "SmoothingConfig",
    "binom_test_half",
    "certified_accuracy",
    "certified_accuracy_by_class",
    "clopper_pearson_lower",
    "default_batch",
    "noise_level",
    "sigma_to_t",
]

_SEED_MAX = (1 << 63) - 1
#: Philox key domains (bits 64+ of the 128-bit key): one independent stream per phase of a call
_STREAM = {"select": 1, "estimate": 2, "predict": 3}
#: draws per engine call when none is given: TensorRT plans are built for batches 1–8
_DEFAULT_BATCH = 50
_ENGINE_MAX_BATCH = {"tensorrt": 8}

#: ``progress(phase, done, total)``: called after each batch; phase is "select", "estimate" or "predict"
Progress = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------------------------
# statistics (no scipy)
def _check_counts(k: int, n: int) -> None:
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name}={v!r}: expected an int")
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"k={k}, n={n}: need 0 <= k <= n and n >= 1")


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < float(alpha) < 0.5:
        raise ValueError(f"alpha={alpha!r}: expected a float in (0, 0.5) (the certificate's failure probability)")
    return float(alpha)


def _log_binom_coeffs(n: int) -> np.ndarray:
    """log C(n, j), j = 0..n, float64 [n + 1] (a cumulative sum of log((n − j + 1)/j))."""
    j = np.arange(1, n + 1, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(np.log(n - j + 1) - np.log(j))])


def _logsumexp(a: np.ndarray) -> float:
    if a.size == 0:
        return -math.inf
    m = float(a.max())
    if m == -math.inf:
        return -math.inf
    return m + math.log(float(np.exp(a - m).sum()))


def _binom_sf(k: int, n: int, p: float, log_c: np.ndarray) -> float:
    """P(X ≥ k), X ~ Binomial(n, p), 0 < p < 1; sums the shorter side (float64)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    j = np.arange(n + 1, dtype=np.float64)
    if n - k + 1 <= k:  # upper tail directly
        sl = slice(k, n + 1)
        return math.exp(_logsumexp(log_c[sl] + j[sl] * math.log(p) + (n - j[sl]) * math.log1p(-p)))
    sl = slice(0, k)  # 1 − P(X ≤ k − 1)
    return max(0.0, 1.0 - math.exp(_logsumexp(log_c[sl] + j[sl] * math.log(p) + (n - j[sl]) * math.log1p(-p))))


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """The one-sided Clopper–Pearson lower bound on a binomial proportion at level 1 − α.

    The p_L with P(Binomial(n, p_L) ≥ k) = α, i.e. the α-quantile of Beta(k, n − k + 1) — what
    ``scipy.stats.beta.ppf(alpha, k, n - k + 1)`` and ``scipy.stats.binomtest(k, n).proportion_ci(
    confidence_level=1 - 2 * alpha, method="exact").low`` return (0 when k = 0; α^(1/n) when k = n).
    Found by bisection on the exact binomial tail, which increases with p; so the runtime needs no scipy.

    Args:
        k: successes, 0 ≤ k ≤ n.
        n: trials, n ≥ 1.
        alpha: one-sided level in (0, 0.5).
    """
    _check_counts(k, n)
    alpha = _check_alpha(alpha)
    if k == 0:
        return 0.0
    log_c = _log_binom_coeffs(n)
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _binom_sf(k, n, mid, log_c) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def binom_test_half(k: int, n: int) -> float:
    """Two-sided exact binomial test of k successes in n trials against p = ½: the p-value.

    By symmetry, min(1, 2·P(X ≤ min(k, n − k))), X ~ Binomial(n, ½) — what
    ``scipy.stats.binomtest(k, n, 0.5).pvalue`` returns. n = 0 gives 1 (no evidence).
    """
    if n == 0:
        return 1.0
    _check_counts(k, n)
    m = min(k, n - k)
    log_c = _log_binom_coeffs(n)
    return min(1.0, 2.0 * math.exp(_logsumexp(log_c[: m + 1] - n * math.log(2.0))))


# ----------------------------------------------------------------------------------------------
# σ → diffusion time
def noise_level(alphas_cumprod: np.ndarray, t: float) -> float:
    """The EDM noise level √((1 − ᾱ_t)/ᾱ_t) at fractional time ``t`` (ᾱ as the runtime's sampler
    interpolates it: :func:`medfedpure.runtime.sampler.interp_alpha_bar`, float32)."""
    ab = float(interp_alpha_bar(np.asarray(alphas_cumprod, dtype=np.float64), np.array([t], np.float32))[0])
    return math.sqrt((1.0 - ab) / ab)


def sigma_to_t(alphas_cumprod: np.ndarray, sigma: float) -> float:
    """The fractional diffusion time whose noise level is 2σ (the purifier's y = 2x − 1 doubles σ).

    Solves √((1 − ᾱ_t)/ᾱ_t) = 2σ, i.e. ᾱ_t = 1/(1 + 4σ²), on the piecewise-linear ᾱ of the table
    ``alphas_cumprod`` [T + 1] (ᾱ_0 = 1, non-increasing) — the inverse of :func:`noise_level`.

    Raises:
        ValueError: σ ≤ 0, or 2σ beyond the schedule's largest noise level (ᾱ_T).
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma={sigma!r}: expected a positive finite noise level (in [0, 1] image units)")
    table = np.asarray(alphas_cumprod, dtype=np.float64)
    target = 1.0 / (1.0 + 4.0 * float(sigma) ** 2)
    if target < table[-1]:
        top = math.sqrt((1 - table[-1]) / table[-1]) / 2
        raise ValueError(f"sigma={sigma}: beyond the diffusion schedule's largest noise level (σ ≤ {top:.4g} "
                         "in image units); use a smaller sigma")
    # first index whose ᾱ is ≤ target: the segment [lo, lo + 1] holds the crossing
    hi = int(np.argmax(table <= target))
    if hi == 0:  # target ≥ ᾱ_0 = 1 cannot happen for σ > 0; kept for a malformed table
        return 0.0
    lo = hi - 1
    a0, a1 = table[lo], table[hi]
    frac = 0.0 if a0 == a1 else (a0 - target) / (a0 - a1)
    return float(lo + frac)


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmoothingConfig:
    """The smoothing and the Monte-Carlo budget of CERTIFY / PREDICT.

    Attributes:
        sigma: σ of the Gaussian noise in [0, 1] image units (> 0); certified radii are in the same
            units (ℓ2 over the S×S preprocessed scan).
        n0: selection draws (CERTIFY picks ĉ from them), ≥ 1.
        n: estimation draws (CERTIFY's count of ĉ; PREDICT's draws), ≥ 1.
        alpha: failure probability of the certificate / prediction, in (0, 0.5).
        batch: draws per engine call, ≥ 1 (memory and speed only: the answer does not depend on it).
    """

    sigma: float = 0.25
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    batch: int = _DEFAULT_BATCH

    def __post_init__(self) -> None:
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not (
                math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma={self.sigma!r}: expected a positive finite noise level")
        for name in ("n0", "n", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an int >= 1")
        _check_alpha(self.alpha)


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer for one scan; JSON-serialisable, replayed exactly by ``seed``.

    Attributes:
        label: the certified class ĉ, or None when the procedure abstains.
        radius: σ·Φ⁻¹(p_lower): g is constant (= label) on the open ℓ2 ball of this radius around the
            preprocessed scan, with probability ≥ 1 − α; 0.0 when abstaining.
        p_lower: the Clopper–Pearson lower bound on P(f(x + δ) = ĉ).
        top: ĉ, the class selected from the n0 draws (also when abstaining).
        counts0: class → votes in the n0 selection draws.
        counts: class → votes in the n estimation draws.
        invalid: estimation draws with a non-finite denoiser or classifier output (voting for no class).
        sigma, t: the noise level and the diffusion time it maps to (:func:`sigma_to_t`).
        n0, n, alpha, seed: the procedure's parameters and the key of its noise.
        latency_ms: ``select``, ``estimate`` and ``total`` wall time.
        backend, bundle_id: what ran it (bundle_id None when certified on a bare engine).
    """

    label: str | None
    radius: float
    p_lower: float
    top: str
    counts0: dict[str, int]
    counts: dict[str, int]
    invalid: int
    sigma: float
    t: float
    n0: int
    n: int
    alpha: float
    seed: int
    latency_ms: dict[str, float]
    backend: str
    bundle_id: str | None = None

    @property
    def abstained(self) -> bool:
        return self.label is None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)


@dataclass(frozen=True)
class SmoothedPrediction:
    """PREDICT's answer for one scan: g(x), or None when the vote is too close to call at level α.

    Attributes:
        label: the top class A, or None (abstain) when the binomial test of n_A against n_A + n_B
            at ½ has p-value > α.
        p_value: that test's p-value.
        counts: class → votes in the n draws; invalid: draws voting for no class.
        sigma, t, n, alpha, seed, latency_ms, backend, bundle_id: as in :class:`Certificate`.
    """

    label: str | None
    p_value: float
    counts: dict[str, int]
    invalid: int
    sigma: float
    t: float
    n: int
    alpha: float
    seed: int
    latency_ms: dict[str, float]
    backend: str
    bundle_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)


def default_batch(engine: Any) -> int:
    """Draws per engine call for ``engine``: 50, or what its graphs allow (TensorRT: 8)."""
    return min(_DEFAULT_BATCH, _ENGINE_MAX_BATCH.get(getattr(engine, "name", ""), _DEFAULT_BATCH))


def _seed(seed: Any) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") & _SEED_MAX
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _SEED_MAX:
        raise ValueError(f"seed={seed!r}: expected an int in [0, 2**63 - 1] or None")
    return int(seed)


def _stream(seed: int, phase: str) -> np.random.Generator:
    """The keyed noise stream of one phase: Philox with the 128-bit key (phase << 64) | seed."""
    return np.random.Generator(np.random.Philox(key=(_STREAM[phase] << 64) | seed))


class DenoisedSmoothing:
    """Denoised smoothing of an engine's denoiser + classifier (see the module docstring).

    Args:
        engine: any backend (only ``denoise``, ``classify``, ``to_native``, ``to_numpy`` are used).
        classes: class names in label order (the classifier's output columns).
        alphas_cumprod: the purifier's ᾱ table [T + 1] (defaults to ``engine.alphas_cumprod``).
    """

    def __init__(self, engine: Any, classes: Sequence[str], alphas_cumprod: np.ndarray | None = None) -> None:
        self.engine = engine
        self.classes = tuple(classes)
        if len(self.classes) < 2:
            raise ValueError(f"classes={classes!r}: need at least two classes")
        table = engine.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
        self.alphas_cumprod = np.asarray(table, dtype=np.float64)

    # the base classifier f ------------------------------------------------------------------
    def base_votes(self, x: np.ndarray, eps: np.ndarray, sigma: float, t: float) -> np.ndarray:
        """f(x + σ·ε) for a batch of noise: int64 [B] class indices, −1 for a non-finite output.

        Args:
            x: [1, S, S] float32 preprocessed scan in [0, 1].
            eps: [B, 1, S, S] float32 standard normal noise.
            sigma: σ in image units; t: the diffusion time of noise level 2σ.
        """
        eng = self.engine
        b = eps.shape[0]
        t32 = np.full(b, t, dtype=np.float32)
        ab = interp_alpha_bar(self.alphas_cumprod, t32).reshape(-1, 1, 1, 1)
        noisy = x[None] + np.float32(sigma) * eps  # x + δ in image space
        x_t = (np.sqrt(ab) * (noisy * np.float32(2) - np.float32(1))).astype(np.float32)
        x0 = eng.to_numpy(eng.denoise(eng.to_native(np.ascontiguousarray(x_t)), eng.to_native(t32)))
        img = np.clip((x0.astype(np.float32) + 1) / 2, 0, 1).astype(np.float32)
        probs = eng.to_numpy(eng.classify(eng.to_native(np.ascontiguousarray(img)))).astype(np.float64)
        ok = np.isfinite(x0.reshape(b, -1)).all(axis=1) & np.isfinite(probs).all(axis=1)
        return np.where(ok, np.argmax(np.nan_to_num(probs, nan=-np.inf), axis=1), -1).astype(np.int64)

    def sample_counts(self, x: np.ndarray, num: int, sigma: float, t: float, gen: np.random.Generator,
                      batch: int, phase: str = "estimate", progress: Progress | None = None) -> np.ndarray:
        """Votes of ``num`` draws: int64 [C + 1], class counts then the invalid draws (last)."""
        counts = np.zeros(len(self.classes) + 1, dtype=np.int64)
        s = x.shape[-1]
        done = 0
        while done < num:
            b = min(batch, num - done)
            eps = gen.standard_normal((b, 1, s, s), dtype=np.float32)
            votes = self.base_votes(x, eps, sigma, t)
            counts += np.bincount(np.where(votes < 0, len(self.classes), votes), minlength=len(self.classes) + 1)
            done += b
            if progress is not None:
                progress(phase, done, num)
        return counts

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] != x.shape[2]:
            raise ValueError(f"x has shape {x.shape}: expected one preprocessed scan [1, S, S] "
                             "(medfedpure.preprocess output)")
        if x.dtype != np.float32 or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError("x must be float32, finite and in [0, 1]: use medfedpure.preprocess")
        return np.ascontiguousarray(x)

    # CERTIFY / PREDICT -------------------------------------------------------------------------
    def certify(self, x: np.ndarray, cfg: SmoothingConfig, *, seed: int | None = None,
                progress: Progress | None = None, bundle_id: str | None = None) -> Certificate:
        """CERTIFY (Cohen et al., Algorithm "certify") on one preprocessed scan ``x`` [1, S, S]."""
        t0 = time.perf_counter()
        x = self._prepare(x)
        key = _seed(seed)
        t = sigma_to_t(self.alphas_cumprod, cfg.sigma)
        c = len(self.classes)
        counts0 = self.sample_counts(x, cfg.n0, cfg.sigma, t, _stream(key, "select"), cfg.batch, "select", progress)
        top = int(np.argmax(counts0[:c]))  # ties: the lower class index
        t1 = time.perf_counter()
        counts = self.sample_counts(x, cfg.n, cfg.sigma, t, _stream(key, "estimate"), cfg.batch, "estimate",
                                    progress)
        t2 = time.perf_counter()
        p_lower = clopper_pearson_lower(int(counts[top]), cfg.n, cfg.alpha)
        certified = p_lower > 0.5
        radius = cfg.sigma * NormalDist().inv_cdf(p_lower) if certified else 0.0
        t3 = time.perf_counter()
        return Certificate(
            label=self.classes[top] if certified else None, radius=float(radius), p_lower=float(p_lower),
            top=self.classes[top], counts0={n: int(v) for n, v in zip(self.classes, counts0[:c], strict=True)},
            counts={n: int(v) for n, v in zip(self.classes, counts[:c], strict=True)}, invalid=int(counts[c]),
            sigma=float(cfg.sigma), t=t, n0=int(cfg.n0), n=int(cfg.n), alpha=float(cfg.alpha), seed=key,
            latency_ms={"select": round((t1 - t0) * 1e3, 4), "estimate": round((t2 - t1) * 1e3, 4),
                        "total": round((t3 - t0) * 1e3, 4)},
            backend=str(getattr(self.engine, "name", type(self.engine).__name__)), bundle_id=bundle_id)

    def predict(self, x: np.ndarray, cfg: SmoothingConfig, *, seed: int | None = None,
                progress: Progress | None = None, bundle_id: str | None = None) -> SmoothedPrediction:
        """PREDICT (Cohen et al., Algorithm "predict") on one preprocessed scan ``x`` [1, S, S] (n draws;
        ``cfg.n0`` is not used)."""
        t0 = time.perf_counter()
        x = self._prepare(x)
        key = _seed(seed)
        t = sigma_to_t(self.alphas_cumprod, cfg.sigma)
        c = len(self.classes)
        counts = self.sample_counts(x, cfg.n, cfg.sigma, t, _stream(key, "predict"), cfg.batch, "predict", progress)
        order = sorted(range(c), key=lambda i: (-int(counts[i]), i))
        n_a, n_b = int(counts[order[0]]), int(counts[order[1]])
        p_value = binom_test_half(n_a, n_a + n_b)
        return SmoothedPrediction(
            label=self.classes[order[0]] if p_value <= cfg.alpha else None, p_value=float(p_value),
            counts={n: int(v) for n, v in zip(self.classes, counts[:c], strict=True)}, invalid=int(counts[c]),
            sigma=float(cfg.sigma), t=t, n=int(cfg.n), alpha=float(cfg.alpha), seed=key,
            latency_ms={"total": round((time.perf_counter() - t0) * 1e3, 4)},
            backend=str(getattr(self.engine, "name", type(self.engine).__name__)), bundle_id=bundle_id)


def certified_accuracy(certs: Sequence[Certificate], labels: Sequence[str],
                       radii: Sequence[float]) -> dict[float, float]:
    """Certified accuracy at each radius r: the fraction of scans certified with the true label and
    radius ≥ r (Cohen et al.; an abstention never counts). ``labels``: the true class names."""
    if len(certs) != len(labels) or not certs:
        raise ValueError(f"{len(certs)} certificates for {len(labels)} labels: need one label per certificate")
    return {float(r): sum(c.label == y and c.radius >= r for c, y in zip(certs, labels, strict=True)) / len(certs)
            for r in radii}


def certified_accuracy_by_class(certs: Sequence[Certificate], labels: Sequence[str],
                                radii: Sequence[float]) -> dict[str, dict[float, float]]:
    """:func:`certified_accuracy` within each true class (class name → radius → the fraction of that
    class's scans certified with it at ≥ r), classes in order of first appearance in ``labels``.

    Report it beside the pooled figure: a smoothed classifier that votes one class for almost every
    noisy draw certifies that class's scans at large radii and the other class's at none, and on a
    balanced set its pooled certified accuracy still looks like half the scans (for a tumour classifier,
    certified sensitivity near 0). The smallest entry at a radius is the worst-class certified accuracy.
    """
    if len(certs) != len(labels) or not certs:
        raise ValueError(f"{len(certs)} certificates for {len(labels)} labels: need one label per certificate")
    out: dict[str, dict[float, float]] = {}
    for cls in dict.fromkeys(labels):
        idx = [i for i, y in enumerate(labels) if y == cls]
        out[cls] = certified_accuracy([certs[i] for i in idx], [cls] * len(idx), radii)
    return out
