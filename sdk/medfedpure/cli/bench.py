"""``medfedpure bench``: latency and throughput of a bundle on this machine (argument handling only).

The work is in :mod:`medfedpure.bench`; this parses the comma lists, prints the rich tables and
maps refusals to exit codes: 0 measured, 2 a usage error (unknown backend, bad list) or a bundle
that fails verification or that no backend can run.
"""

from __future__ import annotations

from pathlib import Path

import typer

from medfedpure.cli.common import console
from medfedpure.cli.runtime import EXPECTED_ID_HELP, TRUSTED_KEY_HELP

BACKENDS_HELP = ("Comma list of BACKEND with optional :PRECISION, @DEVICE and /seq or /eager suffixes, "
                 "e.g. onnxruntime, torch, "
                 "onnxruntime/seq, torch:fp16@cuda, torch:fp32@cuda/eager, onnxruntime@cuda, tensorrt@cuda. "
                 "Default: onnxruntime,torch on the CPU plus the GPU backends (skipped without CUDA).")


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected a comma list of integers, e.g. 1,8", param_hint=what) from None
    if not vals:
        raise typer.BadParameter(f"{text!r}: expected at least one integer", param_hint=what)
    return vals


def bench_command(
    out: Path = typer.Option(..., "--out", "-o", file_okay=False, help="Folder for bench.json and bench.png."),
    bundle: Path | None = typer.Option(None, "--bundle", "-b", help="Bundle folder (default: the embedded one)."),
    quick: bool = typer.Option(False, "--quick", help="A short run: batches 1 and 8, 5 timed calls each "
                               "(under a minute on two cores)."),
    backends: str | None = typer.Option(None, "--backends", help=BACKENDS_HELP),
    batches: str | None = typer.Option(None, "--batches", help="Comma list of batch sizes (default 1,4,8; "
                                       "--quick: 1,8)."),
    sizes: str | None = typer.Option(None, "--sizes", help="Comma list of image sizes, e.g. 128,224: the bundle's "
                                     "own size runs the bundle, any other its architectures with fresh weights "
                                     "(torch; labelled 'architecture timing, not the bundle's weights')."),
    iters: int | None = typer.Option(None, "--iters", min=1, help="Timed calls per backend, path and batch "
                                     "(default 30; --quick: 5)."),
    warmup: int | None = typer.Option(None, "--warmup", min=0, help="Untimed calls first (default 3; --quick: 1)."),
    threads: int = typer.Option(2, "--threads", min=0, help="Inference threads per backend (0: the runtime's "
                                "default)."),
    no_teacher: bool = typer.Option(False, "--no-teacher", help="Skip the teacher-sampler reference row."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Accept a bundle that no trusted key "
                                        "signed."),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", dir_okay=False, help=TRUSTED_KEY_HELP),
    expected_id: str | None = typer.Option(None, "--expected-id", help=EXPECTED_ID_HELP),
) -> None:
    """Measure the bundle: per-stage and end-to-end p50/p90/p99 of the early-exit and purified paths per
    backend × batch, the ratio to torch eager FP32 in the same run, throughput at batch 8, the
    many-step teacher-sampler reference, the environment → OUT/bench.json, OUT/bench.png and tables."""
    from medfedpure.bench.report import tables
    from medfedpure.bench.run import BenchConfig, run_bench
    from medfedpure.runtime.bundle import BundleError

    kw: dict[str, object] = {"bundle": str(bundle) if bundle is not None else None, "threads": threads,
                             "teacher": not no_teacher, "allow_unsigned": allow_unsigned,
                             "trusted_keys": tuple(str(k) for k in trusted_key or ()), "expected_id": expected_id}
    if backends is not None:
        kw["backends"] = tuple(s.strip() for s in backends.split(",") if s.strip())
    if batches is not None:
        kw["batches"] = _ints(batches, "--batches")
    if sizes is not None:
        kw["sizes"] = _ints(sizes, "--sizes")
    if iters is not None:
        kw["iters"] = iters
    if warmup is not None:
        kw["warmup"] = warmup
    try:
        cfg = BenchConfig.quick(**kw) if quick else BenchConfig(**kw)  # type: ignore[arg-type]
        cfg.specs()
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    try:
        report = run_bench(cfg, out)
    except (BundleError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    c = console()
    for t in tables(report):
        c.print(t)
    env = report["environment"]
    gpu = env.get("gpu") or {}
    typer.echo(f"bundle {report['bundle']['id'][:16]}… · {env.get('cpu')} · {env.get('cpus_usable')} usable cores · "
               f"threads {cfg.threads} · GPU {gpu.get('name', 'none')} · torch {env.get('torch') or 'not installed'}"
               f" · onnxruntime {env.get('onnxruntime')}")
    plot = report.get("plot", "")
    typer.echo(f"wrote {out / 'bench.json'}" + (f" and {plot}" if plot.endswith(".png") else f"; plot {plot}"))
