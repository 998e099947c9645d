"""Train the purifier's teacher and distil the student on one site (research driver).

    .venv/bin/python benchmarks/research/purifier_train.py --data data/synth128 --site 0 \
        --out runs/dev --stage teacher|student|both [--threads 1] [--tag NAME]

Writes RUN/teacher.safetensors / RUN/student.safetensors (``save_model``, kind "unet"; the
student's metadata has ``steps`` and the distillation config) and RUN/purifier_{stage}{tag}.json
with the history and wall time. Same library calls as ``medfedpure train purifier|distill``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from medfedpure.data import load_split
from medfedpure.models.unet import UNet, UNetConfig
from medfedpure.train.checkpoint import load_model, save_model
from medfedpure.train.distill import DistillConfig, distill_student
from medfedpure.train.purifier import DenoiserTrainConfig, train_denoiser


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/synth128")
    ap.add_argument("--site", type=int, default=0)
    ap.add_argument("--out", default="runs/dev")
    ap.add_argument("--stage", choices=["teacher", "student", "both"], default="both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--teacher-epochs", type=int, default=None)
    ap.add_argument("--distill-epochs", type=int, default=None)
    ap.add_argument("--num-trajectories", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, _ = load_split(args.data, args.site, "train", 128)
    x_va, _ = load_split(args.data, args.site, "val", 128)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU"

    if args.stage in ("teacher", "both"):
        ucfg = UNetConfig.preset("small")
        teacher = UNet(ucfg)
        tcfg = DenoiserTrainConfig.preset("small", epochs=args.teacher_epochs)
        t0 = time.perf_counter()
        res = train_denoiser(teacher, teacher.schedule, x_tr, x_va, tcfg,
                             checkpoint_dir=out / "ckpt", name="teacher")
        wall = time.perf_counter() - t0
        save_model(out / f"teacher{args.tag}.safetensors", teacher, ucfg, "unet",
                   extra={"role": "teacher", "train": tcfg.to_dict(), "best_epoch": res["best_epoch"]})
        (out / f"purifier_teacher{args.tag}.json").write_text(json.dumps(
            {"wall_s": wall, "machine": machine, "params": teacher.num_parameters(), "config": tcfg.to_dict(),
             **{k: res[k] for k in ("history", "best_epoch", "val", "stopped_early")}}, indent=1))
        print(f"teacher: {wall:.0f} s, val {res['val']}")

    if args.stage in ("student", "both"):
        teacher, ucfg, _ = load_model(out / f"teacher{args.tag}.safetensors")
        student = UNet(ucfg)
        dcfg = DistillConfig.preset("small", epochs=args.distill_epochs, num_trajectories=args.num_trajectories)
        t0 = time.perf_counter()
        res = distill_student(teacher, student, teacher.schedule, x_tr, x_va, dcfg,
                              checkpoint_dir=out / "ckpt", name="student")
        wall = time.perf_counter() - t0
        save_model(out / f"student{args.tag}.safetensors", student, ucfg, "unet",
                   extra={"role": "student", "steps": dcfg.val_steps, "distill": dcfg.to_dict(),
                          "best_epoch": res["best_epoch"]})
        (out / f"purifier_student{args.tag}.json").write_text(json.dumps(
            {"wall_s": wall, "cache_s": res["cache_s"], "machine": machine, "config": dcfg.to_dict(),
             **{k: res[k] for k in ("history", "best_epoch", "val", "init_val", "stopped_early")}}, indent=1))
        print(f"student: {wall:.0f} s (teacher cache {res['cache_s']:.0f} s), init {res['init_val']}, "
              f"val {res['val']}")


if __name__ == "__main__":
    main()
