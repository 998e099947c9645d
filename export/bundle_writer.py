"""Write a bundle directory (docs/design.md, "Bundle format") and verify it with the same reader the
runtime uses.

The writer copies artefacts into a fresh directory, hashes them, writes ``manifest.json`` last
(canonical JSON: sorted keys, 2-space indent, trailing newline) from the typed sections of
:class:`medfedpure.runtime.manifest.BundleSpec`, signs the manifest's bytes when it has a key
(``signing_key=``, or ``MEDFEDPURE_SIGNING_KEY``; :mod:`medfedpure.export.signing`), and then runs
:func:`medfedpure.runtime.bundle.verify_bundle` on the result, so a bundle that leaves the writer is a
bundle the runtime accepts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from medfedpure.export.signing import PrivateKeySpec, resolve_signing_key, sign_manifest, trusted
from medfedpure.runtime.bundle import (
    MANIFEST_NAME,
    MAX_MANIFEST_DEPTH,
    SIGNATURE_NAME,
    Artefact,
    BundleError,
    VerifiedBundle,
    check_relpath,
    json_depth,
    verify_bundle,
)
from medfedpure.runtime.manifest import BundleSpec

if TYPE_CHECKING:  # onnx is imported where it is used: writing a bundle needs only the runtime's dependencies
    import onnx


@dataclass(frozen=True)
class ArtefactSource:
    """An artefact to put in a bundle: its bytes (or a file to copy) and what it is."""

    path: str  # relative POSIX path inside the bundle
    role: str
    format: str
    precision: str
    data: bytes | None = None
    source: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        check_relpath(self.path)
        if (self.data is None) == (self.source is None):
            raise ValueError(f"artefact {self.path!r}: give exactly one of data= or source=")


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON accepts: non-finite floats become the strings "inf",
    "-inf", "nan" (training metrics hold e.g. an unbounded update norm), tuples become lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_bundle(
    out: str | os.PathLike[str],
    artefacts: Mapping[str, ArtefactSource],
    spec: BundleSpec,
    *,
    overwrite: bool = False,
    signing_key: PrivateKeySpec | None = None,
) -> VerifiedBundle:
    """Write a bundle directory and return it verified.

    Args:
        out: destination directory; must not exist or be empty, unless ``overwrite`` (then it is
            removed first — it must itself look like a bundle, holding a manifest.json).
        artefacts: manifest name → :class:`ArtefactSource`.
        spec: the manifest's typed sections (:class:`medfedpure.runtime.manifest.BundleSpec`),
            written with their own ``to_dict`` so the runtime reads back exactly these values.
        signing_key: Ed25519 private key (object or PEM file) that signs the manifest; None: the key
            named by ``MEDFEDPURE_SIGNING_KEY``, else the bundle is written unsigned (the runtime then
            refuses it until ``medfedpure bundle sign`` signs it, or the caller passes
            ``allow_unsigned=True``).

    Returns:
        The bundle, verified against the signing key (``signer`` set) or as unsigned.

    Raises:
        FileExistsError: ``out`` exists and is not empty, without ``overwrite``.
        ValueError: the signing key cannot be loaded, or an artefact is a private key.
        BundleError: the written bundle fails verification.
    """
    key = resolve_signing_key(signing_key)
    check = {"trusted_keys": [trusted(key)]} if key is not None else {"allow_unsigned": True}
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty: pass overwrite=True (--overwrite) or "
                                  "choose another folder")
        if not (root / MANIFEST_NAME).is_file():
            raise FileExistsError(f"refusing to overwrite {root}: it does not look like a bundle "
                                  f"(no {MANIFEST_NAME})")
    # Written into a sibling folder and moved into place at the end, so a failure never leaves a
    # half-written bundle behind.
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        entries: dict[str, dict[str, Any]] = {}
        for name, src in artefacts.items():
            dest = stage / src.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.data is not None:
                dest.write_bytes(src.data)
            else:
                shutil.copyfile(src.source, dest)  # type: ignore[arg-type]
            data = dest.read_bytes()
            if b"PRIVATE KEY-----" in data[:4096]:
                raise ValueError(f"artefact {src.path!r} holds a private key: keys never go in a bundle")
            entry = Artefact(name=name, path=src.path, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                             role=src.role, format=src.format, precision=src.precision)
            Artefact.from_dict(name, entry.to_dict())  # validates role/format/precision
            entries[name] = entry.to_dict()
        manifest = {**spec.to_manifest(), "artefacts": entries}
        manifest["provenance"] = json_safe(manifest["provenance"])
        text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
        (stage / MANIFEST_NAME).write_text(text, encoding="utf-8")
        if key is not None:
            (stage / SIGNATURE_NAME).write_bytes(sign_manifest((stage / MANIFEST_NAME).read_bytes(), key))
        verify_bundle(stage, **check)
        if root.exists():
            shutil.rmtree(root)
        os.replace(stage, root)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        return verify_bundle(root, **check)
    except BundleError as e:  # pragma: no cover - would be a writer bug
        raise BundleError(f"the bundle just written to {root} fails verification: {e}") from e


def _same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether two graphs hold the same initializers: names, types, shapes and payload bytes."""
    from onnx import numpy_helper

    def key(m: onnx.ModelProto) -> list[tuple[str, int, tuple[int, ...], bytes]]:
        return [(t.name, t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in m.graph.initializer]

    return key(a) == key(b)


def _onnx_graph_only(m: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``m`` with its metadata stripped (for comparing everything but the metadata)."""
    import onnx
    from medfedpure.export.onnx_export import strip_metadata

    c = onnx.ModelProto()
    c.CopyFrom(m)
    return strip_metadata(c)


def convert_v1_bundle(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
                      overwrite: bool = False) -> VerifiedBundle:
    """Convert a format-1 bundle to the current format, changing no weight and no answer.

    Verifies ``src`` as a format-1 bundle would have been verified (every listed file's size and
    sha256; no unlisted files), then writes ``out`` with: the ONNX graphs' exporter metadata
    stripped (their initializers checked byte-identical, their nodes unchanged), the safetensors
    copied unchanged, and the manifest's sections in the typed form (the gate through
    ``GateSpec.from_legacy_dict``, the mask sets packed). ``provenance.converted_from`` records the
    old bundle id. ``src`` and ``out`` may be the same folder (then ``overwrite`` is needed).

    Raises:
        BundleError: ``src`` is not an intact format-1 bundle, or a graph changed beyond its metadata.
    """
    import numpy as np
    import onnx
    from medfedpure.export.onnx_export import strip_metadata
    from medfedpure.gate import GateSpec
    from medfedpure.runtime.manifest import MaeSpec, Preprocessing, PurifierSpec

    root = Path(src).resolve()
    raw = (root / MANIFEST_NAME).read_bytes()
    if json_depth(raw) > MAX_MANIFEST_DEPTH:
        raise BundleError(f"{root / MANIFEST_NAME} nests deeper than {MAX_MANIFEST_DEPTH}: not a bundle manifest")
    old = json.loads(raw.decode("utf-8"))
    if old.get("format_version") != 1:
        raise BundleError(f"{root} is format version {old.get('format_version')!r}, not 1: nothing to convert")
    listed = {d["path"] for d in old["artefacts"].values()}
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    if present != listed:
        raise BundleError(f"{root}: files {sorted(present ^ listed)} are unlisted or missing; refusing to convert")
    arts: dict[str, ArtefactSource] = {}
    for name, d in old["artefacts"].items():
        a = Artefact.from_dict(name, d)
        data = (root / a.path).read_bytes()
        if len(data) != a.bytes or hashlib.sha256(data).hexdigest() != a.sha256:
            raise BundleError(f"{root}: artefact {a.path!r} does not match its manifest entry; refusing to convert")
        if a.format == "onnx":
            before = onnx.load_from_string(data)
            after = strip_metadata(onnx.load_from_string(data))
            if not _same_weights(before, after) or _onnx_graph_only(before) != after:
                raise BundleError(f"{a.path}: stripping metadata changed the graph")  # pragma: no cover
            data = after.SerializeToString()
        arts[name] = ArtefactSource(path=a.path, role=a.role, format=a.format, precision=a.precision, data=data)
    pre = dict(old["preprocessing"])
    if pre.get("function") == "medfedpure.preprocess":  # the format-1 name of the same function
        pre["function"] = "medfedpure.scan.preprocess"
    mae = old["mae"]
    pur = old["purifier"]
    provenance = {**old["provenance"], "converted_from": {"format_version": 1,
                                                           "bundle_id": hashlib.sha256(raw).hexdigest()}}
    spec = BundleSpec(
        classes=tuple(old["classes"]),
        image_size=int(old["image_size"]),
        preprocessing=Preprocessing.from_dict(pre),
        mae=MaeSpec(patch=int(mae["patch"]), k=int(mae["k"]), norm_pix=bool(mae["norm_pix"]),
                    visible=np.asarray(mae["visible"], dtype=np.int64).astype(bool)),
        purifier=PurifierSpec(schedule=pur["schedule"], num_timesteps=int(pur["num_timesteps"]),
                              alphas_cumprod=np.asarray(pur["alphas_cumprod"], dtype=np.float64),
                              steps=int(pur["steps"]), sampler=pur["sampler"]),
        gate=GateSpec.from_legacy_dict(old["gate"]),
        provenance=provenance,
    )
    same = Path(out).resolve() == root
    if same and not overwrite:
        raise FileExistsError(f"converting {root} in place needs overwrite=True")
    return write_bundle(out, arts, spec, overwrite=overwrite)


def _copy_of(src: VerifiedBundle, out: str | os.PathLike[str], *, card: bool = True) -> dict[str, ArtefactSource]:
    """Every artefact of ``src`` as a source for :func:`write_bundle` (each re-verified against ``src``'s manifest
    as it is read; ``card=False`` leaves the model card out, for a writer that regenerates it), after refusing
    ``out`` when it is ``src``'s own folder (``ValueError``)."""
    from medfedpure.runtime.bundle import CARD_ARTEFACT

    if Path(out).resolve() == src.root.resolve():
        raise ValueError(f"{out} is the source bundle's own folder: write the new bundle to a new folder")
    return {name: ArtefactSource(path=a.path, role=a.role, format=a.format, precision=a.precision,
                                 data=src.read_bytes(name)) for name, a in src.artefacts.items()
            if card or name != CARD_ARTEFACT}


def write_recalibrated_bundle(src: VerifiedBundle, out: str | os.PathLike[str], gate: Any,
                              recalibration: Mapping[str, Any], *, signing_key: PrivateKeySpec | None = None,
                              overwrite: bool = False) -> VerifiedBundle:
    """A copy of ``src`` with its gate section replaced by ``gate`` (a recalibrated
    :class:`~medfedpure.gate.GateSpec`, e.g. from :func:`medfedpure.runtime.calibration.recalibrate`).

    Every artefact but the model card is copied byte for byte (each re-verified against ``src``'s
    manifest as it is read); the manifest keeps every other section and adds ``provenance.recalibration`` =
    ``recalibration`` (calibration set size, pixel fingerprint, date, source bundle id, …), and a
    model card regenerated for the new gate (:func:`medfedpure.export.model_card.with_card`); when the statistic
    changes, the source's ``measured_metrics`` (measured through its own gate) move to
    ``provenance.recalibration.source_bundle_metrics``, out of the card. Signed as
    :func:`write_bundle` signs (``signing_key``, else ``MEDFEDPURE_SIGNING_KEY``, else unsigned).

    Raises:
        ValueError: ``out`` is ``src``'s own folder (a bundle is never rewritten in place), or the
            gate does not fit the bundle (patch / norm_pix / t_max; a BundleError).
        FileExistsError: as :func:`write_bundle`.
    """
    import dataclasses

    arts = _copy_of(src, out)
    from medfedpure.runtime.manifest import thaw

    provenance = {**thaw(src.spec.provenance), "recalibration": dict(recalibration)}
    if gate.stat != src.spec.gate.stat and provenance.get("measured_metrics"):
        # robustness measured through another statistic's gate: kept for the record, out of the card
        provenance["recalibration"]["source_bundle_metrics"] = {
            "note": f"measured on the source bundle through its {src.spec.gate.stat!r} gate, not this one",
            "metrics": provenance.pop("measured_metrics")}
    # the scope it was checked against, written out (a bundle made before scopes existed had the default)
    spec = dataclasses.replace(src.spec, gate=gate, provenance=provenance, scope=src.spec.effective_scope)
    from medfedpure.export.model_card import with_card

    spec, arts = with_card(spec, arts)  # the card's calibration section now describes the new gate
    return write_bundle(out, arts, spec, signing_key=signing_key, overwrite=overwrite)


def write_bundle_with_detector(src: VerifiedBundle, out: str | os.PathLike[str], detector: Any, *,
                               topk: int | None = None, verify_scans: np.ndarray | None = None,
                               detector_provenance: Mapping[str, Any] | None = None,
                               signing_key: PrivateKeySpec | None = None, overwrite: bool = False) -> VerifiedBundle:
    """A copy of ``src`` that also carries the attack detector ``detector`` (a
    :class:`medfedpure.models.detector.AttackDetector`) — ONNX FP32 and FP16 graphs and its torch weights —
    and whose gate is ``learned``: the mean of the ``topk`` largest patch logits (default: the detector's own
    k). τ is **not calibrated** (τ 0, τ_high 1, no record): this is the first half of attaching a detector, and
    :func:`medfedpure.runtime.calibration.recalibrate` on the new bundle sets the gate
    (``medfedpure calibrate --bundle B --detector D`` does both). Both graphs are checked against torch on
    ``verify_scans`` [N,1,S,S] (default: 8 uniform random images): the agreement is recorded in
    ``provenance.detector`` with the detector's configuration and ``detector_provenance``. The source's
    ``provenance.measured_metrics`` (robustness measured through its own gate) move there too, out of the model
    card's metrics: they do not describe the new gate.

    Raises:
        ValueError: ``out`` is ``src``'s own folder, the detector's image size or patch differs from the bundle's
            (the gate's patch grid), ``src`` already carries a detector, or a graph disagrees with torch.
        FileExistsError: as :func:`write_bundle`.
    """
    import dataclasses

    import torch
    from medfedpure.export.fp16 import convert_to_fp16
    from medfedpure.export.onnx_export import export_detector, verify_against_torch
    from medfedpure.gate import GateSpec
    from medfedpure.models.weights import save_model
    from medfedpure.runtime.manifest import thaw

    if Path(out).resolve() == src.root.resolve():
        raise ValueError(f"{out} is the source bundle's own folder: write the new bundle to a new folder")
    cfg = detector.cfg
    size, old = src.spec.image_size, src.spec.gate
    if cfg.image_size != size or cfg.patch != old.patch:
        raise ValueError(f"the detector reads {cfg.image_size} px scans in {cfg.patch} px patches; the bundle's gate "
                         f"reads {size} px scans in {old.patch} px patches: train the detector with the bundle's "
                         "image size and patch")
    if any(a.role == "detector" for a in src.artefacts.values()):
        raise ValueError(f"bundle {src.short_id} already carries an attack detector")
    k = cfg.topk if topk is None else int(topk)
    gate = GateSpec(stat="learned", patch=old.patch, topk=k, norm_pix=old.norm_pix, tau=0.0, tau_high=1.0,
                    t_min=old.t_min, t_max=old.t_max, policy=old.policy)
    if not 1 <= k <= cfg.num_patches:
        raise ValueError(f"topk={k}: expected 1..{cfg.num_patches} (the detector's patches)")
    detector = detector.eval()
    graph = export_detector(detector, size)
    graphs = {"detector": graph, "detector.fp16": convert_to_fp16(graph)}
    x = (np.random.default_rng(0).random((8, 1, size, size), dtype=np.float32) if verify_scans is None
         else np.ascontiguousarray(verify_scans, dtype=np.float32))
    agreement = {name: verify_against_torch(detector, g, {"x": x}).to_dict() for name, g in graphs.items()}
    if agreement["detector"]["max_abs"] > 1e-3 or agreement["detector.fp16"]["max_abs"] > 0.1:
        raise ValueError(f"the detector's ONNX graphs disagree with torch: {agreement}")
    arts = _copy_of(src, out)
    for name, g in graphs.items():
        arts[name] = ArtefactSource(path=f"{name}.onnx", role="detector", format="onnx",
                                    precision="fp16" if name.endswith(".fp16") else "fp32",
                                    data=g.SerializeToString())
    with tempfile.TemporaryDirectory() as td:
        weights = save_model(Path(td) / "detector.safetensors", detector, cfg, "detector").read_bytes()
    arts["detector.torch"] = ArtefactSource(path="torch/detector.safetensors", role="detector", format="safetensors",
                                            precision="fp32", data=weights)
    provenance = thaw(src.spec.provenance)
    # the source's measured robustness was measured through another gate: kept for the record, out of the card
    source_metrics = provenance.pop("measured_metrics", None)
    provenance["detector"] = {"config": cfg.to_dict(), "onnx_agreement": agreement, "num_verify_scans": len(x),
                              "torch_version": torch.__version__, **dict(detector_provenance or {})}
    if source_metrics:
        provenance["detector"]["source_bundle_metrics"] = {
            "note": "measured on the source bundle through its own gate, not through this learned gate",
            "metrics": source_metrics}
    spec = dataclasses.replace(src.spec, gate=gate, provenance=provenance, scope=src.spec.effective_scope)
    from medfedpure.export.model_card import with_card

    spec, arts = with_card(spec, arts)
    return write_bundle(out, arts, spec, signing_key=signing_key, overwrite=overwrite)


def write_policy_bundle(src: VerifiedBundle, out: str | os.PathLike[str], choice: Mapping[str, Any], *,
                        signing_key: PrivateKeySpec | None = None, overwrite: bool = False) -> VerifiedBundle:
    """A copy of ``src`` whose gate runs the policy of ``choice`` (``medfedpure.eval.policy.PolicyChoice.to_dict()``:
    ``policy``, ``reason``, ``budget``, ``rule``, ``evidence``), recorded whole in ``provenance.policy_choice``
    with the date and the source bundle id, and in the model card's calibration section. Models and τ are
    copied unchanged (each artefact re-verified against ``src``'s manifest as it is read); with the same policy
    as ``src`` only the record changes. Signed as :func:`write_bundle` signs.

    Raises:
        ValueError: ``out`` is ``src``'s own folder, a policy other than adaptive / floor, or no reason.
        FileExistsError: as :func:`write_bundle`.
    """
    import dataclasses
    import datetime

    from medfedpure.export.model_card import with_card
    from medfedpure.runtime.manifest import thaw

    policy, reason = choice.get("policy"), choice.get("reason")
    if policy not in ("adaptive", "floor"):
        raise ValueError(f"policy={policy!r}: use 'adaptive' or 'floor'")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("choice has no reason: a policy is recorded with why it was chosen")
    arts = _copy_of(src, out, card=False)
    record = {**json_safe(dict(choice)), "source_bundle_id": src.bundle_id, "previous_policy": src.spec.gate.policy,
              "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    provenance = {**thaw(src.spec.provenance), "policy_choice": record}
    gate = dataclasses.replace(src.spec.gate, policy=policy)
    spec = dataclasses.replace(src.spec, gate=gate, provenance=provenance, scope=src.spec.effective_scope)
    spec, arts = with_card(spec, arts)
    return write_bundle(out, arts, spec, signing_key=signing_key, overwrite=overwrite)


def write_reissued_bundle(src: VerifiedBundle, out: str | os.PathLike[str], *, reason: str,
                          metrics: Sequence[Mapping[str, Any]] = (), signing_key: PrivateKeySpec | None = None,
                          overwrite: bool = False) -> VerifiedBundle:
    """A copy of ``src`` with the same models and gate, brought up to the current bundle format's
    descriptive sections: the scope written out (the default one where ``src`` had none) and a model card
    generated from the manifest (:func:`medfedpure.export.model_card.with_card`). Every model artefact is
    copied byte for byte (each re-verified against ``src``'s manifest as it is read); ``provenance.reissue``
    records the source bundle id, the date and ``reason``. ``metrics``: measurements of this bundle made since
    it was built, each ``{"name", "value", "command"}`` (optionally ``"split"``, ``"n"``), appended to
    ``provenance.measured_metrics`` (the card's metrics table). Decisions are unchanged (same weights, same
    gate); the bundle id changes with the manifest. Signed as :func:`write_bundle` signs.

    Raises:
        ValueError: ``out`` is ``src``'s own folder, an empty ``reason``, or a metric without a name, a
            numeric value or a command.
        FileExistsError: as :func:`write_bundle`.
    """
    import dataclasses
    import datetime

    from medfedpure.export.model_card import with_card
    from medfedpure.runtime.manifest import thaw

    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("reason: say why the bundle is reissued (recorded in its provenance)")
    arts = _copy_of(src, out, card=False)
    rows = []
    for i, m in enumerate(metrics):
        ok = (isinstance(m, Mapping) and isinstance(m.get("name"), str) and m["name"].strip()
              and isinstance(m.get("command"), str) and m["command"].strip()
              and isinstance(m.get("value"), int | float) and not isinstance(m.get("value"), bool)
              and math.isfinite(m["value"]) and set(m) <= {"name", "value", "command", "split", "n"})
        if not ok:
            raise ValueError(f"metrics[{i}]={m!r}: expected {{name, value (a finite number), command}} and "
                             "optionally split, n")
        rows.append(dict(m))
    reissue = {"source_bundle_id": src.bundle_id, "reason": reason.strip(),
               "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    prov = thaw(src.spec.provenance)
    provenance = {**prov, "reissue": reissue, "measured_metrics": [*(prov.get("measured_metrics") or []), *rows]}
    spec = dataclasses.replace(src.spec, provenance=provenance, scope=src.spec.effective_scope)
    spec, arts = with_card(spec, arts)
    return write_bundle(out, arts, spec, signing_key=signing_key, overwrite=overwrite)
