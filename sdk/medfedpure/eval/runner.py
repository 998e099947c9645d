"""``medfedpure eval``: the attack ladder of docs/evaluation.md on a bundle, one report per run.

:func:`run_eval` loads the bundle as a ``Defender`` and its torch reference, loads each site's split,
attacks it rung by rung at every ε, judges every adversarial scan through the real Defender ``R`` times
with fresh keys, runs the sanity checks (:mod:`medfedpure.eval.sanity`) and writes the report
(:mod:`medfedpure.eval.report`). The rungs (each a row of the report, per ε):

1. ``paper``: PGD against the classifier alone at the paper's settings (:data:`PAPER`: 7 steps; one
   extra row at the paper's own ε = 0.015 ℓ∞), judged on the bare classifier and through the Defender;
2. full-pipeline PGD with EOT through the shipped function, cross-entropy and margin losses; the
   ``worst`` row counts a scan correct in a run only when it survives both;
3. detector-aware (ℓ∞): (a) stay under τ, pixel-space and band-limited; (b) flagged
   and fooled after purification, which is rung 2's objective; ``worst`` = per scan over (a) and (b);
4. torchattacks' APGD-CE with EOT on the pipeline module (and APGD-DLR when torchattacks can run it
   with this many classes; otherwise the row records why it is skipped);
5. the worst over the R judged runs of the worst white-box rung per scan (2, 3, 4);
6. transfer from an independently trained surrogate: PGD, and (ℓ∞, ``hfratio``) the band-limited
   evasion with the surrogate's gradients and no deployed weights.

ε is in input units of the preprocessed [0, 1] scan (ℓ∞ radii are typed in /255 on the command line).
Labels are used only to score answers; the defence never sees them.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfedpure.data.loader import LESION_KINDS
from medfedpure.eval.adaptive import (
    apgd_dlr_unsupported,
    apgd_pipeline,
    evasion_pgd,
    pipeline_pgd,
    transfer_evasion,
)
from medfedpure.eval.defended import tpr_at_fpr
from medfedpure.eval.device import (
    EVAL_DEVICES,
    attack_generator,
    defender_device,
    device_info,
    host,
    resolve_device,
)
from medfedpure.eval.pipeline import NORMS
from medfedpure.gate.calibration import auroc
from medfedpure.progress import progress as progress_bar
from medfedpure.train.attacks import pgd_l2, pgd_linf
from medfedpure.train.device import channels_last_enabled, module_device

__all__ = ["PAPER", "RUNGS", "Budget", "EvalConfig", "EvalError", "parse_attacks", "parse_eps", "run_eval",
           "judge", "auroc", "tpr_at_fpr"]

#: The MedFedPure paper's attack (rung 1): PGD against the classifier alone, ℓ∞ ε = 0.015, 7 steps.
PAPER = {"attack": "PGD against the classifier alone", "norm": "linf", "eps": 0.015, "steps": 7}
RUNGS = (1, 2, 3, 4, 5, 6)
BUDGETS = ("quick", "full")


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class Budget:
    """How hard the attacks try (docs/evaluation.md, "Budgets").

    Attributes:
        name: ``quick`` (CI-sized, reported as reduced) or ``full`` (the protocol's budget).
        steps: iterations of every iterative white-box attack (PGD, APGD, evasion; rung 1 keeps the paper's 7).
        eot: purification-noise draws per step (EOT) for rungs 2 and 3.
        eot_apgd: draws per step for APGD (rung 4).
        repeats: R, Defender runs per adversarial scan with fresh keys (rung 5 is the worst of them).
        limit: first N scans of each site's split (0: every scan).
        sanity_scans: scans the sanity checks attack (the first ones of the split).
        surrogate_preset: architecture and recipe of a surrogate trained here (``tiny`` or ``small``).
        surrogate_epochs: its training epochs.
    """

    name: str = "quick"
    steps: int = 5
    eot: int = 2
    eot_apgd: int = 2
    repeats: int = 2
    limit: int = 8
    sanity_scans: int = 8
    surrogate_preset: str = "tiny"
    surrogate_epochs: int = 2

    def __post_init__(self) -> None:
        for k in ("steps", "eot", "eot_apgd", "repeats", "sanity_scans", "surrogate_epochs"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"Budget.{k}={getattr(self, k)}: must be >= 1")
        if self.limit < 0:
            raise ValueError(f"Budget.limit={self.limit}: must be >= 0 (0: every scan)")
        if self.surrogate_preset not in ("tiny", "small"):
            raise ValueError(f"Budget.surrogate_preset={self.surrogate_preset!r}: use 'tiny' or 'small'")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Budget:
        """``quick``: 5 steps, EOT 2, R 2, 8 scans; ``full``: 100 steps, EOT 10 (APGD 20), R 5, every scan.
        ``overrides`` (None values ignored) replace fields; the name then gains ``+custom`` unless the
        result still meets the full budget."""
        if name == "quick":
            base = cls()
        elif name == "full":
            base = cls(name="full", steps=100, eot=10, eot_apgd=20, repeats=5, limit=0, sanity_scans=32,
                       surrogate_preset="small", surrogate_epochs=60)
        else:
            raise ValueError(f"budget {name!r}: use one of {BUDGETS}")
        changed = {k: v for k, v in overrides.items() if v is not None and getattr(base, k) != v}
        out = replace(base, **changed)
        if changed and not (name == "full" and out.is_full):
            out = replace(out, name=f"{name}+custom")
        return out

    @property
    def is_full(self) -> bool:
        """Meets the protocol's full budget: ≥ 100 steps, EOT ≥ 10 (APGD ≥ 20), R ≥ 5, every scan."""
        return self.steps >= 100 and self.eot >= 10 and self.eot_apgd >= 20 and self.repeats >= 5 and self.limit == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "full": self.is_full}


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run (``medfedpure eval``'s options).

    ``sites``: site indices, or None for every site of the data folder; ``rungs``: a subset of
    :data:`RUNGS`; ``eps``: radii in input units (ℓ∞ or ℓ2, ``norm``), ``eps_labels`` as typed;
    ``limit``: overrides the budget's scan limit when not None; ``policy``: the gate policy of the
    evaluated Defender (None: the bundle's); ``device``: where the attacks, the surrogate's attacks and
    the certification run, and the judged Defender with them where its backend can
    (:mod:`medfedpure.eval.device`; ``cpu``, ``cuda`` or ``auto``); ``expected_id`` / ``trusted_keys`` /
    ``allow_unsigned``: the bundle's trust, as :meth:`medfedpure.Defender.load` (a bundle recalibrated at a
    site is signed by the site's key, which ``trusted_keys`` names).
    """

    data: str
    eps: tuple[float, ...]
    eps_labels: tuple[str, ...]
    sites: tuple[int, ...] | None = (0,)
    rungs: tuple[int, ...] = RUNGS
    norm: str = "linf"
    budget: Budget = field(default_factory=Budget)
    policy: str | None = None
    split: str = "test"
    limit: int | None = None
    surrogate: str | None = None
    seed: int = 0
    bundle: str | None = None
    backend: str = "onnxruntime"
    threads: int = 1
    certify_sigmas: tuple[float, ...] = ()
    certify_n: int = 100
    evasion_factor: int = 2
    examples: int = 3
    progress: bool = True
    device: str = "cpu"
    expected_id: str | None = None
    trusted_keys: tuple[str, ...] = ()
    allow_unsigned: bool = False

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: expected one of {NORMS}")
        if not self.eps or len(self.eps) != len(self.eps_labels):
            raise ValueError("eps: give at least one radius (and one label per radius)")
        if any(not e > 0 for e in self.eps):
            raise ValueError(f"eps={self.eps}: every radius must be > 0")
        if not self.rungs or not set(self.rungs) <= set(RUNGS):
            raise ValueError(f"rungs={self.rungs}: expected a non-empty subset of {RUNGS}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit={self.limit}: must be >= 0 (0: every scan)")
        if self.policy not in (None, "adaptive", "floor"):
            raise ValueError(f"policy={self.policy!r}: expected 'adaptive', 'floor' or None (the bundle's)")
        if any(not s > 0 for s in self.certify_sigmas):
            raise ValueError(f"certify_sigmas={self.certify_sigmas}: every σ must be > 0")
        if self.certify_n < 2:
            raise ValueError(f"certify_n={self.certify_n}: must be >= 2")
        if self.evasion_factor < 1:
            raise ValueError(f"evasion_factor={self.evasion_factor}: must be >= 1")
        if self.device not in EVAL_DEVICES:
            raise ValueError(f"device={self.device!r}: expected one of {EVAL_DEVICES}")

    @property
    def scan_limit(self) -> int:
        return self.budget.limit if self.limit is None else self.limit


def parse_attacks(spec: str) -> tuple[int, ...]:
    """``paper`` → (1,); ``ladder`` → every rung; ``2,3,6`` → those rungs (sorted)."""
    s = spec.strip().lower()
    if s == "paper":
        return (1,)
    if s == "ladder":
        return RUNGS
    try:
        rungs = tuple(sorted({int(r) for r in s.split(",") if r.strip()}))
    except ValueError:
        raise EvalError(f"--attacks {spec!r}: use 'paper', 'ladder' or a comma list of rungs {RUNGS}") from None
    if not rungs or not set(rungs) <= set(RUNGS):
        raise EvalError(f"--attacks {spec!r}: use 'paper', 'ladder' or a comma list of rungs {RUNGS}")
    return rungs


def parse_eps(spec: str, norm: str) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """Radii as typed → (input-space radii, labels). ℓ∞: in /255 (``8`` → 8/255); ℓ2: in input units."""
    try:
        vals = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"--eps {spec!r}: expected a comma list of numbers") from None
    if not vals or any(not v > 0 for v in vals):
        raise EvalError(f"--eps {spec!r}: expected positive radii")
    if norm == "linf":
        return tuple(v / 255 for v in vals), tuple(f"{v:g}/255" for v in vals)
    return tuple(vals), tuple(f"{v:g}" for v in vals)


# metrics -----------------------------------------------------------------------------------------

def judge(d: Any, x: np.ndarray, y: np.ndarray, repeats: int, seed: int, batch: int = 16) -> dict[str, np.ndarray]:
    """The real Defender on x [N, 1, S, S], ``repeats`` times with fresh keys (run r, scan i: seed
    ``seed + 1_000_003·r + i``): ``correct``, ``flag`` bool [R, N] (an unverified answer is wrong) and
    ``score`` float64 [R, N] (NaN where the gate gave none)."""
    classes = list(d.bundle.classes)
    correct = np.zeros((repeats, len(x)), bool)
    flag = np.zeros((repeats, len(x)), bool)
    score = np.full((repeats, len(x)), np.nan)
    for r in range(repeats):
        for i in range(0, len(x), batch):
            rs = d.run_array(np.ascontiguousarray(x[i:i + batch], dtype=np.float32),
                             seeds=[seed + 1_000_003 * r + j for j in range(i, min(i + batch, len(x)))])
            for j, res in enumerate(rs, start=i):
                correct[r, j] = res.status == "ok" and classes.index(res.label) == y[j]
                flag[r, j] = bool(res.flagged)
                score[r, j] = np.nan if res.score is None else res.score
    return {"correct": correct, "flag": flag, "score": score}


def summarise(correct: np.ndarray) -> dict[str, float]:
    """[R, N] correctness → mean ± std over runs, and the worst case over runs per scan."""
    acc = correct.mean(axis=1)
    return {"defended_acc": float(acc.mean()), "defended_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "defended_acc_worst_of_runs": float(correct.all(axis=0).mean())}


# one row of the report --------------------------------------------------------------------------

@dataclass
class Row:
    """One attack at one ε on one site (or pooled): per-scan arrays, summarised by :meth:`to_dict`."""

    rung: int
    attack: str
    eps: float | None
    eps_label: str
    undefended: np.ndarray | None = None  # [N] bool: the bare classifier right on the adversarial scan
    correct: np.ndarray | None = None  # [R, N] bool: the Defender right
    flag: np.ndarray | None = None  # [R, N]
    kept: np.ndarray | None = None  # [R, N] bool: right or flagged (None: correct | flag when both known)
    score: np.ndarray | None = None  # [N] gate scores of the adversarial scans (run 0)
    skipped: str | None = None
    attack_s: float = 0.0
    summary: bool = True  # a row of the rung's headline (the figure plots these)
    headline_worst_of_runs: bool = False  # rung 5: the headline is the worst over runs
    params: dict[str, Any] = field(default_factory=dict)

    def kept_or_none(self) -> np.ndarray | None:
        """[R, N]: the Defender right or the scan flagged (sent to a reader) — the reading of a flag as "review
        this scan" rather than "purify it"; None where the row has no flags (a per-scan worst over parts
        keeps the parts' own)."""
        if self.kept is not None:
            return self.kept
        if self.correct is None or self.flag is None:
            return None
        return self.correct | self.flag

    def right_by_scan(self) -> np.ndarray:
        """[N] the headline per scan: the share of runs the Defender was right (rung 5: 1 only if right in every
        run), so that its mean is the row's ``robust_acc``; what a paired comparison of two reports reads."""
        assert self.correct is not None
        return self.correct.all(axis=0).astype(float) if self.headline_worst_of_runs else self.correct.mean(axis=0)

    def to_dict(self, clean_score: np.ndarray | None, y: np.ndarray | None = None,
                classes: Sequence[str] = (), lesions: np.ndarray | None = None) -> dict[str, Any]:
        """The row's summary; with the scans' true labels ``y`` [N] (and the class names), also the headline
        accuracy within each true class (``robust_acc_by_class``; a class with no scan is left out); with the
        scans' lesion kinds ``lesions`` [N] (synthetic data), within each kind of tumour
        (``robust_acc_by_lesion``: the share of that kind's tumours called tumours)."""
        out: dict[str, Any] = {"rung": self.rung, "attack": self.attack, "eps": self.eps, "eps_label": self.eps_label,
                               "summary": self.summary, **self.params}
        if self.skipped is not None:
            return {**out, "skipped": self.skipped}
        assert self.correct is not None
        s = summarise(self.correct)
        out.update({"n": int(self.correct.shape[1]), "runs": int(self.correct.shape[0]),
                    "undefended_acc": None if self.undefended is None else float(self.undefended.mean()), **s,
                    "robust_acc": s["defended_acc_worst_of_runs"] if self.headline_worst_of_runs
                    else s["defended_acc"],
                    "flag_rate": None if self.flag is None else float(self.flag.mean()),
                    "attack_s": round(self.attack_s, 3)})
        kept = self.kept_or_none()
        if kept is not None:  # the headline rule of the row (mean over runs, or rung 5's worst of them)
            out["right_or_flagged"] = float(kept.all(axis=0).mean() if self.headline_worst_of_runs else kept.mean())
        if y is not None:
            if len(y) != self.correct.shape[1]:
                raise ValueError(f"{len(y)} labels for a row of {self.correct.shape[1]} scans")
            right = self.correct.all(axis=0) if self.headline_worst_of_runs else self.correct.mean(axis=0)
            out["robust_acc_by_class"] = {name: float(right[y == c].mean()) for c, name in enumerate(classes)
                                          if (y == c).any()}
        if lesions is not None:
            if len(lesions) != self.correct.shape[1]:
                raise ValueError(f"{len(lesions)} lesion kinds for a row of {self.correct.shape[1]} scans")
            right = self.correct.all(axis=0) if self.headline_worst_of_runs else self.correct.mean(axis=0)
            by_lesion = {k: float(right[lesions == k].mean()) for k in LESION_KINDS if (lesions == k).any()}
            if by_lesion:  # scans without tumours only: nothing to say
                out["robust_acc_by_lesion"] = by_lesion
        if self.score is not None and clean_score is not None and np.isfinite(self.score).all() \
                and np.isfinite(clean_score).all() and len(clean_score):
            out.update({"auroc": auroc(clean_score, self.score), "tpr@1%": tpr_at_fpr(clean_score, self.score, 0.01),
                        "tpr@5%": tpr_at_fpr(clean_score, self.score, 0.05)})
        return out


def _combine(rung: int, attack: str, parts: Sequence[Row], **kw: Any) -> Row:
    """A row correct per scan and run only where every part is (the per-scan worst of several attacks)."""
    live = [p for p in parts if p.skipped is None and p.correct is not None]
    if not live:
        return Row(rung, attack, parts[0].eps, parts[0].eps_label, skipped="no part ran", **kw)
    und = [p.undefended for p in live if p.undefended is not None]
    kept = [p.kept_or_none() for p in live]
    return Row(rung, attack, live[0].eps, live[0].eps_label,
               undefended=np.logical_and.reduce(und) if und else None,
               correct=np.logical_and.reduce([p.correct for p in live]),
               kept=None if any(k is None for k in kept) else np.logical_and.reduce(kept),
               attack_s=sum(p.attack_s for p in live), params={"of": [p.attack for p in live]}, **kw)


def pool(rows_per_site: Sequence[list[Row]]) -> list[Row]:
    """Rows pooled over sites: the per-scan arrays concatenated (the sites' rows come in the same order)."""
    out = []
    for rows in zip(*rows_per_site, strict=True):
        r0 = rows[0]
        if any(r.skipped is not None for r in rows):
            out.append(replace(r0, skipped=next(r.skipped for r in rows if r.skipped is not None)))
            continue

        def cat(name: str, axis: int, rows: tuple[Row, ...] = rows) -> np.ndarray | None:
            vals = [getattr(r, name) for r in rows]
            return None if any(v is None for v in vals) else np.concatenate(vals, axis=axis)

        out.append(replace(r0, undefended=cat("undefended", 0), correct=cat("correct", 1), flag=cat("flag", 1),
                           kept=cat("kept", 1), score=cat("score", 0), attack_s=sum(r.attack_s for r in rows)))
    return out


# the ladder on one site --------------------------------------------------------------------------

@dataclass
class Site:
    """What one site's evaluation produced (rows, clean scores, arrays for the figures and checks)."""

    site: int
    n: int
    clean: Row
    rows: list[Row]
    clean_score: np.ndarray
    examples: dict[str, np.ndarray]
    latency_ms: dict[str, float]
    surrogate: dict[str, Any]
    certified: dict[str, Any] | None = None
    y: np.ndarray | None = None  # [N] the scans' true labels (per-class accuracies)
    lesions: np.ndarray | None = None  # [N] lesion kinds of synthetic scans (per-kind sensitivity), else None


def _models(ref: Any) -> None:
    """The attacker's reference pipeline: eval mode, no weight gradients and, on the CPU, the channels-last layout
    (oneDNN's convolutions take the attacks' forward and backward passes faster so; values equal to float order;
    ``MEDFEDPURE_CHANNELS_LAST=0`` keeps the ordinary layout)."""
    for m in ref.models.values():
        m.eval().requires_grad_(False)
        if channels_last_enabled() and module_device(m).type == "cpu":  # kept for the run: nothing to restore
            m.to(memory_format=torch.channels_last)


def load_surrogate(cfg: EvalConfig, site: int, size: int, out: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rung 6's surrogate: ``cfg.surrogate`` (safetensors), or a classifier trained here on the site's train
    split with the project's trainer and a seed of its own (saved to ``out``); → (model, provenance).
    The trainer runs on the host CPU; :func:`evaluate_site` moves the model to the evaluation device."""
    from medfedpure.models.weights import load_model

    if cfg.surrogate is not None:
        model = load_model(cfg.surrogate)[0].eval().requires_grad_(False)
        return model, {"source": str(cfg.surrogate), "trained_here": False}
    from medfedpure.data.loader import load_split
    from medfedpure.models.moe import MoEClassifier, MoEConfig
    from medfedpure.models.weights import save_model
    from medfedpure.train.classifier import ClassifierTrainConfig, train_classifier

    seed = cfg.seed + 7919  # not the bundle's recipe seed: an independent model
    b = cfg.budget
    train = load_split(cfg.data, site, "train", size=size)
    val = load_split(cfg.data, site, "val", size=size)
    mcfg = MoEConfig.preset(b.surrogate_preset, image_size=size)
    tcfg = ClassifierTrainConfig.preset(b.surrogate_preset, seed=seed, epochs=b.surrogate_epochs)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        model = MoEClassifier(mcfg)
        hist = train_classifier(model, train, val, tcfg, progress=cfg.progress)
    train_s = time.perf_counter() - t0
    path = out / f"surrogate_site{site}.safetensors"
    save_model(path, model, mcfg, "moe")
    return model.eval().requires_grad_(False), {
        "source": str(path), "trained_here": True, "preset": b.surrogate_preset, "epochs": b.surrogate_epochs,
        "seed": seed, "train_scans": int(len(train[1])), "train_s": round(train_s, 2),
        "val_acc": float(hist["val"]["accuracy"])}


def evaluate_site(d: Any, ref: Any, cfg: EvalConfig, site: int, x: np.ndarray, y: np.ndarray,
                  out: Path) -> Site:
    """Every requested rung at every ε on one site's scans x [N, 1, S, S], y [N]."""
    b, rungs, norm = cfg.budget, set(cfg.rungs), cfg.norm
    clf = ref.models["classifier"]
    dev = ref.torch_device
    xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
    seed = cfg.seed

    def und(xa: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return host(clf(xa).argmax(1) == yt)

    def row(rung: int, attack: str, eps: float, label: str, xa: torch.Tensor, t0: float, **kw: Any) -> Row:
        j = judge(d, host(xa), y, b.repeats, seed + 10_000)
        return Row(rung, attack, eps, label, undefended=und(xa), correct=j["correct"], flag=j["flag"],
                   score=j["score"][0], attack_s=time.perf_counter() - t0, **kw)

    clean_j = judge(d, x, y, b.repeats, seed)
    clean = Row(0, "clean", None, "0", undefended=und(xt), correct=clean_j["correct"], flag=clean_j["flag"],
                score=clean_j["score"][0])
    rows: list[Row] = []
    examples: dict[str, np.ndarray] = {}
    stat = d.engine.gate_spec.stat
    evasion_why = None if norm == "linf" else "the detector-aware evasion is ℓ∞ only"
    transfer_evasion_why = evasion_why or (None if stat in ("hfratio", "nyqratio") else
                                           f"the transfer evasion reads an 'hfratio' gate's tissue map from the "
                                           f"image; this gate's statistic is {stat!r}")
    dlr_why = apgd_dlr_unsupported(len(d.bundle.classes)) if 4 in rungs else None
    surrogate, sur_info = (load_surrogate(cfg, site, x.shape[-1], out) if 6 in rungs else (None, {}))
    if surrogate is not None:
        surrogate = surrogate.to(dev)
        with torch.no_grad():
            sur_info["clean_acc_on_eval_scans"] = float((surrogate(xt).argmax(1) == yt).float().mean())

    def pgd(model: Any, eps: float, steps: int, n: str = norm) -> torch.Tensor:
        fn = pgd_linf if n == "linf" else pgd_l2
        return fn(model, xt, yt, eps, steps=steps, generator=attack_generator(seed, dev))

    if 1 in rungs:  # the paper's own point, once
        t0 = time.perf_counter()
        rows.append(row(1, f"paper: PGD-{PAPER['steps']} on the classifier, ε = {PAPER['eps']} ℓ∞",
                        PAPER["eps"], "paper", pgd(clf, PAPER["eps"], PAPER["steps"], "linf"), t0, summary=False,
                        params={"paper_point": True}))
    bar = progress_bar(list(zip(cfg.eps, cfg.eps_labels, strict=True)), desc=f"site {site}: ε", unit="ε",
                       enabled=cfg.progress)
    for eps, label in bar:
        here: dict[str, Row] = {}
        if 1 in rungs:
            t0 = time.perf_counter()
            here["1"] = row(1, f"classifier PGD-{PAPER['steps']} (rung 1)", eps, label,
                            pgd(clf, eps, PAPER["steps"]), t0)
        if 2 in rungs or 3 in rungs or 5 in rungs:
            for loss in ("ce", "margin"):
                t0 = time.perf_counter()
                xa, st = pipeline_pgd(d, ref, xt, yt, eps, steps=b.steps, eot=b.eot, seed=seed, loss=loss, norm=norm,
                                      progress=cfg.progress)
                here[f"2{loss}"] = row(2, f"pipeline PGD-{b.steps} EOT-{b.eot} {loss}", eps, label, xa, t0,
                                       summary=False, params=st)
                if loss == "ce" and eps == max(cfg.eps):
                    examples["adversarial"] = host(xa)
            here["2"] = _combine(2, "pipeline PGD+EOT, worst of ce and margin", [here["2ce"], here["2margin"]])
        if 3 in rungs:
            parts = []
            for factor in sorted({1, cfg.evasion_factor}):
                name = f"evasion under τ ×{factor}" + (" (band-limited)" if factor > 1 else " (pixel)")
                if evasion_why is not None or x.shape[-1] % factor:
                    parts.append(Row(3, name, eps, label, skipped=evasion_why or
                                     f"the evasion factor {factor} does not divide the image size {x.shape[-1]}",
                                     summary=False))
                    continue
                t0 = time.perf_counter()
                xa, st = evasion_pgd(d, ref, xt, yt, eps, steps=b.steps, eot=b.eot, seed=seed, factor=factor,
                                     progress=cfg.progress)
                parts.append(row(3, name, eps, label, xa, t0, summary=False, params=st))
            here.update({f"3a{i}": p for i, p in enumerate(parts)})
            here["3"] = _combine(3, "detector-aware, worst of (a) under τ and (b) flagged-and-survive (rung 2)",
                                 [*parts, here["2"]])
        if 4 in rungs:
            t0 = time.perf_counter()
            xa = apgd_pipeline(d, ref, xt, yt, eps, steps=b.steps, eot=b.eot_apgd, seed=seed, loss="ce", norm=norm)
            here["4"] = row(4, f"torchattacks APGD-CE-{b.steps} EOT-{b.eot_apgd}", eps, label, xa, t0)
            if dlr_why is not None:
                here["4dlr"] = Row(4, "torchattacks APGD-DLR", eps, label, skipped=dlr_why, summary=False)
            else:
                t0 = time.perf_counter()
                xa = apgd_pipeline(d, ref, xt, yt, eps, steps=b.steps, eot=b.eot_apgd, seed=seed, loss="dlr",
                                   norm=norm)
                here["4dlr"] = row(4, f"torchattacks APGD-DLR-{b.steps} EOT-{b.eot_apgd}", eps, label, xa, t0,
                                   summary=False)
        if 6 in rungs:
            t0 = time.perf_counter()
            here["6a"] = row(6, f"transfer PGD-{b.steps} from the surrogate", eps, label,
                             pgd(surrogate, eps, b.steps), t0, summary=False)
            if transfer_evasion_why is None and x.shape[-1] % cfg.evasion_factor == 0:
                t0 = time.perf_counter()
                xa = transfer_evasion(surrogate, xt, yt, eps, steps=b.steps, gate=d.engine.gate_spec,
                                      factor=cfg.evasion_factor)
                here["6b"] = row(6, "transfer evasion (surrogate, band-limited)", eps, label, xa, t0, summary=False)
            else:
                here["6b"] = Row(6, "transfer evasion (surrogate, band-limited)", eps, label, skipped=transfer_evasion_why
                                 or "the evasion factor does not divide the image size", summary=False)
            here["6"] = _combine(6, "transfer, worst of PGD and evasion", [here["6a"], here["6b"]])
        if 5 in rungs:
            white = [here[k] for k in ("2", "3", "4", "4dlr") if k in here]
            here["5"] = _combine(5, f"worst of {b.repeats} judged runs of the worst white-box rung per scan", white,
                                 headline_worst_of_runs=True)
        if 2 not in rungs:  # computed for rungs 3 and 5 only: not reported on their own
            for k in ("2ce", "2margin", "2"):
                here.pop(k, None)
        rows.extend(here.values())
    # latency: one scan per call, clean scans
    lat: dict[str, list[float]] = {}
    for i in range(min(len(x), 4)):
        r = d.run_array(x[i:i + 1], seeds=[seed + i])[0]
        for k, v in r.latency_ms.items():
            lat.setdefault(k, []).append(v)
    if "adversarial" in examples:
        k = min(cfg.examples, len(x))
        adv = examples["adversarial"][:k]
        pur = d.run_array(np.ascontiguousarray(adv), seeds=[seed + i for i in range(k)], return_purified=True)
        examples = {"clean": x[:k], "adversarial": adv,
                    "purified": np.stack([r.purified if r.purified is not None else np.full_like(adv[0], np.nan)
                                          for r in pur]),
                    "flagged": np.array([bool(r.flagged) for r in pur]), "eps": np.float64(max(cfg.eps))}
    return Site(site=site, n=len(y), clean=clean, rows=rows, clean_score=clean.score, examples=examples,
                latency_ms={k: float(np.median(v)) for k, v in lat.items()}, surrogate=sur_info)


def certify_batch(engine: Any, n: int) -> int:
    """Draws per engine call when certifying: the engine's default (:func:`~medfedpure.runtime.certify.
    default_batch`) on the CPU; on a CUDA engine all of a phase's draws, up to 512 per call (the
    certificates do not depend on it: the noise is keyed per draw)."""
    from medfedpure.runtime.certify import default_batch

    base = default_batch(engine)
    if getattr(engine, "device", "cpu") != "cuda" or base < 50:  # TensorRT's plans hold up to 8
        return base
    return max(base, min(int(n), 512))


REPORT_RADII = (0.25, 0.5, 1.0)  # ℓ2 radii every certification table reports, whatever σ


def certify_site(d: Any, x: np.ndarray, y: np.ndarray, sigmas: Sequence[float], n: int, seed: int,
                 progress: bool, lesions: Sequence[str] | None = None) -> dict[str, Any]:
    """Certified accuracy vs ℓ2 radius by denoised smoothing, per σ (the machinery of ``Defender.certify``,
    on the already-preprocessed scans: n draws, n0 = max(10, n // 10), α = 0.001), on the judged
    Defender's engine in batches of :func:`certify_batch`. Reported radii: fractions of σ, the
    :data:`REPORT_RADII` and the ℓ2 radius of the ℓ∞ 2/255 ball at this scan size; at each, the
    certified accuracy pooled, within each true class and its minimum over the classes; each scan's
    certificate (true label, certified label or None, radius, lower bound, seed) is kept under ``scans``.
    With the scans' lesion kinds (synthetic data), also within each kind of tumour
    (``certified_acc_by_lesion``, ``lesion_counts``)."""
    from medfedpure.runtime.certify import (
        DenoisedSmoothing,
        SmoothingConfig,
        certified_accuracy,
        certified_accuracy_by_class,
    )

    sm = DenoisedSmoothing(d.engine, d.bundle.classes)
    labels = [d.bundle.classes[int(v)] for v in y]
    # the ℓ2 radius of the ℓ∞ ball of 2/255 on these scans: certified at it ⇒ robust to every 2/255 attack
    linf_ball_radius = round(2.0 / 255.0 * float(np.sqrt(x[0].size)), 4)
    out: dict[str, Any] = {"n": n, "n0": max(10, n // 10), "alpha": 0.001, "per_sigma": {},
                           "linf_2_255_radius": linf_ball_radius}
    for sigma in progress_bar(list(sigmas), desc="certify σ", unit="σ", enabled=progress):
        cfg = SmoothingConfig(sigma=sigma, n0=max(10, n // 10), n=n, alpha=0.001, batch=certify_batch(d.engine, n))
        certs = [sm.certify(x[i], cfg, seed=seed + i) for i in range(len(x))]
        radii = sorted({0.0, *(round(sigma * k, 4) for k in (0.25, 0.5, 1.0, 1.5, 2.0)),
                        *REPORT_RADII, linf_ball_radius})
        acc = certified_accuracy(certs, labels, radii)
        by_class = certified_accuracy_by_class(certs, labels, radii)
        out["per_sigma"][f"{sigma:g}"] = {
            "radii": radii, "certified_acc": [acc[r] for r in radii],
            "certified_acc_by_class": {c: [a[r] for r in radii] for c, a in by_class.items()},
            "worst_class_certified_acc": [min(a[r] for a in by_class.values()) for r in radii],
            **_certified_by_lesion(certs, labels, radii, lesions),
            "abstain_rate": float(np.mean([c.abstained for c in certs])),
            "radius_median": float(np.median([c.radius for c in certs])),
            "seconds_per_scan": float(np.median([c.latency_ms["total"] for c in certs])) / 1000.0,
            "scans": [{"label": c.label, "true": y_, "radius": c.radius, "p_lower": c.p_lower, "seed": c.seed}
                      for c, y_ in zip(certs, labels, strict=True)]}
    return out


def _certified_by_lesion(certs: Sequence[Any], labels: Sequence[str], radii: Sequence[float],
                         lesions: Sequence[str] | None) -> dict[str, Any]:
    """``certified_acc_by_lesion`` (per tumour kind present, at each radius) and ``lesion_counts``; {} without
    lesion kinds or tumours."""
    from medfedpure.runtime.certify import certified_accuracy

    if lesions is None:
        return {}
    if len(lesions) != len(certs):
        raise ValueError(f"{len(lesions)} lesion kinds for {len(certs)} certificates")
    kinds = [k for k in LESION_KINDS if k in lesions]
    if not kinds:
        return {}
    by = {}
    for k in kinds:
        idx = [i for i, v in enumerate(lesions) if v == k]
        acc = certified_accuracy([certs[i] for i in idx], [labels[i] for i in idx], radii)
        by[k] = [acc[r] for r in radii]
    return {"certified_acc_by_lesion": by, "lesion_counts": {k: lesions.count(k) for k in kinds}}


# the whole run -----------------------------------------------------------------------------------

def open_defender(cfg: EvalConfig) -> tuple[Any, Any]:
    """(Defender, torch reference engine) for the configured bundle, backend, policy and device: the
    reference (what the attacks differentiate) in FP32 without CUDA graphs on the evaluation device, the
    Defender on :func:`~medfedpure.eval.device.defender_device` with its backend's defaults there."""
    from medfedpure import Defender
    from medfedpure.runtime.engines.torch_engine import TorchEngine

    dev = resolve_device(cfg.device)
    ddev = defender_device(cfg.backend, dev)
    torch.set_num_threads(cfg.threads)
    trust: dict[str, Any] = dict(expected_id=cfg.expected_id, trusted_keys=list(cfg.trusted_keys) or None,
                                 allow_unsigned=cfg.allow_unsigned)
    d = (Defender.load(cfg.bundle, backend=cfg.backend, device=ddev, threads=cfg.threads, policy=cfg.policy, **trust)
         if cfg.bundle else Defender.default(backend=cfg.backend, device=ddev, threads=cfg.threads,
                                             policy=cfg.policy, **trust))
    ref = TorchEngine(d.bundle, device=dev, precision="fp32", cuda_graphs=False, threads=cfg.threads)
    _models(ref)
    return d, ref


def run_eval(cfg: EvalConfig, out: str | Path, *, command: str = "") -> dict[str, Any]:
    """Run the evaluation, write ``out/report.json``, ``out/report.md`` and the figures; → the report."""
    from medfedpure.data.layout import num_sites, read_dataset_json
    from medfedpure.data.loader import lesion_kinds, load_split
    from medfedpure.eval.report import write_report
    from medfedpure.eval.sanity import run_sanity

    t_start = time.perf_counter()
    device = resolve_device(cfg.device)  # before any work: a missing GPU costs nothing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sites = tuple(range(num_sites(cfg.data))) if cfg.sites is None else cfg.sites
    d, ref = open_defender(cfg)
    results: list[Site] = []
    for site in sites:
        x, y = load_split(cfg.data, site, cfg.split, size=d.image_size)
        if cfg.scan_limit:
            x, y = x[:cfg.scan_limit], y[:cfg.scan_limit]
        if len(y) == 0:
            raise EvalError(f"site {site} has no {cfg.split!r} scans in {cfg.data}: pick another --split or --site")
        res = evaluate_site(d, ref, cfg, site, x, y, out)
        res.y = np.asarray(y)
        kinds = lesion_kinds(cfg.data, site, cfg.split)
        if kinds is not None:
            res.lesions = np.asarray(kinds[:len(y)])
        if cfg.certify_sigmas:
            res.certified = certify_site(d, x, y, cfg.certify_sigmas, cfg.certify_n, cfg.seed, cfg.progress,
                                         None if res.lesions is None else list(res.lesions))
        results.append(res)
    pooled_rows = pool([r.rows for r in results])
    pooled_clean = pool([[r.clean] for r in results])[0]
    x0, y0 = load_split(cfg.data, sites[0], cfg.split, size=d.image_size)
    sanity = run_sanity(d, ref, cfg, x0, y0, pooled_rows)
    try:
        meta = read_dataset_json(cfg.data)
        kind, data_fp = meta.get("kind", "unknown"), meta.get("fingerprint")
    except (OSError, ValueError):
        kind, data_fp = "unknown", None
    report = {
        "schema": 1,
        "command": command,
        "bundle": {"id": d.bundle.bundle_id, "short_id": d.bundle.short_id, "path": str(cfg.bundle or "default")},
        "backend": cfg.backend, "policy": d.policy, "gate": d.bundle.spec.gate.to_dict(),
        "purifier_steps": int(ref.steps),
        "data": {"root": str(Path(cfg.data).resolve()), "kind": kind, "split": cfg.split,
                 "num_sites": num_sites(cfg.data), "fingerprint": data_fp},
        "sites": list(sites), "norm": cfg.norm, "eps": list(cfg.eps), "eps_labels": list(cfg.eps_labels),
        "eps_units": "/255 of the [0, 1] model input" if cfg.norm == "linf" else "ℓ2 norm in [0, 1] model-input units",
        "rungs": list(cfg.rungs), "seed": cfg.seed,
        "budget": {**cfg.budget.to_dict(), "limit": cfg.scan_limit},
        "paper": PAPER,
        "sanity": sanity,
        "per_site": {str(r.site): _site_dict(r.clean, r.rows, r.clean_score, r.y, d.bundle.classes, r.lesions)
                     for r in results},
        "pooled": _site_dict(pooled_clean, pooled_rows, pooled_clean.score,
                             np.concatenate([r.y for r in results]), d.bundle.classes,
                             None if any(r.lesions is None for r in results)
                             else np.concatenate([r.lesions for r in results])),
        "latency_ms": results[0].latency_ms,
        "surrogate": {str(r.site): r.surrogate for r in results if r.surrogate},
        "certified": {str(r.site): r.certified for r in results if r.certified},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": cfg.threads, **device_info(device, d)},
    }
    report["wall_s"] = round(time.perf_counter() - t_start, 2)
    report["figures"] = write_report(report, results, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False, default=_json_default))
    return report


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def _per_scan(right: np.ndarray) -> list[float]:
    """A per-scan headline array for the report (shares of runs, rounded: R ≤ 10 runs need no more digits)."""
    return [round(float(v), 4) for v in right]


def _site_dict(clean: Row, rows: list[Row], clean_score: np.ndarray, y: np.ndarray | None,
               classes: Sequence[str], lesions: np.ndarray | None = None) -> dict[str, Any]:
    """The report's block of one site (or the pooled one): clean numbers, every row, the worst rung per ε —
    and, with the true labels ``y``, each within each true class (the worst rung of a class may be another
    rung than the pooled one); with the lesion kinds, each within each kind of tumour as well."""
    c = clean.to_dict(None, y, classes, lesions)
    block: dict[str, Any] = {
        "n": c["n"],
        "clean": {"undefended_acc": c["undefended_acc"], "defended_acc": c["defended_acc"],
                  "defended_acc_std": c["defended_acc_std"], "flag_rate": c["flag_rate"],
                  "right_by_scan": _per_scan(clean.right_by_scan())},
        "rows": [r.to_dict(clean_score, y, classes, lesions) for r in rows],
    }
    if "robust_acc_by_class" in c:
        block["clean"]["defended_acc_by_class"] = c["robust_acc_by_class"]
    if "robust_acc_by_lesion" in c:
        block["clean"]["defended_acc_by_lesion"] = c["robust_acc_by_lesion"]
        block["lesion_counts"] = {k: int((lesions == k).sum()) for k in c["robust_acc_by_lesion"]}
    worst: dict[str, Any] = {}
    worst_review: dict[str, Any] = {}
    worst_by_class: dict[str, dict[str, float]] = {}
    worst_by_lesion: dict[str, dict[str, float]] = {}
    for row, r in zip(rows, block["rows"], strict=True):
        if r.get("skipped") is not None or r["eps_label"] == "paper":
            continue
        w = worst.get(r["eps_label"])
        if w is None or r["robust_acc"] < w["robust_acc"]:
            worst[r["eps_label"]] = {"rung": r["rung"], "attack": r["attack"], "robust_acc": r["robust_acc"],
                                     "right_by_scan": _per_scan(row.right_by_scan())}
        w = worst_review.get(r["eps_label"], {"right_or_flagged": 2.0})
        if "right_or_flagged" in r and r["right_or_flagged"] < w["right_or_flagged"]:
            worst_review[r["eps_label"]] = {"rung": r["rung"], "attack": r["attack"],
                                            "right_or_flagged": r["right_or_flagged"]}
        per = worst_by_class.setdefault(r["eps_label"], {})
        for cls, a in r.get("robust_acc_by_class", {}).items():
            per[cls] = min(per.get(cls, 1.0), a)
        per = worst_by_lesion.setdefault(r["eps_label"], {})
        for kind, a in r.get("robust_acc_by_lesion", {}).items():
            per[kind] = min(per.get(kind, 1.0), a)
    block["worst_rung"] = worst
    if worst_review:
        block["worst_rung_right_or_flagged"] = worst_review
    if any(worst_by_class.values()):
        block["worst_rung_by_class"] = worst_by_class
    if any(worst_by_lesion.values()):
        block["worst_rung_by_lesion"] = worst_by_lesion
    return block
