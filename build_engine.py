#!/usr/bin/env python3
"""Build an NLD engine: the same as `nld-trt build` (see `python build_engine.py --help`)."""

from nld_trt.cli import main

if __name__ == "__main__":
    import sys

    main(["build", *sys.argv[1:]])
