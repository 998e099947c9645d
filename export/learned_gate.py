"""A bundle whose gate is an attack detector: attach the detector, calibrate the ``learned`` gate on a site's clean
scans, write the signed result. ``medfedpure calibrate --bundle B --detector D`` and the bundle build's detector
step both go through :func:`calibrate_with_detector`.

Two halves, as for any recalibration: :func:`medfedpure.export.bundle_writer.write_bundle_with_detector` writes an
unsigned intermediate copy carrying the detector (ONNX graphs checked against torch on the calibration scans) with
τ not yet set, and :func:`medfedpure.runtime.calibration.recalibrate` sets τ on that copy's scores. The returned
recalibration names the *source* bundle and its gate in its provenance — the intermediate is not a gate anyone ran
— and :func:`medfedpure.export.bundle_writer.write_recalibrated_bundle` writes the final bundle from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DetectorAttachError", "calibrate_with_detector", "load_detector"]


class DetectorAttachError(ValueError):
    """The file is not an attack detector checkpoint, or it does not fit the bundle."""


def load_detector(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """``(AttackDetector, provenance)`` from a ``detector`` checkpoint (``medfedpure train detector`` or the
    federated detector phase); the provenance holds the file's SHA-256 and what the checkpoint records of its
    training (sites, classifier, train config, rounds)."""
    from medfedpure.models.detector import AttackDetector
    from medfedpure.models.weights import WeightsError, load_model, model_metadata

    path = Path(path)
    try:
        det, _, meta = load_model(path)
    except (OSError, WeightsError, ValueError, KeyError) as exc:
        raise DetectorAttachError(f"{path}: not a readable model checkpoint ({exc})") from exc
    if not isinstance(det, AttackDetector):
        raise DetectorAttachError(f"{path}: a {model_metadata(path).get('kind')!r} model, not an attack detector "
                                  "(train one with `medfedpure train detector` or the federated detector phase)")
    prov = {"checkpoint_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            **{k: meta[k] for k in ("sites", "classifier", "train_config", "rounds", "federated") if k in meta}}
    return det, prov


def _against_source_gate(rc: Any, source: Any, x: np.ndarray) -> Any:
    """The recalibration of a detector copy, with its provenance and ``previous`` pointing at the source bundle
    and its gate."""
    from medfedpure.runtime.calibration import score_scans

    old = source.bundle.spec.gate
    flagged_before = int(old.decide(score_scans(source.engine, x))[0].sum())
    prov = {**rc.provenance, "source_bundle_id": source.bundle.bundle_id, "flagged_by_source_gate": flagged_before,
            "previous_gate": {"tau": old.tau, "tau_high": old.tau_high, "stat": old.stat, "topk": old.topk,
                              "policy": old.policy},
            "changed": {"stat": rc.gate.stat, "topk": rc.gate.topk, "detector": "attached"}}
    cal = rc.gate.calibration
    copy_id = rc.provenance["source_bundle_id"]
    text = f"bundle {source.bundle.bundle_id} with an attack detector attached"
    gate = dataclasses.replace(rc.gate, calibration=dataclasses.replace(cal, source=cal.source.replace(
        f"bundle {copy_id}", text)))
    return dataclasses.replace(rc, gate=gate, previous=old, flagged_before=flagged_before, provenance=prov)


def calibrate_with_detector(source: Any, detector: str | Path, x: np.ndarray, workdir: str | Path, *,
                            topk: int | None = None, backend: str = "auto", threads: int = 1,
                            detector_provenance: Mapping[str, Any] | None = None, **recalibrate_kw: Any) -> Any:
    """The recalibration (:class:`medfedpure.runtime.calibration.Recalibration`) of ``source`` (a loaded
    :class:`~medfedpure.runtime.defender.Defender`) with the attack detector at ``detector`` as its ``learned``
    gate (mean of the top ``topk`` patch logits; default the detector's k), τ set on the clean scans ``x``
    [N,1,S,S] (``recalibrate_kw``: ``target_ffr``, ``min_scans``, ``pixels_sha256``, ``tau_high_k``,
    ``description``, ``policy``). Returns ``(recalibration, bundle)`` where ``bundle`` is the intermediate
    copy carrying the detector, written under ``workdir`` (pass both to ``write_recalibrated_bundle``).
    ``detector_provenance`` adds to what the checkpoint records.

    Raises:
        DetectorAttachError: not a detector, or it does not fit the bundle.
        TooFewScansError / ValueError: as :func:`medfedpure.runtime.calibration.recalibrate`.
    """
    from medfedpure.export.bundle_writer import write_bundle_with_detector
    from medfedpure.runtime.calibration import recalibrate
    from medfedpure.runtime.defender import Defender

    if recalibrate_kw.get("stat") not in (None, "learned"):
        raise ValueError(f"a detector calibrates the 'learned' gate; stat={recalibrate_kw['stat']!r} contradicts it")
    recalibrate_kw.pop("stat", None)
    det, prov = load_detector(detector)
    out = Path(workdir) / "with_detector"
    try:
        write_bundle_with_detector(source.bundle, out, det, topk=topk, verify_scans=x[:32],
                                   detector_provenance={**prov, **dict(detector_provenance or {})}, signing_key=None,
                                   overwrite=True)
    except ValueError as exc:
        raise DetectorAttachError(f"{detector}: {exc}") from exc
    copy = Defender.load(out, backend, "auto", threads=threads, allow_unsigned=True)
    rc = recalibrate(copy.bundle, copy.engine, x, **recalibrate_kw)
    return _against_source_gate(rc, source, x), copy.bundle
