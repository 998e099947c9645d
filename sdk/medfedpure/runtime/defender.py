"""The guarded classifier a vendor embeds: ``Defender.load(bundle).run(scan) -> Result``.

Orchestration only (no model maths here — that lives in :mod:`medfedpure.runtime.engines`)::

    load_scan → preprocess → x [B,1,S,S]
      → MAE (K scoring mask sets) → recon [B,K,S,S]
      → fused gate → score, flag, t*          (t* = 0: not purified; policy "floor": t* ≥ t_min)
        (a "learned" gate: attack detector → patch logits [B,Np] → top-k reduction → score, flag, t*)
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
concerned (in a mixed batch, a purifier failure affects only the purified rows). The budget holds
while a stage runs: with ``timeout_s`` each stage runs in a worker thread that the call waits for
only until the deadline (then the stage is interrupted where the engine can stop it: onnxruntime's
``RunOptions.terminate``). Bad input (the :class:`medfedpure.scan.ScanError` family) is caught per
scan before any model runs: :meth:`Defender.run_batch` returns it as ``status="refused"`` with the
error's type and message and classifies the other scans; :meth:`Defender.run` raises it. Input
sizes are bounded by :class:`medfedpure.scan.ScanLimits`. The caller's data is never modified.

Latency: ``Result.latency_ms`` holds the wall time of each stage (load, preprocess, mae, gate,
purify, classify; "mae" is the gate's network: the MAE, or the attack detector of a ``learned`` gate)
and ``total`` for the call that produced it; for :meth:`Defender.run_batch`
these are the batch's stage times (shared by its Results).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfedpure.gate import GateCalibration
from medfedpure.runtime.bundle import VerifiedBundle, default_bundle_path, verify_bundle
from medfedpure.runtime.calibration import DriftMonitor, DriftReport, score_quantile
from medfedpure.runtime.default_id import DEFAULT_BUNDLE_ID
from medfedpure.runtime.engines import Engine, create_engine
from medfedpure.runtime.engines.base import Interrupt, run_interruptible
from medfedpure.runtime.manifest import thaw
from medfedpure.scan.limits import ScanLimits, check_limits_arg

if TYPE_CHECKING:
    from medfedpure.runtime.series import SeriesResult

STAGES = ("load", "preprocess", "mae", "gate", "purify", "classify")
STATUS_OK = "ok"
STATUS_UNVERIFIED = "unverified"
STATUS_REFUSED = "refused"  # the input itself was refused (a ScanError): no model ran on it
STATUS_OUT_OF_SCOPE = "out_of_scope"  # outside the bundle's scope (manifest.Scope): no model output given
POLICIES = ("adaptive", "floor")  # gate policies (docs/design.md, "Policies")
_SEED_MAX = (1 << 63) - 1
# worker threads per Defender: a call uses two at once (a stage and the speculative classifier)
_WORKERS = 4


class _StageTimeout(Exception):
    """The time budget ran out while a stage was running (internal to ``Defender._run``)."""


@dataclass
class Result:
    """One scan's decision, serialisable for the audit log (no patient identifiers).

    Attributes:
        label: ``"no_tumor"`` / ``"tumor"``; None when unverified.
        probabilities: class → probability (sums to 1); empty when unverified.
        flagged: the gate's flag (score ≥ τ); None when the gate did not run.
        score: the gate's score; None when the gate did not run.
        t_star: purification strength used (0: not purified); None when the gate did not run.
        status: ``"ok"``, ``"unverified"`` (a model stage failed or the time budget ran out),
            ``"refused"`` (the input is not a usable scan: :meth:`Defender.run_batch` only) or
            ``"out_of_scope"`` (the scan is outside the bundle's scope: no model ran, no label).
        reason: why the status is unverified (stage and error), refused (``"<ScanError type>:
            <message>"``) or out of scope (each attribute and value outside the scope), else None.
        seed: the key of the purification RNG (replays the decision exactly).
        latency_ms: stage → milliseconds, and ``"total"``.
        backend / device / precision: the engine that ran it.
        bundle_id: sha256 of the bundle's manifest.
        purified: [1, S, S] float32 image the classifier saw (on request; equals the input when
            t* = 0).
        patch_error: [Np] float32 per-patch reconstruction error, or for a ``learned`` gate the attack detector's
            patch logits (on request).
        error: the exception type of a refused input (e.g. ``"ScanTooLargeError"``), else None.
        score_quantile: where ``score`` sits among the gate calibration's clean scores (the fraction
            below it, interpolated from the recorded quantiles:
            :func:`medfedpure.runtime.calibration.score_quantile`); None without a score or quantiles.
        policy: the gate policy the decision was made under (``"adaptive"`` / ``"floor"``); None when
            no model ran (refused, out of scope).
        pixel_sha256: sha256 of the decoded pixels before preprocessing (:attr:`medfedpure.scan.Scan.sha256`);
            None for :meth:`Defender.run_array` and inputs refused on loading.
        scope: the scope check (:meth:`medfedpure.runtime.manifest.Scope.check`: ``modality``,
            ``body_part``, ``image_type``, ``orientation`` — ``"unknown"`` where the input does not carry
            them — ``in_scope``, ``reason``) plus ``override``: True when an out-of-scope scan was run
            because the caller passed ``allow_out_of_scope=True``. None when no scan was loaded.
        dicom_uids: ``{"study", "series", "sop"}`` Instance UIDs of a DICOM input, else None.
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
    error: str | None = None
    score_quantile: float | None = None
    policy: str | None = None
    pixel_sha256: str | None = None
    scope: dict[str, Any] | None = None
    dicom_uids: dict[str, str | None] | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; arrays (when present) become nested lists."""
        d = {k: getattr(self, k) for k in ("label", "probabilities", "flagged", "score", "t_star", "status",
                                           "reason", "seed", "latency_ms", "backend", "device", "precision",
                                           "bundle_id", "error", "score_quantile", "policy", "pixel_sha256",
                                           "scope", "dicom_uids")}
        d["purified"] = None if self.purified is None else self.purified.tolist()
        d["patch_error"] = None if self.patch_error is None else self.patch_error.tolist()
        return d

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def to_dicom_sr(self, source: Any) -> Any:
        """This Result as a DICOM Comprehensive SR in the source's study (a ``pydicom.Dataset``; needs the
        ``dicom`` extra): :func:`medfedpure.runtime.dicom_out.structured_report` with its defaults."""
        from medfedpure.runtime.dicom_out import structured_report

        return structured_report(self, source)


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


def _keys(seeds: Sequence[int | None] | None, n: int) -> list[int]:
    """One RNG key per scan: the given seed (validated) or a fresh one."""
    if seeds is None:
        seeds = [None] * n
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds={seeds!r}: expected a sequence with one int (or None) per scan")
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} scans: give one seed (or None) per scan")
    return [fresh_seed() if sd is None else _check_seed(sd) for sd in seeds]


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
        timeout_s: budget per call, enforced while a stage runs: each stage runs in a worker thread
            and the call stops waiting at the deadline → the unfinished scans are unverified with
            reason ``"timeout: …"`` (the stage is interrupted where the engine can stop it, else it
            finishes in the background). None: no budget, stages run in the calling thread.
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
        limits: input limits for :func:`medfedpure.load_scan` (file-size cap, decoded-bytes budget;
            :class:`medfedpure.scan.ScanLimits`); None: the defaults.

    Thread safety: ``run`` / ``run_batch`` / ``run_array`` may be called from several threads, and
    :meth:`close` may be called while they run (a call in flight still finishes).
    """

    def __init__(self, bundle: VerifiedBundle, engine: Engine, *, timeout_s: float | None = 30.0,
                 overlap: bool | None = None, policy: str | None = None,
                 limits: ScanLimits | None = None) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}: expected a positive number of seconds or None")
        if overlap is not None and not isinstance(overlap, bool):
            raise TypeError(f"overlap={overlap!r}: expected True, False or None")
        if overlap and not engine.overlap_classify:
            raise ValueError(f"overlap=True, but the {engine.name} engine cannot run two stages at once")
        _check_policy(policy)
        self.limits = check_limits_arg(limits)
        self.bundle = bundle
        self.engine = engine
        self.timeout_s = timeout_s
        self.overlap = engine.overlap_classify if overlap is None else overlap
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.classes = bundle.classes
        # The bundle's preprocessing section, validated on load: a bundle asking for a
        # preprocessing other than medfedpure.scan.preprocess's is refused before this point.
        self.preprocessing = bundle.spec.preprocessing
        self.image_size = self.preprocessing.size
        self._policy = policy  # None: the engine's calibrated gate policy
        # which scans the bundle is for (its manifest's scope section, else the default MR/brain/axial one)
        self.scope = bundle.spec.effective_scope
        # running counts of gate scores between the calibration's quantiles (drift())
        self._drift = DriftMonitor(engine.gate_spec.calibration, engine.gate_spec.tau)

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str = "auto", device: str = "auto", *,
             expected_id: str | None = None, trusted_keys: Any = None, allow_unsigned: bool = False,
             timeout_s: float | None = 30.0, overlap: bool | None = None,
             policy: str | None = None, limits: ScanLimits | None = None, **engine_options: Any) -> Defender:
        """Verify the bundle at ``path`` (signature, every hash, before any parser) and build a backend.

        Args:
            backend: ``"auto"`` / ``"onnxruntime"`` / ``"torch"`` / ``"tensorrt"``.
            device: ``"auto"`` / ``"cpu"`` / ``"cuda"``.
            expected_id: pin the bundle (sha256 of its manifest, or a ≥ 16-digit prefix).
            trusted_keys: public keys trusted besides the shipped release key and
                ``MEDFEDPURE_TRUSTED_KEYS`` (PEM paths, PEM bytes or ``Ed25519PublicKey`` objects).
            allow_unsigned: accept a bundle that no trusted key signed (refused by default).
            timeout_s, overlap, policy, limits: as in :class:`Defender`.
            engine_options: ``precision``, ``threads``, ``cuda_graphs`` (torch).
        """
        bundle = verify_bundle(path, expected_id=expected_id, trusted_keys=trusted_keys,
                               allow_unsigned=allow_unsigned)
        _check_policy(policy)  # before any backend is built
        limits = check_limits_arg(limits)
        return cls(bundle, create_engine(bundle, backend, device, **engine_options), timeout_s=timeout_s,
                   overlap=overlap, policy=policy, limits=limits)

    @classmethod
    def default(cls, backend: str = "auto", device: str = "auto", **kwargs: Any) -> Defender:
        """The embedded default bundle (trained by the project's pipeline on synthetic data), pinned to
        :data:`medfedpure.runtime.default_id.DEFAULT_BUNDLE_ID` unless ``expected_id`` says otherwise."""
        path = default_bundle_path()
        if not (Path(path) / "manifest.json").is_file():
            raise FileNotFoundError(f"the embedded default bundle is missing at {path}: run `make bundle`")
        if kwargs.get("expected_id") is None:
            kwargs["expected_id"] = DEFAULT_BUNDLE_ID
        return cls.load(path, backend, device, **kwargs)

    @property
    def calibration(self) -> GateCalibration | None:
        """The calibration of the gate in use (target false-flag rate, number of scans, score
        quantiles, τ_high rule, source), or None for a gate set by hand."""
        return self.engine.gate_spec.calibration

    def drift(self) -> DriftReport:
        """Gate scores seen so far (every scan the gate scored, by any call) against the
        calibration's quantiles: counts per bin, expected fractions, n, chi-square p-value, and the
        observed flag rate with its exact interval (:class:`medfedpure.runtime.calibration.DriftReport`)."""
        return self._drift.report()

    def reset_drift(self) -> None:
        """Start the drift counts afresh (e.g. after a scanner change was handled)."""
        self._drift.reset()

    @property
    def policy(self) -> str:
        """The gate policy in force: the one given to the Defender, else the bundle's calibrated one."""
        return self._policy or self.engine.gate_spec.policy

    @property
    def policy_choice(self) -> dict[str, Any] | None:
        """Why the bundle runs its policy: the record ``medfedpure bundle choose-policy`` wrote (policy, reason,
        budget, the rule's numbers, each evaluation report's sha256), or None for a bundle whose policy was not
        chosen that way. It describes the bundle's policy, not one given to this Defender."""
        rec = self.bundle.spec.provenance.get("policy_choice")
        return None if rec is None else thaw(rec)

    def close(self) -> None:
        """Release the worker threads (idempotent; a later run starts them again).

        Safe while another thread is in a call: that call's submitted stages still run (the pool is
        shut down without waiting, so ``close`` never blocks on a stuck stage), and a stage it submits
        after ``close`` starts a fresh pool.
        """
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the worker pool (speculative classification, stages under a budget)."""
        with self._pool_lock:  # close() swaps the pool under the same lock: never a shut-down pool here
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="medfedpure-worker")
            return self._pool.submit(fn, *args)

    def __enter__(self) -> Defender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # certified robustness (denoised randomized smoothing; the maths in runtime/certify.py) -------
    def certify(self, scan: Any, *, sigma: float = 0.25, n0: int = 100, n: int = 1000, alpha: float = 0.001,
                seed: int | None = None, batch: int | None = None, progress: Any = None) -> Any:
        """Certify one scan's smoothed label within an ℓ2 radius (Cohen et al. CERTIFY with this bundle's
        one-shot denoiser + classifier): → :class:`medfedpure.runtime.certify.Certificate`.

        ``scan``: anything :func:`medfedpure.load_scan` accepts (preprocessed as :meth:`run` does); σ
        and the radius are in preprocessed [0, 1] image units. The gate is not involved: every draw is
        denoised. ``batch``: draws per engine call (None: the engine's default); ``progress(phase, done,
        total)`` after each batch. ``seed`` replays the certificate exactly (None: a fresh one, recorded).
        """
        from medfedpure.runtime.certify import DenoisedSmoothing, SmoothingConfig, default_batch
        from medfedpure.scan import load_scan, preprocess

        cfg = SmoothingConfig(sigma=sigma, n0=n0, n=n, alpha=alpha,
                              batch=default_batch(self.engine) if batch is None else batch)
        x = preprocess(load_scan(scan), self.preprocessing.size)
        return DenoisedSmoothing(self.engine, self.classes).certify(x, cfg, seed=seed, progress=progress,
                                                                    bundle_id=self.bundle.bundle_id)

    def smoothed_predict(self, scan: Any, *, sigma: float = 0.25, n: int = 1000, alpha: float = 0.001,
                         seed: int | None = None, batch: int | None = None, progress: Any = None) -> Any:
        """The smoothed classifier's label by Cohen et al.'s PREDICT (None: abstain, the top two classes
        are too close at level α) → :class:`medfedpure.runtime.certify.SmoothedPrediction`; arguments
        as in :meth:`certify`."""
        from medfedpure.runtime.certify import DenoisedSmoothing, SmoothingConfig, default_batch
        from medfedpure.scan import load_scan, preprocess

        cfg = SmoothingConfig(sigma=sigma, n0=1, n=n, alpha=alpha,
                              batch=default_batch(self.engine) if batch is None else batch)
        x = preprocess(load_scan(scan), self.preprocessing.size)
        return DenoisedSmoothing(self.engine, self.classes).predict(x, cfg, seed=seed, progress=progress,
                                                                    bundle_id=self.bundle.bundle_id)

    # ------------------------------------------------------------------------------------------
    def run(self, scan: Any, *, seed: int | None = None, return_purified: bool = False,
            return_patch_error: bool = False, policy: str | None = None,
            allow_out_of_scope: bool = False) -> Result:
        """Classify one scan (anything :func:`medfedpure.load_scan` accepts, or a ``Scan``).

        ``policy``: the gate policy of this call only (None: :attr:`policy`); the Defender is not
        changed, so calls with different policies may run at once from several threads.
        ``allow_out_of_scope``: run a scan outside the bundle's scope (:attr:`scope`) anyway; the
        Result's ``scope["override"]`` records it. Without it such a scan gets ``status="out_of_scope"``.

        Raises:
            ScanError: the scan is refused (:meth:`run_batch` returns it as ``status="refused"``).
            ValueError: a bad seed or policy.
        """
        _check_policy(policy)
        return self._run_scans([scan], None if seed is None else [seed], return_purified, return_patch_error,
                               raise_refused=True, policy=policy, allow_out_of_scope=allow_out_of_scope)[0]

    def run_batch(self, scans: Sequence[Any], *, seeds: Sequence[int | None] | None = None,
                  return_purified: bool = False, return_patch_error: bool = False,
                  allow_out_of_scope: bool = False) -> list[Result]:
        """Classify a batch: one Result per input, in order.

        Only the flagged members (or all, with policy ``floor``) are purified. An input that is not
        a usable scan (any :class:`medfedpure.scan.ScanError`: unreadable, too large, a FIFO, wrong
        shape, constant, ...) gets ``status="refused"``, ``reason="<type>: <message>"``, ``error`` =
        the type's name and no label; the other inputs are classified as if it were not there. A scan
        outside the bundle's scope gets ``status="out_of_scope"`` the same way, unless
        ``allow_out_of_scope`` (as in :meth:`run`).

        Raises:
            TypeError: ``scans`` is not a sequence. ValueError: a bad seed, or not one seed per scan
            (usage errors: nothing is loaded).
        """
        return self._run_scans(scans, seeds, return_purified, return_patch_error, raise_refused=False,
                               allow_out_of_scope=allow_out_of_scope)

    def run_series(self, sources: Sequence[str | os.PathLike[str]], *,
                   seeds: Sequence[int | None] | None = None) -> list[SeriesResult]:
        """Classify DICOM series: one :class:`~medfedpure.runtime.series.SeriesResult` per SeriesInstanceUID.

        ``sources``: DICOM files and folders (a folder: every file under it). Headers are read first
        (pixels skipped) to group the files by SeriesInstanceUID and order each series by position on
        the slice normal (fallback InstanceNumber); then every slice runs as in :meth:`run_batch` and each
        series is aggregated by the rule of :mod:`medfedpure.runtime.series` (status ok only if every slice
        is ok; label "tumor" if any slice has p(tumor) ≥ 0.5; the max p(tumor) as the series score).
        ``seeds``: None or one per file after folder expansion, in that (input) order.
        Series come back in order of their first file.

        Raises:
            SeriesError: a file without a readable DICOM header or without a SeriesInstanceUID.
            ValueError: not one seed per file, or a bad seed.
        """
        from medfedpure.runtime.series import aggregate, expand_inputs, group_series, read_header

        files = expand_inputs([os.fspath(s) for s in sources])
        if seeds is not None and len(seeds) != len(files):
            raise ValueError(f"run_series got {len(seeds)} seeds for {len(files)} files: pass one per file "
                             "(folders expanded) or None")
        keys = dict(zip(files, _keys(seeds, len(files)), strict=True))
        groups = group_series([read_header(f) for f in files])
        order = [h for hs in groups.values() for h in hs]
        results = self.run_batch([h.source for h in order], seeds=[keys[h.source] for h in order])
        by_source = dict(zip([h.source for h in order], results, strict=True))
        return [aggregate(uid, [h.source for h in hs], [h.position for h in hs], [by_source[h.source] for h in hs])
                for uid, hs in groups.items()]

    def refused_result(self, error: BaseException, *, seed: int | None = None) -> Result:
        """The ``status="refused"`` Result :meth:`run_batch` gives an input that raised ``error`` on loading
        (for callers that load scans themselves, e.g. one frame of a multi-frame file)."""
        return self._refused(error, _keys(None if seed is None else [seed], 1)[0], {"total": 0.0})

    def _run_scans(self, scans: Sequence[Any], seeds: Sequence[int | None] | None, return_purified: bool,
                   return_patch_error: bool, *, raise_refused: bool, policy: str | None = None,
                   allow_out_of_scope: bool = False) -> list[Result]:
        from medfedpure.scan import ScanError, load_scan, preprocess

        t0 = time.perf_counter()
        if isinstance(scans, (str, bytes, np.ndarray)) or not isinstance(scans, Sequence):
            raise TypeError("run_batch takes a sequence of scans (a list); for one scan use run()")
        keys = _keys(seeds, len(scans))
        refused: dict[int, ScanError] = {}
        loaded: dict[int, Any] = {}
        seen: dict[int, tuple[str, Any, dict[str, Any]]] = {}  # loaded scans: pixel sha256, UIDs, scope check
        for i, s in enumerate(scans):
            try:
                loaded[i] = load_scan(s, limits=self.limits)
            except ScanError as e:
                if raise_refused:
                    raise
                refused[i] = e
                continue
            check = self.scope.check(loaded[i].meta)
            check["override"] = bool(allow_out_of_scope and not check["in_scope"])
            uids = loaded[i].dicom_uids
            # hashed here, with the load (its time counts as load): the audit record's pixel_sha256
            seen[i] = (loaded[i].sha256, None if uids is None else dict(uids), check)
        outside = [i for i, (_, _, c) in seen.items() if not c["in_scope"] and not allow_out_of_scope]
        for i in outside:  # no model runs on a scan outside the scope
            del loaded[i]
        lat: dict[str, float] = {"load": (time.perf_counter() - t0) * 1e3}
        t1 = time.perf_counter()
        prepped: dict[int, np.ndarray] = {}
        for i, sc in loaded.items():
            try:
                prepped[i] = preprocess(sc, self.preprocessing.size)
            except ScanError as e:
                if raise_refused:
                    raise
                refused[i] = e
        lat["preprocess"] = (time.perf_counter() - t1) * 1e3
        if not scans:
            return []
        rows = sorted(prepped)
        done: dict[int, Result] = {}
        if rows:
            x = np.stack([prepped[i] for i in rows])
            done = dict(zip(rows, self._run(x, [keys[i] for i in rows], lat, t0, return_purified,
                                            return_patch_error, policy=policy), strict=True))
        else:
            lat.update({name: 0.0 for name in ("mae", "gate", "purify", "classify")})
            lat["total"] = (time.perf_counter() - t0) * 1e3
        for i, e in refused.items():
            done[i] = self._refused(e, keys[i], lat)
        for i in outside:
            done[i] = self._out_of_scope(seen[i][2], keys[i], lat)
        for i, (sha, uids, check) in seen.items():  # what the load saw, on every Result of a loaded scan
            done[i].pixel_sha256, done[i].dicom_uids, done[i].scope = sha, uids, check
        return [done[i] for i in range(len(scans))]

    def _refused(self, e: BaseException, seed: int, lat: dict[str, float]) -> Result:
        info = self.engine.describe()
        return Result(label=None, probabilities={}, flagged=None, score=None, t_star=None,
                      status=STATUS_REFUSED, reason=f"{type(e).__name__}: {e}", seed=seed,
                      latency_ms={k: round(v, 4) for k, v in lat.items()}, backend=info["backend"], device=info["device"], precision=info["precision"],
                      bundle_id=self.bundle.bundle_id, error=type(e).__name__)

    def _out_of_scope(self, check: dict[str, Any], seed: int, lat: dict[str, float]) -> Result:
        info = self.engine.describe()
        return Result(label=None, probabilities={}, flagged=None, score=None, t_star=None,
                      status=STATUS_OUT_OF_SCOPE,
                      reason=f"{check['reason']}: no model output is given for it; run it anyway with "
                             "allow_out_of_scope=True (medfedpure run --allow-out-of-scope)",
                      seed=seed, latency_ms={k: round(v, 4) for k, v in lat.items()}, backend=info["backend"],
                      device=info["device"], precision=info["precision"], bundle_id=self.bundle.bundle_id)

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
             return_purified: bool, return_patch_error: bool, *, policy: str | None = None) -> list[Result]:
        eng = self.engine
        policy = policy or self._policy  # None: the engine's calibrated policy
        b, s = x.shape[0], self.image_size
        keys = _keys(seeds, b)
        deadline = None if self.timeout_s is None else t0 + self.timeout_s
        fails = _Failures(b)
        all_rows = np.arange(b)
        score = flag = t_star_np = patch_err = None
        probs_np = None
        x_cls_np = None
        expired = False  # the budget ran out: no further stage starts
        for name in ("mae", "gate", "purify", "classify"):
            lat[name] = 0.0

        def timed_out(after: str) -> bool:
            nonlocal expired
            if not expired and deadline is not None and time.perf_counter() > deadline:
                fails.fail(all_rows, f"timeout: the {self.timeout_s:g} s budget ran out after the {after} stage")
                expired = True
            return expired

        def stage_timeout(stage: str) -> None:
            nonlocal expired
            fails.fail(all_rows, f"timeout: the {self.timeout_s:g} s budget ran out during the {stage} stage")
            expired = True

        def stage_error(stage: str, e: BaseException) -> str:
            return f"{stage} failed: {type(e).__name__}: {e}"

        def wait(fut: Future) -> Any:
            """The future's result, waiting at most until the deadline (then _StageTimeout)."""
            try:
                left = None if deadline is None else max(0.0, deadline - time.perf_counter())
                return fut.result(timeout=left)
            except FutureTimeout:
                if fut.done():  # the stage itself raised TimeoutError
                    raise
                raise _StageTimeout from None

        def call(fn: Callable[..., Any], *args: Any) -> Any:
            """One stage: inline without a budget; with one, in a worker, interrupted at the deadline."""
            if deadline is None:
                return fn(*args)
            interrupt = Interrupt()
            try:
                return wait(self._submit(run_interruptible, interrupt, fn, *args))
            except _StageTimeout:
                interrupt.set()  # onnxruntime: RunOptions.terminate stops the run in progress
                raise

        xn = eng.to_native(x)
        # 0. speculative classification of the inputs, alongside the detector (see ``overlap``)
        spec: Future | None = None
        if self.overlap:
            spec = self._submit(eng.classify, xn)
        # 1. detector --------------------------------------------------------------------------
        ts = time.perf_counter()
        recon = None
        try:  # the MAE's reconstructions, or for a "learned" gate the attack detector's patch logits
            recon = call(eng.gate_input, xn)
            bad = ~eng.finite_rows(recon)
            fails.fail(all_rows[bad], "mae produced non-finite reconstructions" if eng.gate_model == "mae"
                       else "the attack detector produced non-finite patch logits")
        except _StageTimeout:
            recon = None
            stage_timeout("mae")
        except Exception as e:  # noqa: BLE001 - fail closed on any model error
            recon = None
            fails.fail(all_rows, stage_error("mae", e))
        lat["mae"] = (time.perf_counter() - ts) * 1e3
        # 2. gate ------------------------------------------------------------------------------
        if recon is not None and not timed_out("mae"):
            ts = time.perf_counter()
            try:
                g = call(lambda: eng.gate(xn, recon, return_patch_err=return_patch_error,
                                          policy=policy))
                t_star_native = g.t_star
                score = eng.to_numpy(g.score).astype(np.float64)
                flag = eng.to_numpy(g.flag).astype(bool)
                t_star_np = eng.to_numpy(g.t_star).astype(np.int64)
                patch_err = None if g.patch_err is None else eng.to_numpy(g.patch_err)
                fails.fail(all_rows[~np.isfinite(score)], "gate produced a non-finite score")
            except _StageTimeout:
                stage_timeout("gate")
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
                    pur = call(eng.purify, eng.take(xn, rows), eng.take(t_star_native, rows), noise)
                    ok = eng.finite_rows(pur)
                    fails.fail(rows[~ok], "purifier produced non-finite values")
                    x_cls = eng.put(xn, rows, pur)
                except _StageTimeout:
                    stage_timeout("purify")
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
                    p_native, spec = wait(spec), None  # nothing purified or failed: the same input
                else:
                    p_native = call(eng.classify, x_cls if live.size == b else eng.take(x_cls, live))
                p = eng.to_numpy(p_native).astype(np.float64)
                if p.ndim != 2 or p.shape[1] != len(self.classes):  # every backend: never mislabel a column
                    raise ValueError(f"classifier output has shape {p.shape}, but the bundle declares "
                                     f"{len(self.classes)} classes {list(self.classes)}")
                probs_np = np.full((b, p.shape[1]), np.nan)
                probs_np[live] = p
                good = np.isfinite(p).all(axis=1) & (np.abs(p.sum(axis=1) - 1) < 1e-3) & (p >= -1e-6).all(axis=1)
                fails.fail(live[~good], "classifier produced non-finite or invalid probabilities")
            except _StageTimeout:
                stage_timeout("classify")
            except Exception as e:  # noqa: BLE001
                fails.fail(all_rows, stage_error("classify", e))
            lat["classify"] = (time.perf_counter() - ts) * 1e3
            timed_out("classify")
        if spec is not None:  # an unused speculative run: let it finish within the budget (result unused)
            try:
                wait(spec)
            except Exception:  # noqa: BLE001, S110 - its answer is discarded either way
                pass
        if return_purified:
            x_cls_np = eng.to_numpy(x_cls)
        lat["total"] = (time.perf_counter() - t0) * 1e3
        info = eng.describe()
        results = []
        if score is not None:
            self._drift.update(score)
        calib = eng.gate_spec.calibration
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
                score_quantile=None if score is None else score_quantile(float(score[r]), calib),
                policy=policy or eng.gate_spec.policy,
            ))
        return results
