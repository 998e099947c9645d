"""Which tumours does adversarial training give up? One site, one recipe per call (research; results in
benchmarks/RESULTS.md, "Robustness").

Fine-tunes a clean classifier of one site with PGD adversarial batches (or trains a wider one from scratch,
clean, first), then attacks the result alone with PGD-20 at 2, 4 and 8/255 (ℓ∞, one random start, step
2.5·ε/20) on every validation and test scan of the site, and counts the scans kept right by lesion kind of
the synthetic generator (no tumour / conspicuous / small / faint; ``medfedpure.data.lesion_kinds``).

    medfedpure train classifier --data D --site 2 --out runs/ss/base --adv none --epochs 30 --threads 2
    python benchmarks/adv_lesion_study.py --data D --site 2 --name pgd8 \
        --base runs/ss/base/site_2/classifier.safetensors --epochs 10 --eps 8 --out runs/ss
    python benchmarks/adv_lesion_study.py ... --name wide2 --width 2 --epochs 10 --eps 8   # no --base
    python benchmarks/adv_lesion_study.py ... --name stem1 --stem 1 --epochs 10 --eps 8    # no --base
    python benchmarks/adv_lesion_study.py ... --name tw3 --tumour-weight 3 ...
    python benchmarks/adv_lesion_study.py ... --name thru --purifier sdk/medfedpure/bundles/default --base ...

Data scaling on one site (a data set with more scans per site, the same profiles: ``medfedpure data synth --out
D4 --sites 4 --per-site 4800 --seed 0 --split-seed 0``), the smaller runs on a fixed class-stratified subset of
its train split and every run attacked on the same test split:

    python benchmarks/adv_lesion_study.py --data D4 --site 1 --name n840 --train-limit 840 \
        --save-base runs/scale/base840.safetensors --epochs 10 --eps 8 --eval-splits test --out runs/scale
    python benchmarks/adv_lesion_study.py --data D4 --site 1 --name n3360 --epochs 10 --eps 8 --eval-splits test ...

``--purifier BUNDLE`` (the bundle's diffusion student, at ``--purifier-t``, default the bundle's t_min) puts
the classifier behind purification of every scan (the ``floor`` policy's path): the fine-tuning crafts its
PGD batches through the purifier (``adv_through_purifier``, EOT 2) and trains on the purified scans, and a
second evaluation attacks the purified classifier (PGD-20 with the full gradient through the student,
EOT 2, one fresh noise draw per judged forward), beside the bare one. ``--epochs 0`` with ``--base`` only
evaluates.

``--checkpoint-dir DIR`` saves the fine-tuning after every epoch (``DIR/NAME.state.json`` holds the history so
far, a progress log for runs of an hour or more); the same command again resumes where it stopped and ends with
the same weights as an uninterrupted run (the trainer's per-epoch random streams; ``train.loop.fit``).

``--tumour-weight`` weights the tumour class's cross-entropy in training (by patching the trainer's
``nll_loss`` in this process only; the attacks keep the plain loss).
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import numpy as np
import torch
from medfedpure.data import lesion_kinds, load_split
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.models.weights import load_model, save_model
from medfedpure.train.attacks import pgd
from medfedpure.train.classifier import ClassifierTrainConfig, train_classifier

KINDS = ("none", "conspicuous", "small", "faint")
EPS = (0, 2, 4, 8)


def _weight_tumours(weight: float) -> None:
    import medfedpure.train.classifier as trainer
    import torch.nn.functional as F

    w = torch.tensor([1.0, weight])
    plain = F.nll_loss
    patched = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    patched.nll_loss = lambda lp, y, **kw: plain(lp, y, weight=w)
    trainer.F = patched  # type: ignore[attr-defined]


def by_kind(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, kinds: np.ndarray, seed: int = 0,
            judge: torch.nn.Module | None = None, device: str = "cpu") -> dict:
    """Per ε: accuracy over all scans and ``right/total`` per lesion kind under PGD-20 against ``model``,
    judged by ``judge`` (default ``model``; the purified classifier judges with one fresh noise draw). The
    attack's draws come from a CPU generator on every ``device`` (where ``model`` and ``judge`` are)."""
    xt, yt = torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)
    g = torch.Generator().manual_seed(seed)
    judge = model if judge is None else judge
    out = {}
    for e in EPS:
        xa = xt if e == 0 else torch.cat([pgd(model, xt[i:i + 60], yt[i:i + 60], e / 255, steps=20, generator=g)
                                          for i in range(0, len(xt), 60)])
        with torch.no_grad():
            ok = judge(xa).argmax(1).cpu().numpy() == y
        out[str(e)] = {"all": round(float(ok.mean()) * 100, 1),
                       **{k: f"{int(ok[kinds == k].sum())}/{int((kinds == k).sum())}" for k in KINDS}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--site", type=int, default=2)
    ap.add_argument("--name", required=True)
    ap.add_argument("--base", type=Path, help="the clean classifier to fine-tune (else: train one, --width)")
    ap.add_argument("--seed", type=int, default=0, help="without --base: seeds the new classifier's weights")
    ap.add_argument("--width", type=int, default=1, help="without --base: channel multiplier of the new one")
    ap.add_argument("--stem", type=int, default=0, help="without --base: full-resolution layers before the stages")
    ap.add_argument("--epochs", type=int, default=10, help="adversarial fine-tuning epochs (0: evaluate only)")
    ap.add_argument("--adv", default="pgd", choices=("pgd", "nfgsm", "fgsm-rs"),
                    help="the fine-tuning's attack: PGD-5 (default), or the single-step N-FGSM / FGSM-RS")
    ap.add_argument("--eps", type=float, default=8.0, help="training radius, /255")
    ap.add_argument("--adv-steps", type=int, default=5, help="PGD iterations of --adv pgd (step 2.5·ε/steps)")
    ap.add_argument("--adv-frac", type=float, default=0.5)
    ap.add_argument("--robust-val", type=int, default=64,
                    help="validation scans attacked each epoch (PGD-10) to select the kept epoch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tumour-weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--purifier", type=Path, help="a bundle: train and attack through its student (see above)")
    ap.add_argument("--purifier-t", type=float, help="t* of --purifier (default: the bundle's gate t_min)")
    ap.add_argument("--plain-training", action="store_true",
                    help="with --purifier: fine-tune on the bare classifier's PGD batches, attack both ways")
    ap.add_argument("--train-limit", type=int,
                    help="train on a fixed random N scans of the train split, stratified by class (data scaling)")
    ap.add_argument("--save-base", type=Path, help="without --base: also save the clean classifier here")
    ap.add_argument("--eval-splits", default="val,test", help="splits to attack after training")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                    help="where the training and the attacks run (the draws are the CPU run's)")
    ap.add_argument("--checkpoint-dir", type=Path,
                    help="write the fine-tuning's state here after every epoch (CHECKPOINT_DIR/NAME.state.json "
                         "holds the per-epoch history so far); the same command again resumes from it")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    eval_splits = a.eval_splits.split(",")
    if not eval_splits or set(eval_splits) - {"val", "test"}:
        raise SystemExit(f"--eval-splits {a.eval_splits!r}: a comma-separated list of val and test")
    from medfedpure.train.device import resolve_device

    device = resolve_device(a.device)  # a missing GPU is an error before any work
    torch.set_num_threads(a.threads)
    if a.tumour_weight != 1.0:
        _weight_tumours(a.tumour_weight)
    tr, va, te = (load_split(a.data, a.site, s, 128) for s in ("train", "val", "test"))
    if a.train_limit is not None:
        if not 0 < a.train_limit <= len(tr[1]):
            raise SystemExit(f"--train-limit {a.train_limit}: the train split has {len(tr[1])} scans")
        rng = np.random.default_rng(0)  # a fixed subset, each class in its share of the split
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(tr[1] == c))[
            :round(a.train_limit * float(np.mean(tr[1] == c)))] for c in (0, 1)]))
        tr = (tr[0][keep], tr[1][keep])
    den, t_star = None, None
    if a.purifier is not None:
        from medfedpure.train.denoiser import load_denoiser

        den, schedule = load_denoiser(a.purifier)
        from medfedpure.train.denoiser import purification_point

        t_star, k_steps = purification_point(schedule, a.purifier_t)
    through = den is not None and not a.plain_training
    t0 = time.perf_counter()
    if a.base is not None:
        model, mcfg, _ = load_model(a.base)
    else:
        mcfg = MoEConfig.preset("small", width=a.width, stem=a.stem)
        torch.manual_seed(a.seed)  # the initial weights (before 2026-12-07 unseeded: each base its own draw)
        model = MoEClassifier(mcfg)
        train_classifier(model, tr, va, ClassifierTrainConfig.preset("small", epochs=30, adv="none"), progress=False,
                         device=device)
        if a.save_base is not None:
            save_model(a.save_base, model, mcfg, "moe")
    clean_s = time.perf_counter() - t0
    if a.epochs > 0:
        if through and a.adv != "pgd":
            raise SystemExit(f"--adv {a.adv} with --purifier: only pgd is crafted through the purifier "
                             "(add --plain-training)")
        cfg = ClassifierTrainConfig.preset("small", epochs=a.epochs, lr=a.lr, warmup_epochs=0, adv_start_epoch=0,
                                           patience=a.epochs, adv=a.adv, adv_eps=a.eps / 255, adv_steps=a.adv_steps,
                                           adv_frac=a.adv_frac, robust_val=a.robust_val, select="robust",
                                           adv_through_purifier=through, purifier_t=t_star or 60.0,
                                           purifier_steps=k_steps if through else 1)
        resume = a.checkpoint_dir is not None and (a.checkpoint_dir / f"{a.name}.state.json").is_file()
        if resume:
            print(f"resuming from {a.checkpoint_dir / a.name}.*", flush=True)
        fit = train_classifier(model, tr, va, cfg, progress=False, denoiser=den if through else None, device=device,
                               checkpoint_dir=a.checkpoint_dir, resume=resume, name=a.name)
        history = [{"epoch": h["epoch"], "loss": round(h["train_loss"], 4), "val": round(h["val_accuracy"], 4),
                    "robust_val": round(h["val_robust_accuracy"], 4), "s": round(h["epoch_s"], 1)}
                   for h in fit["history"]]
        best_epoch, train_s = fit["best_epoch"], fit["wall_s"]  # wall_s: every run of it, when resumed
    else:
        history, best_epoch, train_s, resume = [], None, 0.0, False
    model.eval()
    res = {"name": a.name, "adv": a.adv if a.epochs > 0 else None, "width": mcfg.global_widths, "stem": mcfg.stem,
           "seed": None if a.base else a.seed, "params": sum(p.numel() for p in model.parameters()),
           "train_scans": len(tr[1]), "epochs": a.epochs, "eps_255": a.eps, "adv_steps": a.adv_steps, "adv_frac": a.adv_frac, "lr": a.lr,
           "robust_val": a.robust_val,
           "tumour_weight": a.tumour_weight, "purifier": None if den is None else str(a.purifier),
           "purifier_t": t_star, "trained_through_purifier": through,
           "device": device, "clean_train_s": round(clean_s, 1),
           "train_s": round(train_s, 1), "resumed": resume, "best_epoch": best_epoch,
           "history": history}
    t_eval = time.perf_counter()
    for split, (x, y) in (("val", va), ("test", te)):
        if split not in eval_splits:
            continue
        kinds = np.asarray(lesion_kinds(a.data, a.site, split))
        res[split] = by_kind(model.to(device), x, y, kinds, device=device)
        model.cpu()
        if den is not None:
            from medfedpure.train.classifier import PurifiedClassifier

            g = torch.Generator().manual_seed(1)
            attacked = PurifiedClassifier(model, den, t_star, k_steps, 2, g).eval()
            judge = PurifiedClassifier(model, den, t_star, k_steps, 1, g).eval()
            res[f"{split}_purified"] = by_kind(attacked, x, y, kinds, judge=judge)
    res["eval_s"] = round(time.perf_counter() - t_eval, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    save_model(a.out / f"{a.name}.safetensors", model, mcfg, "moe")
    (a.out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
