"""The guarded classifier a vendor embeds: ``Defender.load(bundle).run(scan) -> Result``.

Orchestration only (no model maths here — that lives in :mod:`medfedpure.runtime.engines`)::

    load_scan → preprocess → x [B,1,S,S]
      → MAE (K scoring mask sets) → recon [B,K,S,S]
      → fused gate → score, flag, t*          (t* = 0: not purified; policy "floor": t* ≥ t_min)
      → rows with t* > 0: noise to t* with the keyed RNG, K-step student sampler   ("purify")
      → classifier on the purified rows and the untouched (early-exit) rows      ("classify")

With ``overlap`` (the default on onnxruntime) the classifier also runs on x in a second thread
while the MAE runs; when the gate purifies nothing that answer is the classification, otherwise
it is discarded and the classifier runs as above.

Keyed RNG: each scan's purification noise is drawn from ``numpy.random.Philox(key=seed)``
(a counter-based generator keyed by the seed), so a scan's noise depends only on its own seed —
not on its batch, its position or the backend — and ``Result.seed`` replays a decision exactly.
``seed=None`` draws a fresh 63-bit seed from ``os.urandom`` (an attacker cannot predict the
noise) and records it.

Fail closed: an exception in a model stage, a stage returning non-finite values, or the time
budget running out gives ``status="unverified"`` with a ``reason`` and no label for the scans
concerned (in a mixed batch, a purifier failure affects only the purified rows). Bad input
raises the :class:`medfedpure.scan.ScanError` family before any model runs; the caller's data
is never modified.

Latency: ``Result.latency_ms`` holds the wall time of each stage (load, preprocess, mae, gate,
purify, classify) and ``total`` for the call that produced it; for :meth:`Defender.run_batch`
these are the batch's stage times (shared by its Results).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfedpure.runtime.bundle import VerifiedBundle, default_bundle_path, verify_bundle
from medfedpure.runtime.engines import Engine, create_engine

STAGES = ("load", "preprocess", "mae", "gate", "purify", "classify")
STATUS_OK = "ok"
STATUS_UNVERIFIED = "unverified"
POLICIES = ("adaptive", "floor")  # gate policies (docs/design.md, "Policies")
_SEED_MAX = (1 << 63) - 1


@dataclass
class Result:
    """One scan's decision, serialisable for the audit log (no patient identifiers).

    Attributes:
        label: ``"no_tumor"`` / ``"tumor"``; None when unverified.
        probabilities: class → probability (sums to 1); empty when unverified.
        flagged: the gate's flag (score ≥ τ); None when the gate did not run.
        score: the gate's score; None when the gate did not run.
        t_star: purification strength used (0: not purified); None when the gate did not run.
        status: ``"ok"`` or ``"unverified"``.
        reason: why the status is unverified (stage and error), else None.
        seed: the key of the purification RNG (replays the decision exactly).
        latency_ms: stage → milliseconds, and ``"total"``.
        backend / device / precision: the engine that ran it.
        bundle_id: sha256 of the bundle's manifest.
        purified: [1, S, S] float32 image the classifier saw (on request; equals the input when
            t* = 0).
        patch_error: [Np] float32 per-patch reconstruction error (on request).
    """

    label: str | None
    probabilities: dict[str, float]
    flagged: bool | None
    score: float | None
    t_star: int | None
    status: str
    reason: str | None
    seed: int
    latency_ms: dict[str, float]
    backend: str
    device: str
    precision: str
    bundle_id: str
    purified: np.ndarray | None = field(default=None, repr=False)
    patch_error: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; arrays (when present) become nested lists."""
        d = {k: getattr(self, k) for k in ("label", "probabilities", "flagged", "score", "t_star", "status",
                                           "reason", "seed", "latency_ms", "backend", "device", "precision",
                                           "bundle_id")}
        d["purified"] = None if self.purified is None else self.purified.tolist()
        d["patch_error"] = None if self.patch_error is None else self.patch_error.tolist()
        return d

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)


def fresh_seed() -> int:
    """A 63-bit seed from the OS's CSPRNG (fits JSON integers and int64)."""
    return int.from_bytes(os.urandom(8), "little") & _SEED_MAX


def purification_noise(seed: int, size: int) -> np.ndarray:
    """The keyed noise of one scan: float32 [1, S, S] standard normal from Philox(key=seed)."""
    return np.random.Generator(np.random.Philox(key=int(seed))).standard_normal((1, size, size), dtype=np.float32)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _SEED_MAX:
        raise ValueError(f"seed={seed!r}: expected an int in [0, 2**63 - 1] or None")
    return int(seed)


def _check_policy(policy: Any) -> None:
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: expected None (the bundle's), {' or '.join(map(repr, POLICIES))}")


class _Failures:
    """Per-row failure reasons (first one wins)."""

    def __init__(self, n: int) -> None:
        self.reason: list[str | None] = [None] * n

    def fail(self, rows: Sequence[int] | np.ndarray, why: str) -> None:
        for r in np.asarray(rows, dtype=np.int64).tolist():
            if self.reason[r] is None:
                self.reason[r] = why

    def alive(self) -> np.ndarray:
        return np.array([r is None for r in self.reason], dtype=bool)


class Defender:
    """Guarded brain-MRI classification from a verified bundle.

    Args:
        bundle: a verified bundle (:func:`medfedpure.runtime.bundle.verify_bundle`).
        engine: a backend built for it (:func:`medfedpure.runtime.engines.create_engine`).
        timeout_s: budget per call; exceeded between stages → the unfinished scans are unverified.
        overlap: classify the scans speculatively in a second thread while the detector runs, and
            keep that answer when no scan of the call is purified (the early-exit path then costs
            about max(detector, classifier) instead of their sum). ``None``: on when the engine
            allows it (``Engine.overlap_classify``: onnxruntime). The Results are the same either
            way (tested); ``latency_ms["classify"]`` is then the wait for the classifier after the gate.
        policy: the gate policy. ``None`` keeps the bundle's (recorded at calibration). ``"adaptive"``
            lets unflagged scans skip the purifier. ``"floor"`` purifies every scan at t_min or more,
            and a flag raises t* further. Against an attacker who shapes perturbations to stay under
            τ, ``floor`` is the safer choice, at the latency of the purified path
            (benchmarks/RESULTS.md, "Robustness"). Passed to every gate call; the engine is not changed.
    """

    def __init__(self, bundle: VerifiedBundle, engine: Engine, *, timeout_s: float | None = 30.0,
                 overlap: bool | None = None, policy: str | None = None) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}: expected a positive number of seconds or None")
        if overlap is not None and not isinstance(overlap, bool):
            raise TypeError(f"overlap={overlap!r}: expected True, False or None")
        if overlap and not engine.overlap_classify:
            raise ValueError(f"overlap=True, but the {engine.name} engine cannot run two stages at once")
        _check_policy(policy)
        self.bundle = bundle
        self.engine = engine
        self.timeout_s = timeout_s
        self.overlap = engine.overlap_classify if overlap is None else overlap
        self._pool: ThreadPoolExecutor | None = None
        self.classes = bundle.classes
        # The bundle's preprocessing section, validated on load: a bundle asking for a
        # preprocessing other than medfedpure.scan.preprocess's is refused before this point.
        self.preprocessing = bundle.spec.preprocessing
        self.image_size = self.preprocessing.size
        self._policy = policy  # None: the engine's calibrated gate policy

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str = "auto", device: str = "auto", *,
             expected_id: str | None = None, timeout_s: float | None = 30.0, overlap: bool | None = None,
             policy: str | None = None, **engine_options: Any) -> Defender:
        """Verify the bundle at ``path`` (every hash, before any parser) and build a backend.

        Args:
            backend: ``"auto"`` / ``"onnxruntime"`` / ``"torch"`` / ``"tensorrt"``.
            device: ``"auto"`` / ``"cpu"`` / ``"cuda"``.
            expected_id: pin the bundle (sha256 of its manifest, or a ≥ 16-digit prefix).
            timeout_s, overlap, policy: as in :class:`Defender`.
            engine_options: ``precision``, ``threads``, ``cuda_graphs`` (torch).
        """
        bundle = verify_bundle(path, expected_id=expected_id)
        _check_policy(policy)  # before any backend is built
        return cls(bundle, create_engine(bundle, backend, device, **engine_options), timeout_s=timeout_s,
                   overlap=overlap, policy=policy)

    @classmethod
    def default(cls, backend: str = "auto", device: str = "auto", **kwargs: Any) -> Defender:
        """The embedded default bundle (trained by the project's pipeline on synthetic data)."""
        path = default_bundle_path()
        if not (Path(path) / "manifest.json").is_file():
            raise FileNotFoundError(f"the embedded default bundle is missing at {path}: run `make bundle`")
        return cls.load(path, backend, device, **kwargs)

    @property
    def policy(self) -> str:
        """The gate policy in force: the one given to the Defender, else the bundle's calibrated one."""
        return self._policy or self.engine.gate_spec.policy

    def close(self) -> None:
        """Stop the speculative-classification thread (idempotent; a later run starts it again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Defender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    def run(self, scan: Any, *, seed: int | None = None, return_purified: bool = False,
            return_patch_error: bool = False) -> Result:
        """Classify one scan (anything :func:`medfedpure.load_scan` accepts, or a ``Scan``)."""
        return self.run_batch([scan], seeds=None if seed is None else [seed], return_purified=return_purified,
                              return_patch_error=return_patch_error)[0]

    def run_batch(self, scans: Sequence[Any], *, seeds: Sequence[int | None] | None = None,
                  return_purified: bool = False, return_patch_error: bool = False) -> list[Result]:
        """Classify a batch; only the flagged members (or all, with policy ``floor``) are purified."""
        from medfedpure.scan import load_scan, preprocess

        t0 = time.perf_counter()
        if isinstance(scans, (str, bytes, np.ndarray)) or not isinstance(scans, Sequence):
            raise TypeError("run_batch takes a sequence of scans (a list); for one scan use run()")
        lat: dict[str, float] = {}
        loaded = [load_scan(s) for s in scans]
        lat["load"] = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        x = np.stack([preprocess(s, self.preprocessing.size) for s in loaded]) if loaded else None
        lat["preprocess"] = (time.perf_counter() - t1) * 1e3
        if x is None:
            return []
        return self._run(x, seeds, lat, t0, return_purified, return_patch_error)

    def run_array(self, x: np.ndarray, *, seeds: Sequence[int | None] | None = None, return_purified: bool = False,
                  return_patch_error: bool = False) -> list[Result]:
        """Classify already-preprocessed scans ``x`` [B, 1, S, S] float32 in [0, 1] (benchmarks, attacks)."""
        from medfedpure.scan import ScanDtypeError, ScanNonFiniteError, ScanShapeError

        t0 = time.perf_counter()
        s = self.image_size
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise ScanDtypeError(f"x must be a float32 numpy array, got {type(x).__name__} "
                                 f"{getattr(x, 'dtype', '')}: use medfedpure.preprocess")
        if x.ndim != 4 or x.shape[1:] != (1, s, s) or x.shape[0] < 1:
            raise ScanShapeError(f"x has shape {x.shape}: expected [B, 1, {s}, {s}] (medfedpure.preprocess output)")
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ScanNonFiniteError("x must be finite and in [0, 1]: use medfedpure.preprocess")
        lat = {"load": 0.0, "preprocess": 0.0}
        return self._run(x.copy(), seeds, lat, t0, return_purified, return_patch_error)

    # ------------------------------------------------------------------------------------------
    def _run(self, x: np.ndarray, seeds: Sequence[int | None] | None, lat: dict[str, float], t0: float,
             return_purified: bool, return_patch_error: bool) -> list[Result]:
        eng = self.engine
        b, s = x.shape[0], self.image_size
        if seeds is None:
            seeds = [None] * b
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for {b} scans: give one seed (or None) per scan")
        keys = [fresh_seed() if sd is None else _check_seed(sd) for sd in seeds]
        deadline = None if self.timeout_s is None else t0 + self.timeout_s
        fails = _Failures(b)
        all_rows = np.arange(b)
        score = flag = t_star_np = patch_err = None
        probs_np = None
        x_cls_np = None
        for name in ("mae", "gate", "purify", "classify"):
            lat[name] = 0.0

        def timed_out(after: str) -> bool:
            if deadline is not None and time.perf_counter() > deadline:
                fails.fail(all_rows, f"timeout: the {self.timeout_s:g} s budget ran out after the {after} stage")
                return True
            return False

        def stage_error(stage: str, e: BaseException) -> str:
            return f"{stage} failed: {type(e).__name__}: {e}"

        xn = eng.to_native(x)
        # 0. speculative classification of the inputs, alongside the detector (see ``overlap``)
        spec: Future | None = None
        if self.overlap:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medfedpure-classify")
            spec = self._pool.submit(eng.classify, xn)
        # 1. detector --------------------------------------------------------------------------
        ts = time.perf_counter()
        try:
            recon = eng.mae(xn)
            bad = ~eng.finite_rows(recon)
            fails.fail(all_rows[bad], "mae produced non-finite reconstructions")
        except Exception as e:  # noqa: BLE001 - fail closed on any model error
            recon = None
            fails.fail(all_rows, stage_error("mae", e))
        lat["mae"] = (time.perf_counter() - ts) * 1e3
        # 2. gate ------------------------------------------------------------------------------
        if recon is not None and not timed_out("mae"):
            ts = time.perf_counter()
            try:
                g = eng.gate(xn, recon, return_patch_err=return_patch_error, policy=self._policy)
                t_star_native = g.t_star
                score = eng.to_numpy(g.score).astype(np.float64)
                flag = eng.to_numpy(g.flag).astype(bool)
                t_star_np = eng.to_numpy(g.t_star).astype(np.int64)
                patch_err = None if g.patch_err is None else eng.to_numpy(g.patch_err)
                fails.fail(all_rows[~np.isfinite(score)], "gate produced a non-finite score")
            except Exception as e:  # noqa: BLE001
                fails.fail(all_rows, stage_error("gate", e))
            lat["gate"] = (time.perf_counter() - ts) * 1e3
        # 3. purifier (flagged rows, or every row under policy "floor") -----------------------------
        x_cls = xn
        if t_star_np is not None and not timed_out("gate"):
            rows = all_rows[(t_star_np > 0) & fails.alive()]
            if rows.size:
                ts = time.perf_counter()
                try:
                    noise = np.stack([purification_noise(keys[r], s) for r in rows])
                    pur = eng.purify(eng.take(xn, rows), eng.take(t_star_native, rows), noise)
                    ok = eng.finite_rows(pur)
                    fails.fail(rows[~ok], "purifier produced non-finite values")
                    x_cls = eng.put(xn, rows, pur)
                except Exception as e:  # noqa: BLE001
                    fails.fail(rows, stage_error("purify", e))
                lat["purify"] = (time.perf_counter() - ts) * 1e3
        # 4. classifier ------------------------------------------------------------------------
        alive = fails.alive()
        if alive.any() and not timed_out("purify"):
            ts = time.perf_counter()
            try:
                live = all_rows[alive]
                if spec is not None and x_cls is xn and live.size == b:
                    p_native, spec = spec.result(), None  # nothing purified or failed: the same input
                else:
                    p_native = eng.classify(x_cls if live.size == b else eng.take(x_cls, live))
                p = eng.to_numpy(p_native).astype(np.float64)
                probs_np = np.full((b, p.shape[1]), np.nan)
                probs_np[live] = p
                good = np.isfinite(p).all(axis=1) & (np.abs(p.sum(axis=1) - 1) < 1e-3) & (p >= -1e-6).all(axis=1)
                fails.fail(live[~good], "classifier produced non-finite or invalid probabilities")
            except Exception as e:  # noqa: BLE001
                fails.fail(all_rows, stage_error("classify", e))
            lat["classify"] = (time.perf_counter() - ts) * 1e3
            timed_out("classify")
        if spec is not None:  # an unused speculative run: let it finish (its result is not used)
            spec.exception()
        if return_purified:
            x_cls_np = eng.to_numpy(x_cls)
        lat["total"] = (time.perf_counter() - t0) * 1e3
        info = eng.describe()
        results = []
        for r in range(b):
            reason = fails.reason[r]
            ok = reason is None
            pr = {c: float(probs_np[r, i]) for i, c in enumerate(self.classes)} if ok else {}
            results.append(Result(
                label=self.classes[int(np.argmax(probs_np[r]))] if ok else None,
                probabilities=pr,
                flagged=None if flag is None else bool(flag[r]),
                score=None if score is None or not math.isfinite(score[r]) else float(score[r]),
                t_star=None if t_star_np is None else int(t_star_np[r]),
                status=STATUS_OK if ok else STATUS_UNVERIFIED,
                reason=reason,
                seed=keys[r],
                latency_ms={k: round(v, 4) for k, v in lat.items()},
                backend=info["backend"], device=info["device"], precision=info["precision"],
                bundle_id=self.bundle.bundle_id,
                purified=None if x_cls_np is None or not ok else x_cls_np[r].astype(np.float32),
                patch_error=None if patch_err is None else patch_err[r].astype(np.float32),
            ))
        return results
