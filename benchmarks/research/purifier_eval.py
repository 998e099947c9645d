"""Measure the purifier: student vs teacher PSNR, and classifier accuracy on purified clean / PGD scans.

    .venv/bin/python benchmarks/research/purifier_eval.py --run runs/dev --site 0 \
        [--student student.safetensors] [--classifier site_0/classifier.safetensors] \
        [--tstars 0,30,60,100,150] [--steps 2] [--psnr-scans 16] [--out runs/dev/purifier_eval.json]

1. PSNR (dB, [0, 1] scans) of the student with K = 1, 2, 4 DDIM steps, and of the teacher with
   K steps, against the teacher with ``--teacher-steps`` (20) from the same noised test scan.
2. Classifier accuracy on the site's test split: clean; purified (student, K steps) at each t*;
   PGD-10 ℓ∞ ε = 8/255 against the classifier alone (``medfedpure.attacks.pgd.pgd_linf``), then
   purified at each t*. Purification noise from ``torch.Generator().manual_seed(seed)``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from medfedpure.attacks.pgd import pgd_linf
from medfedpure.data import load_split
from medfedpure.models.diffusion import ddim_sample, purify, to_image_space, to_model_space
from medfedpure.train.checkpoint import load_model
from medfedpure.train.purifier import psnr


def batched(fn, *xs, bs: int = 16):
    return torch.cat([fn(*(x[i:i + bs] for x in xs)) for i in range(0, len(xs[0]), bs)])


@torch.no_grad()
def accuracy(clf, x, y) -> float:
    return float((batched(clf, x).argmax(1) == y).float().mean())


@torch.no_grad()
def draw(teacher, student, x, y, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = torch.nonzero(y == 1).flatten()[:2].tolist() + torch.nonzero(y == 0).flatten()[:1].tolist()
    tstars = [60, 150]
    cols = ["clean", "noised", f"teacher {args.teacher_steps} steps", f"student {args.steps} steps",
            "|student − clean| ×4"]
    fig, axes = plt.subplots(len(idx) * len(tstars), len(cols), figsize=(2.2 * len(cols), 2.2 * len(idx) * len(tstars)))
    g = torch.Generator().manual_seed(args.seed + 2)
    r = 0
    for i in idx:
        for ts in tstars:
            x0 = to_model_space(x[i:i + 1])
            t = torch.full((1,), float(ts))
            x_t = teacher.schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g))
            ref = ddim_sample(teacher, x_t, t, args.teacher_steps)
            stu = ddim_sample(student, x_t, t, args.steps)
            noisy = x_t / teacher.schedule.alpha_bar(t).sqrt()
            ims = [x[i, 0], to_image_space(noisy)[0, 0], to_image_space(ref)[0, 0], to_image_space(stu)[0, 0],
                   ((to_image_space(stu)[0, 0] - x[i, 0]).abs() * 4).clamp(0, 1)]
            for c, im in enumerate(ims):
                ax = axes[r, c]
                ax.imshow(im.numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(cols[c], fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"{'tumor' if int(y[i]) else 'no_tumor'}, t*={ts}", fontsize=8)
            r += 1
    fig.tight_layout()
    fig.savefig(args.figure, dpi=90)
    print(f"wrote {args.figure}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/dev")
    ap.add_argument("--data", default="data/synth128")
    ap.add_argument("--site", type=int, default=0)
    ap.add_argument("--teacher", default="teacher.safetensors")
    ap.add_argument("--student", default="student.safetensors")
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--tstars", default="0,30,60,100,150")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--teacher-steps", type=int, default=20)
    ap.add_argument("--psnr-scans", type=int, default=16)
    ap.add_argument("--psnr-tstars", default="60,120")
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-psnr", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--figure", default=None, help="PNG: clean / noised / teacher-20 / student-K per t*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    teacher, _, _ = load_model(run / args.teacher)
    student, _, smeta = load_model(run / args.student)
    x, y = load_split(args.data, args.site, "test", 128)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    res: dict = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)",
                 "student": args.student, "teacher": args.teacher, "n_test": len(x), "steps": args.steps}

    if not args.skip_psnr:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed + 1)
        xs = to_model_space(x[: args.psnr_scans])
        rows = {}
        for ts in [float(v) for v in args.psnr_tstars.split(",")]:
            t = torch.full((len(xs),), ts)
            x_t = teacher.schedule.q_sample(xs, t, torch.randn(xs.shape, generator=g))
            with torch.no_grad():
                ref = batched(lambda a, b: ddim_sample(teacher, a, b, args.teacher_steps), x_t, t)
                row = {"noisy_input_vs_clean": float(psnr(to_image_space(x_t / teacher.schedule.alpha_bar(t).sqrt()[:, None, None, None]), x[: len(xs)]).mean()),
                       "teacher_vs_clean": float(psnr(to_image_space(ref), x[: len(xs)]).mean())}
                for k in (1, 2, 4):
                    s = batched(lambda a, b, k=k: ddim_sample(student, a, b, k), x_t, t)
                    tk = batched(lambda a, b, k=k: ddim_sample(teacher, a, b, k), x_t, t)
                    row[f"student_k{k}"] = float(psnr(to_image_space(s), to_image_space(ref)).mean())
                    row[f"teacher_k{k}"] = float(psnr(to_image_space(tk), to_image_space(ref)).mean())
                    row[f"student_k{k}_vs_clean"] = float(psnr(to_image_space(s), x[: len(xs)]).mean())
            rows[str(int(ts))] = row
            print(f"t*={ts:g}: " + " ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
        res["psnr_vs_teacher"] = rows
        res["psnr_s"] = time.perf_counter() - t0

    if args.figure:
        draw(teacher, student, x, y, args)

    clf_path = Path(args.classifier) if args.classifier else run / f"site_{args.site}" / "classifier.safetensors"
    if clf_path.is_file():
        clf, _, _ = load_model(clf_path)
        clf.eval()
        res["classifier"] = str(clf_path)
        res["clean_acc"] = accuracy(clf, x, y)
        t0 = time.perf_counter()
        x_adv = batched(lambda a, b: pgd_linf(clf, a, b, args.eps, steps=10,
                                              generator=torch.Generator().manual_seed(args.seed)), x, y)
        res["pgd_s"] = time.perf_counter() - t0
        res["adv_acc"] = accuracy(clf, x_adv, y)
        print(f"classifier: clean {res['clean_acc']:.4f}, PGD-10 eps={args.eps:.4f}: {res['adv_acc']:.4f}", flush=True)
        res["purified"] = {}
        for ts in [int(v) for v in args.tstars.split(",")]:
            t0 = time.perf_counter()
            tt = torch.full((len(x),), ts)
            with torch.no_grad():
                pc = purify(student, x, tt, args.steps, generator=torch.Generator().manual_seed(args.seed))
                pa = purify(student, x_adv, tt, args.steps, generator=torch.Generator().manual_seed(args.seed))
            r = {"clean_acc": accuracy(clf, pc, y), "adv_acc": accuracy(clf, pa, y),
                 "psnr_clean": float(psnr(pc, x).mean()), "s": time.perf_counter() - t0}
            res["purified"][str(ts)] = r
            print(f"t*={ts}: purified clean acc {r['clean_acc']:.4f}, purified PGD acc {r['adv_acc']:.4f}, "
                  f"PSNR(purified, clean) {r['psnr_clean']:.2f} dB ({r['s']:.0f} s)", flush=True)
    else:
        print(f"no classifier at {clf_path}: accuracy part skipped")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
