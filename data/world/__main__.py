"""CLI: python -m data.world --out DIR [--seed N] [--corpus-chars N] [...every WorldConfig field]."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from .config import WorldConfig
from .writer import write_world


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.world",
                                     description="Generate the synthetic world and its dataset files.")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    defaults = WorldConfig()
    for f in dataclasses.fields(WorldConfig):
        default = getattr(defaults, f.name)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default,
                            help=f"(default: {default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(WorldConfig)}
    try:
        config = WorldConfig(**values)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = write_world(args.out, config)
    elapsed = time.perf_counter() - start
    print(f"world written to {out} in {elapsed:.1f}s")
    for path in sorted(out.iterdir()):
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                n_rows = sum(1 for _ in f)
            print(f"  {path.name:20s} {n_rows:7d} rows {path.stat().st_size:10d} bytes")
        else:
            print(f"  {path.name:20s} {'':12s} {path.stat().st_size:10d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
