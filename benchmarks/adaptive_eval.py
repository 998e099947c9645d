"""Thin driver: ``python benchmarks/adaptive_eval.py ARGS`` is ``medfedpure eval --attacks ladder ARGS``
(an ``--attacks`` in ARGS wins). The work lives in :mod:`medfedpure.eval.runner`."""

import sys

from medfedpure.cli import app

if __name__ == "__main__":
    app(["eval", "--attacks", "ladder", *sys.argv[1:]], prog_name="medfedpure")
