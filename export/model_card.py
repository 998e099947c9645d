"""The model card every exported bundle carries: ``MODEL_CARD.md`` plus ``provenance.card``.

One function, :func:`model_card`, derives the card from a bundle's typed manifest sections
(:class:`medfedpure.runtime.manifest.BundleSpec`): what the model is for and not for, the training
data and sites and the calibration (from the provenance and the gate), the metrics measured when the
bundle was built (each with the command that measured it; "not measured" when none was recorded —
nothing is estimated here), the limitations and the license. :func:`with_card` puts it into a bundle
about to be written: the structured card goes into ``provenance.card`` (so the manifest, and with it
the signature, covers it) and the rendered Markdown into the artefact ``model_card``
(``MODEL_CARD.md``, role ``card``), whose sha256 the manifest lists like any other file's.

Both writers call it: the exporter (:func:`medfedpure.export.pipeline.build_bundle`) and the
recalibration of a shipped bundle (:func:`medfedpure.export.bundle_writer.write_recalibrated_bundle`,
``medfedpure calibrate --bundle``), which regenerates the card from the new gate and
``provenance.recalibration`` so that its calibration section describes the new τ.

Metrics recorded at build time: ``provenance.measured_metrics``, a list of ``{"name", "value",
"command"}`` (and optionally ``"split"``, ``"n"``), written by whatever measured them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from medfedpure.runtime.bundle import CARD_ARTEFACT
from medfedpure.runtime.manifest import BundleSpec, thaw

__all__ = ["CARD_ARTEFACT", "CARD_PATH", "CARD_VERSION", "LICENSE", "model_card", "render_card", "with_card"]

CARD_PATH = "MODEL_CARD.md"
CARD_VERSION = 1
LICENSE = "Apache-2.0 (code and weights of this bundle); the training data's own terms apply to the data"

INTENDED_USE = (
    "Decision support for triage of axial brain MRI slices (2D, adult patients) into no_tumor / tumor, run "
    "at the edge through `medfedpure run` / `Defender.load(bundle).run(scan)`. Every answer carries a status; "
    "an 'unverified' answer, or a flagged scan, is meant for a human reader, not for an automated decision. "
    "Not a medical device: not cleared or approved for diagnosis.")
OUT_OF_SCOPE = (
    "CT, PET, X-ray or any modality other than MRI",
    "non-axial (sagittal, coronal) or oblique slices, and 3D volumes taken as a whole",
    "paediatric patients",
    "diagnosis without a clinician: the output is a triage signal",
    "tumour grading, segmentation or localisation: the model answers tumour present / absent only",
    "sites or scanners unlike the training sites without recalibrating the gate (`medfedpure calibrate --bundle`)",
)
LIMITATIONS = (
    "The gate flags a fixed fraction of clean scans by design (the calibrated false-flag rate); flagged scans "
    "are purified and may lose fine detail.",
    "Robustness is no more than the measured metrics show, for the attacks and budgets named there; the "
    "weights ship with the bundle, so plan for an attacker who has them (adaptive attacks through the whole "
    "pipeline), and stronger or longer attacks than those measured can do better.",
    "The gate's statistic is calibrated for the scanners it was calibrated on; on another scanner recalibrate "
    "it on that scanner's clean scans before trusting the flag.",
    "Trained on the data listed under training data only; performance on other populations, scanners or "
    "protocols is not known until measured there.",
    "Images are reduced to one grey channel at the bundle's image size; findings smaller than a few pixels at "
    "that size are not seen.",
)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "not recorded" if v is None else str(v)


def _training_data(prov: Mapping[str, Any]) -> dict[str, Any]:
    ds = prov.get("dataset") or {}
    cfg = ds.get("config") or {}
    return {"kind": ds.get("kind", "not recorded"), "num_sites": ds.get("num_sites", cfg.get("sites")),
            "scans_per_site": cfg.get("per_site"), "image_size": ds.get("size", cfg.get("size")),
            "seed": ds.get("seed"), "fingerprint": prov.get("dataset_fingerprint"),
            "bundle_site": prov.get("site"), "run": prov.get("run"),
            "training_config_sha256": prov.get("training_config_sha256")}


def _calibration(spec: BundleSpec) -> dict[str, Any]:
    g = spec.gate
    cal = g.calibration
    out: dict[str, Any] = {"statistic": g.stat, "tau": g.tau, "tau_high": g.tau_high, "policy": g.policy,
                           "t_min": g.t_min, "t_max": g.t_max,
                           "target_false_flag_rate": cal.target_false_flag_rate if cal else None,
                           "achieved_false_flag_rate": cal.val_false_flag_rate if cal else None,
                           "num_scans": cal.num_val_scans if cal else None,
                           "source": "the training site's clean validation scans"}
    rec = spec.provenance.get("recalibration")
    if rec:
        rec = thaw(rec)
        what = rec.get("description") or "a site's own clean scans"
        out.update(source=f"recalibrated on {what} (medfedpure calibrate --bundle)",
                   recalibration={k: rec.get(k) for k in sorted(rec)})
        for key in ("num_scans", "achieved_false_flag_rate", "target_false_flag_rate"):
            if rec.get(key) is not None:
                out[key] = rec[key]
    choice = spec.provenance.get("policy_choice")
    if choice:
        choice = thaw(choice)
        out["policy_choice"] = {k: choice.get(k) for k in ("policy", "reason", "budget", "date")}
    return out


def _metrics(prov: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for m in prov.get("measured_metrics") or ():
        if isinstance(m, Mapping) and "name" in m and "value" in m and m.get("command"):
            rows.append({k: m[k] for k in ("name", "value", "command", "split", "n") if k in m})
    ver = prov.get("verification") or {}
    n = ver.get("num_scans")
    cmd = "medfedpure export (its verification step, torch vs onnxruntime on the site's validation scans)"
    for prec in ("fp32", "fp16"):
        top1 = ((ver.get(prec) or {}).get("classifier") or {}).get("top1")
        if top1 is not None:
            rows.append({"name": f"{prec.upper()} ONNX classifier top-1 agreement with torch", "value": top1,
                         "command": cmd, "n": n})
        flags = (ver.get(prec) or {}).get("gate_flag_agreement")
        if flags is not None:
            rows.append({"name": f"{prec.upper()} ONNX gate flag agreement with torch", "value": flags,
                         "command": cmd, "n": n})
    det = prov.get("detector") or {}
    for name, agr in (det.get("onnx_agreement") or {}).items():
        if isinstance(agr, Mapping) and agr.get("max_abs") is not None:
            prec = "FP16" if name.endswith(".fp16") else "FP32"
            rows.append({"name": f"{prec} ONNX attack detector, largest patch-logit difference from torch",
                         "value": agr["max_abs"], "n": det.get("num_verify_scans"),
                         "command": "medfedpure calibrate --bundle B --detector D (its verification step)"})
    return rows


def model_card(spec: BundleSpec, *, license: str = LICENSE) -> dict[str, Any]:
    """The structured card of a bundle whose manifest sections are ``spec`` (JSON-ready dict).

    Deterministic in ``spec`` (ignoring any ``provenance.card`` already there), so regenerating it
    after a change to the gate changes exactly the calibration section.
    """
    prov = {k: v for k, v in thaw(spec.provenance).items() if k != "card"}
    return {
        "card_version": CARD_VERSION,
        "model": {"task": "brain MRI slice classification", "classes": list(spec.classes),
                  "image_size": spec.image_size, "purifier_steps": spec.purifier.steps,
                  "created_utc": prov.get("created_utc"), "code_commit": prov.get("code_commit"),
                  "versions": prov.get("versions")},
        "intended_use": INTENDED_USE,
        "out_of_scope": list(OUT_OF_SCOPE),
        "training_data": _training_data(prov),
        "calibration": _calibration(spec),
        "metrics": _metrics(prov),
        "limitations": list(LIMITATIONS),
        "license": license,
    }


def render_card(card: Mapping[str, Any]) -> str:
    """The Markdown of a structured card (what ``MODEL_CARD.md`` holds)."""
    m, td, cal = card["model"], card["training_data"], card["calibration"]
    lines = ["# Model card: medfedpure bundle", "",
             f"Task: {m['task']} into {' / '.join(m['classes'])} at {m['image_size']} px; purifier of "
             f"{m['purifier_steps']} step(s). Built {_num(m.get('created_utc'))} from code commit "
             f"{_num(m.get('code_commit'))}.", "",
             "## Intended use", "", card["intended_use"], "",
             "## Out-of-scope uses", "", *[f"- {u}" for u in card["out_of_scope"]], "",
             "## Training data and sites", "",
             f"- data set: {_num(td['kind'])}, {_num(td['num_sites'])} sites, {_num(td['scans_per_site'])} scans per "
             f"site, {_num(td['image_size'])} px",
             f"- this bundle's site: {_num(td['bundle_site'])} (training run folder `{_num(td['run'])}`)",
             f"- data-set fingerprint: {_num(td['fingerprint'])}",
             f"- training-config sha256: {_num(td['training_config_sha256'])}", "",
             "## Calibration", "",
             f"- gate: statistic {cal['statistic']}, τ = {_num(cal['tau'])}, τ_high = {_num(cal['tau_high'])}, "
             f"policy {cal['policy']}, t* ∈ [{cal['t_min']}, {cal['t_max']}]",
             f"- target false-flag rate: {_num(cal['target_false_flag_rate'])}; achieved: "
             f"{_num(cal['achieved_false_flag_rate'])} on {_num(cal['num_scans'])} clean scans",
             f"- calibrated on: {cal['source']}"]
    rec = cal.get("recalibration")
    if rec:
        lines += ["- recalibration (size, fingerprint, date, source bundle, achieved rate with its interval):"]
        lines += [f"  - {k}: {_num(v)}" for k, v in rec.items() if not isinstance(v, Mapping)]
        guarantee = rec.get("false_flag_guarantee")
        if isinstance(guarantee, Mapping):
            lines += [f"- guarantee: the false-flag rate on new clean scans like the calibration set is at most "
                      f"{_num(guarantee.get('rate'))} with probability {_num(guarantee.get('confidence'))} (over the "
                      "draw of the calibration scans)"]
    choice = cal.get("policy_choice")
    if choice:
        lines += [f"- policy chosen by `medfedpure bundle choose-policy` ({_num(choice.get('date'))}, "
                  f"{_num(choice.get('budget'))} budget): {_num(choice.get('reason'))}"]
    lines += ["", "## Measured metrics", ""]
    if card["metrics"]:
        lines += ["| metric | value | split | n | command |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {_num(r['value'])} | {_num(r.get('split'))} | {_num(r.get('n'))} | "
                  f"`{r['command']}` |" for r in card["metrics"]]
    else:
        lines += ["Not measured: no metrics were recorded when this bundle was built."]
    lines += ["", "Metrics not listed here were not measured for this bundle.",
              "", "## Limitations", "", *[f"- {x}" for x in card["limitations"]], "",
              "## License", "", card["license"], ""]
    return "\n".join(lines)


def with_card(spec: BundleSpec, artefacts: Mapping[str, Any]) -> tuple[BundleSpec, dict[str, Any]]:
    """``spec`` with ``provenance.card`` set and ``artefacts`` with ``MODEL_CARD.md`` (replacing any
    earlier card), ready for :func:`medfedpure.export.bundle_writer.write_bundle`."""
    from medfedpure.export.bundle_writer import ArtefactSource, json_safe

    card = json_safe(model_card(spec))
    prov = {**{k: v for k, v in thaw(spec.provenance).items() if k != "card"}, "card": card}
    arts = {k: v for k, v in artefacts.items() if k != CARD_ARTEFACT}
    arts[CARD_ARTEFACT] = ArtefactSource(path=CARD_PATH, role="card", format="markdown", precision="none",
                                         data=render_card(card).encode("utf-8"))
    return dataclasses.replace(spec, provenance=prov), arts
