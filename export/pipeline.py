"""From a training run to a verified bundle: ``medfedpure export --run RUN --site K --out BUNDLE``.

Steps (each recorded in the manifest's provenance):

1. load the site's classifier, the shared MAE and the distilled student from the run folder
   (safetensors + config; ``medfedpure.models.weights``) and the site's ``calibration.json``;
2. export the three networks to ONNX (FP32, dynamic batch) and convert FP16 variants
   (:mod:`medfedpure.export.fp16`: FP32 interfaces; normalisation/softmax/reductions and the
   denoiser's time/noise-level branch in FP32);
3. verify torch against ONNX Runtime on the site's validation scans (max/mean abs error, top-1
   agreement, gate-flag agreement) for FP32 and FP16, and measure what FP16 does to the whole
   purifier: top-1 agreement of the downstream classifier on scans purified by the FP32 and the
   FP16 denoiser with identical noise;
4. write the bundle (ONNX FP32 + FP16 + the torch weights) and re-verify it with the runtime's
   reader. Verification thresholds failing → :class:`ExportVerificationError`, nothing written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from medfedpure.export.bundle_writer import ArtefactSource, write_bundle
from medfedpure.export.fp16 import convert_to_fp16, fp16_summary
from medfedpure.export.model_card import with_card
from medfedpure.export.onnx_export import (
    export_classifier,
    export_denoiser,
    export_mae_scorer,
    ort_session,
    verify_against_torch,
)
from medfedpure.gate import GateSpec, run_gate
from medfedpure.models.diffusion import forward_noise
from medfedpure.runtime.bundle import VerifiedBundle
from medfedpure.runtime.manifest import BundleSpec, MaeSpec, Preprocessing, PurifierSpec, Scope
from medfedpure.runtime.sampler import SAMPLER, purify_numpy

FP32_TOLERANCE = {"classifier": 1e-4, "mae": 1e-3, "denoiser": 1e-3}  # max abs error, torch vs ORT FP32
MIN_TOP1_FP32 = 1.0
MIN_TOP1_FP16 = 0.99


class ExportVerificationError(RuntimeError):
    """ONNX Runtime does not reproduce torch within the stated tolerances."""


def _code_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _gate_section(calibration: Mapping[str, Any], mae_cfg: Any) -> GateSpec:
    from medfedpure.train.calibrate import calibration_gate_spec

    need = ("tau", "tau_high", "t_min", "t_max", "patch")
    missing = [k for k in need if k not in calibration]
    if missing:
        raise ValueError(f"calibration lacks {missing}: run `medfedpure calibrate` for this site")
    if "calibration" not in calibration:  # the flat layout of older runs, where norm_pix was optional
        calibration = {"norm_pix": bool(mae_cfg.norm_pix), **calibration}
    gate = calibration_gate_spec(calibration)  # ValueError on a bad field or policy
    if gate.patch != int(mae_cfg.patch):
        raise ValueError(f"calibration patch {gate.patch} != the MAE's patch {mae_cfg.patch}")
    if gate.norm_pix != bool(mae_cfg.norm_pix):
        raise ValueError("calibration norm_pix disagrees with the MAE's config")
    return gate


def verify_models(
    classifier: torch.nn.Module,
    scorer: torch.nn.Module,
    student: torch.nn.Module,
    graphs: Mapping[str, onnx.ModelProto],
    gate: GateSpec,
    steps: int,
    x_val: np.ndarray,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Torch vs ONNX Runtime on validation scans ``x_val`` [N,1,S,S] (FP32 and FP16 graphs).

    Returns a JSON-ready report: per graph and precision the :class:`Agreement`, the gate-flag
    agreement from torch vs ORT reconstructions, and ``purifier_fp16_top1``: downstream
    classifier top-1 agreement between FP32- and FP16-purified scans (same noise) at t_min and
    t_max.
    """
    rng = np.random.Generator(np.random.Philox(key=seed))
    n = x_val.shape[0]
    alphas = student.schedule.alphas_cumprod.numpy()
    t_lo, t_hi = gate.t_min, gate.t_max
    t_eval = np.where(np.arange(n) % 2 == 0, t_lo, t_hi).astype(np.float32)
    noise = rng.standard_normal(x_val.shape, dtype=np.float32)
    x_t = forward_noise(torch.from_numpy(x_val), torch.from_numpy(t_eval), torch.from_numpy(noise),
                        student.schedule).numpy()
    report: dict[str, Any] = {"num_scans": int(n)}
    vis = scorer.visible.numpy()

    def gate_flags(recon: np.ndarray) -> np.ndarray:
        return run_gate(gate, x_val[:, 0], recon, vis).flag

    with torch.no_grad():
        recon_torch = scorer(torch.from_numpy(x_val)).numpy()
    for prec in ("fp32", "fp16"):
        sfx = "" if prec == "fp32" else ".fp16"
        r_cls = verify_against_torch(classifier, graphs["classifier" + sfx], {"x": x_val}, classify=True)
        r_mae = verify_against_torch(scorer, graphs["mae" + sfx], {"x": x_val})
        r_den = verify_against_torch(student, graphs["denoiser" + sfx], {"x_t": x_t, "t": t_eval})
        recon_ort = ort_session(graphs["mae" + sfx]).run(None, {"x": x_val})[0]
        report[prec] = {
            "classifier": r_cls.to_dict(), "mae": r_mae.to_dict(), "denoiser": r_den.to_dict(),
            "gate_flag_agreement": float((gate_flags(recon_torch) == gate_flags(recon_ort)).mean()),
        }
    # What FP16 does to the whole purifier: same noise, FP32 vs FP16 denoiser, FP32 classifier.
    cls_sess = ort_session(graphs["classifier"])
    pur_noise = rng.standard_normal(x_val.shape, dtype=np.float32)
    out: dict[str, float] = {}
    for t in (t_lo, t_hi):
        if t == 0:
            continue
        t_star = np.full(n, t, dtype=np.int64)
        labels = []
        for name in ("denoiser", "denoiser.fp16"):
            sess = ort_session(graphs[name])

            def den(y: np.ndarray, tt: np.ndarray, sess: Any = sess) -> np.ndarray:
                return sess.run(None, {"x_t": y, "t": tt})[0]

            pur = purify_numpy(den, x_val, t_star, pur_noise, alphas, steps)
            labels.append(cls_sess.run(None, {"x": pur})[0].argmax(1))
        out[f"t{t}"] = float((labels[0] == labels[1]).mean())
    report["purifier_fp16_top1"] = out
    return report


def check_report(report: Mapping[str, Any]) -> None:
    """Raise :class:`ExportVerificationError` when FP32 or FP16 graphs miss their tolerances."""
    problems = []
    for role, tol in FP32_TOLERANCE.items():
        err = report["fp32"][role]["max_abs"]
        if err > tol:
            problems.append(f"FP32 {role}: max abs error {err:.3g} > {tol:g}")
    if report["fp32"]["classifier"]["top1"] < MIN_TOP1_FP32:
        problems.append(f"FP32 classifier top-1 agreement {report['fp32']['classifier']['top1']:.4f} < 1")
    if report["fp16"]["classifier"]["top1"] < MIN_TOP1_FP16:
        problems.append(f"FP16 classifier top-1 agreement {report['fp16']['classifier']['top1']:.4f} < {MIN_TOP1_FP16}")
    if problems:
        raise ExportVerificationError("; ".join(problems))


def build_bundle(
    out: str | Path,
    *,
    classifier: torch.nn.Module,
    classifier_cfg: Any,
    mae: torch.nn.Module,
    mae_cfg: Any,
    student: torch.nn.Module,
    student_cfg: Any,
    calibration: Mapping[str, Any],
    x_val: np.ndarray,
    provenance: Mapping[str, Any],
    weights: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[VerifiedBundle, dict[str, Any]]:
    """Export, verify and write a bundle from in-memory models.

    Args:
        classifier / mae / student: the site's MoE classifier, the MAE (a ``MaskedAutoencoder``;
            wrapped in ``MAEScorer`` here), the distilled student UNet — all eval mode, CPU.
        *_cfg: their configs (saved with the weights).
        calibration: the site's gate (``calibration.json``), with ``steps`` (K) for the sampler.
        x_val: [N,1,S,S] float32 validation scans in [0,1] for verification (N ≥ 2).
        provenance: run, site, config hash, data fingerprint, metrics … (extended here).
        weights: safetensors bytes per role (``classifier``/``mae``/``denoiser``), e.g. copied from
            the run folder; saved from the models when None.
    """
    from medfedpure.models.mae import MAEScorer
    from medfedpure.models.weights import save_model

    say = progress or (lambda _m: None)
    size = int(x_val.shape[-1])
    if x_val.ndim != 4 or x_val.shape[1] != 1 or x_val.shape[0] < 2 or x_val.dtype != np.float32:
        raise ValueError(f"x_val has shape {x_val.shape} / {x_val.dtype}: expected float32 [N>=2, 1, S, S]")
    gate = _gate_section(calibration, mae_cfg)
    steps = int(calibration.get("steps", 1))
    if steps < 1:
        raise ValueError(f"calibration steps={steps}: need K >= 1")
    for m in (classifier, mae, student):
        m.eval()
    scorer = MAEScorer(mae).eval()
    say("exporting classifier.onnx")
    graphs = {"classifier": export_classifier(classifier, size)}
    say("exporting mae.onnx")
    graphs["mae"] = export_mae_scorer(scorer, size)
    say("exporting denoiser.onnx")
    graphs["denoiser"] = export_denoiser(student, size)
    say("converting FP16 variants")
    graphs["classifier.fp16"] = convert_to_fp16(graphs["classifier"])
    graphs["mae.fp16"] = convert_to_fp16(graphs["mae"])
    graphs["denoiser.fp16"] = convert_to_fp16(graphs["denoiser"], fp16_from=frozenset({"x_t"}))
    say("verifying torch vs onnxruntime on validation scans")
    report = verify_models(classifier, scorer, student, graphs, gate, steps, x_val)
    report["fp16_graphs"] = {k: fp16_summary(v) for k, v in graphs.items() if k.endswith(".fp16")}
    check_report(report)

    if weights is None:
        weights = {}
        with tempfile.TemporaryDirectory() as td:
            for role, (m, cfg, kind) in {"classifier": (classifier, classifier_cfg, "moe"),
                                          "mae": (mae, mae_cfg, "mae"),
                                          "denoiser": (student, student_cfg, "unet")}.items():
                p = save_model(Path(td) / f"{role}.safetensors", m, cfg, kind)
                weights[role] = p.read_bytes()
    arts: dict[str, ArtefactSource] = {}
    for name, g in graphs.items():
        role, prec = (name.split(".")[0], "fp16") if name.endswith(".fp16") else (name, "fp32")
        arts[name] = ArtefactSource(path=f"{name}.onnx", role=role, format="onnx", precision=prec,
                                    data=g.SerializeToString())
    for role, data in weights.items():
        arts[f"{role}.torch"] = ArtefactSource(path=f"torch/{role}.safetensors", role=role, format="safetensors",
                                               precision="fp32", data=data)
    sched = student.schedule
    prov = dict(provenance)
    prov.setdefault("code_commit", _code_commit())
    prov["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    prov["versions"] = {"medfedpure": _version(), "torch": torch.__version__, "onnx": onnx.__version__,
                        "opset": 20}
    prov["verification"] = report
    prov["model_configs"] = {"classifier": _cfg_dict(classifier_cfg), "mae": _cfg_dict(mae_cfg),
                             "denoiser": _cfg_dict(student_cfg)}
    say("writing the bundle")
    spec = BundleSpec(
        classes=("no_tumor", "tumor"),
        image_size=size,
        preprocessing=Preprocessing(size=size),
        mae=MaeSpec(patch=int(mae_cfg.patch), k=int(scorer.k), norm_pix=bool(mae_cfg.norm_pix),
                    visible=scorer.visible.numpy()),
        purifier=PurifierSpec(schedule=sched.schedule, num_timesteps=int(sched.num_timesteps),
                              alphas_cumprod=sched.alphas_cumprod.numpy(), steps=steps, sampler=SAMPLER),
        gate=gate,
        provenance=prov,
        scope=Scope(),  # written explicitly: MR, brain or head, original or derived, axial within 30°
    )
    spec, arts = with_card(spec, arts)  # MODEL_CARD.md + provenance.card, both covered by the signature
    vb = write_bundle(out, arts, spec, overwrite=overwrite)
    return vb, report


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg)


def _version() -> str:
    from medfedpure import __version__

    return __version__


def sha256_json_file(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_data_root(run: str | Path) -> Path:
    """The data root a run folder was trained on, from its ``config.json``.

    Federated runs (``fed sim``/``deploy`` and the bundle build) write ``{"fed": FedConfig}`` with
    ``data_dir``; per-site training (``medfedpure train …``) writes one section per job, each with
    ``data``. Raises ValueError naming the file when it names none or names different roots.
    """
    cfg_path = Path(run) / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{cfg_path} does not exist: pass the data root explicitly (--data)")
    cfg = json.loads(cfg_path.read_text())
    fed = cfg.get("fed")
    if isinstance(fed, dict) and fed.get("data_dir"):
        return Path(fed["data_dir"])
    roots = {str(sec["data"]) for sec in cfg.values() if isinstance(sec, dict) and sec.get("data")}
    if len(roots) == 1:
        return Path(roots.pop())
    if roots:
        raise ValueError(f"{cfg_path} names several data roots {sorted(roots)}: pass --data")
    raise ValueError(f"{cfg_path} names no data root (neither fed.data_dir nor a job's data): pass --data")


def export_run(run: str | Path, site: int, out: str | Path, *, data: str | Path | None = None,
               num_val: int = 64, overwrite: bool = False,
               progress: Callable[[str], None] | None = None) -> tuple[VerifiedBundle, dict[str, Any]]:
    """Export site ``site`` of a training run folder (docs/interfaces.md "Run folder") to a bundle.

    Args:
        run: the run folder. site: the site index k (``RUN/site_k``).
        data: the data root for validation scans (default: the run's, :func:`run_data_root`).
        num_val: number of the site's validation scans used for verification.
    """
    from medfedpure.data import fingerprint, load_split
    from medfedpure.models.weights import load_model

    run = Path(run)
    site_dir = run / f"site_{site}"
    paths = {"classifier": site_dir / "classifier.safetensors", "mae": run / "mae.safetensors",
             "denoiser": run / "student.safetensors", "calibration": site_dir / "calibration.json"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"run folder {run} lacks {missing}: train and calibrate site {site} first")
    cfg_path = run / "config.json"
    if data is None:
        data = run_data_root(run)
    classifier, ccfg, _ = load_model(paths["classifier"])
    mae, mcfg, _ = load_model(paths["mae"])
    student, scfg, _ = load_model(paths["denoiser"])
    calibration = json.loads(paths["calibration"].read_text())
    x_val, _ = load_split(data, site, "val", size=int(ccfg.image_size))
    x_val = np.ascontiguousarray(x_val[:num_val], dtype=np.float32)
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    try:
        data_fp = fingerprint(data)
    except Exception:  # noqa: BLE001 - provenance is best effort, recorded as unknown
        data_fp = None
    dataset = {}
    ds_path = Path(data) / "dataset.json"
    if ds_path.is_file():  # the data set's kind and, for synthetic data, how to render more of the same site
        ds = json.loads(ds_path.read_text())
        dataset = {k: ds[k] for k in ("kind", "seed", "num_sites", "size", "generator_version", "config")
                   if k in ds}
    provenance = {"run": run.name, "site": int(site), "training_config_sha256": sha256_json_file(cfg_path),
                  "dataset_fingerprint": data_fp, "dataset": dataset, "metrics": metrics,
                  "calibration_sha256": sha256_json_file(paths["calibration"]),
                  "weights_sha256": {k: sha256_json_file(p) for k, p in paths.items() if k != "calibration"}}
    weights = {k: p.read_bytes() for k, p in paths.items() if k != "calibration"}
    return build_bundle(out, classifier=classifier, classifier_cfg=ccfg, mae=mae, mae_cfg=mcfg, student=student,
                        student_cfg=scfg, calibration=calibration, x_val=x_val, provenance=provenance,
                        weights=weights, overwrite=overwrite, progress=progress)
