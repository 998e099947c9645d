"""``python -m medfedpure …``: the same command line as the ``medfedpure`` console script."""

from medfedpure.cli import main

if __name__ == "__main__":
    main()
