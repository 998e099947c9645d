"""Defender latency: a thin driver over ``medfedpure bench`` (the logic is in ``medfedpure.bench``).

    .venv/bin/python benchmarks/latency.py [medfedpure bench options] --out benchmarks/out/latency
    .venv/bin/python benchmarks/latency.py --agreement-data DATA [--site 0] [--split test] [--limit 400]
                                           [--bundle B] [--threads 2] [--out benchmarks/out/latency]

Without ``--agreement-data`` every argument goes to ``medfedpure bench`` (see ``medfedpure bench
--help``). With it, the torch-vs-onnxruntime and FP16-vs-FP32 agreement on a data split is measured
instead (:func:`medfedpure.bench.agreement.agreement`) and written to OUT/agreement.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if "--agreement-data" not in argv:
        from medfedpure.cli import app

        app(["bench", *argv])
        return
    ap = argparse.ArgumentParser(description="torch-vs-onnxruntime and FP16-vs-FP32 agreement on a data split")
    ap.add_argument("--agreement-data", required=True)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--site", default="0")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--out", default="benchmarks/out/latency")
    args = ap.parse_args(argv)
    from medfedpure.bench.agreement import agreement
    from medfedpure.runtime.bundle import default_bundle_path

    res = agreement(args.bundle or str(default_bundle_path()), args.agreement_data, args.site, args.split,
                    args.threads, args.limit)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "agreement.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
