"""Thin driver: `python benchmarks/defended_eval.py ...` runs :mod:`medfedpure.eval.defended`."""

from medfedpure.eval.defended import main

if __name__ == "__main__":
    main()
