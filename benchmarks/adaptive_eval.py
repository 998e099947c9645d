"""Thin driver: `python benchmarks/adaptive_eval.py ...` runs :mod:`medfedpure.eval.adaptive`."""

from medfedpure.eval.adaptive import main

if __name__ == "__main__":
    main()
