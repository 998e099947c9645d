"""Thin driver: ``python benchmarks/defended_eval.py ARGS`` is ``medfedpure eval --attacks paper ARGS``
(rung 1: PGD against the classifier alone, judged bare and through the Defender). The work lives in
:mod:`medfedpure.eval.runner`."""

import sys

from medfedpure.cli import app

if __name__ == "__main__":
    app(["eval", "--attacks", "paper", *sys.argv[1:]], prog_name="medfedpure")
