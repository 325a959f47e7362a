"""`tripletflow generate`: write sample TFRecord shards (see components.sample_data)."""

from __future__ import annotations

import argparse
import sys

from components import sample_data
from schemas import contract


def parse_args(argv):
    defaults = sample_data.SampleOptions()
    parser = argparse.ArgumentParser(prog="tripletflow generate", description=__doc__)
    parser.add_argument("--output", required=True, help="directory to write TFRecord shards into")
    parser.add_argument("--examples", type=int, default=defaults.examples, help="images to write")
    parser.add_argument("--shards", type=int, default=defaults.shards, help="TFRecord files")
    parser.add_argument("--grid", default=",".join(map(str, contract.DEFAULT_GRID)), help="L,H,W,A")
    parser.add_argument("--dim", type=int, default=contract.DEFAULT_DIM, help="floats per box")
    parser.add_argument("--identities", type=int, default=defaults.identities, help="identity pool size")
    parser.add_argument(
        "--empty-fraction", type=float, default=defaults.empty_fraction, help="fraction of boxes left empty (label -1)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--gzip", action="store_true", help="GZIP-compress the shards")
    parser.add_argument(
        "--seed-toy",
        action="store_true",
        help="write the first seed thread's toy batch (2 images, grid 2,13,13,5, dim 100)",
    )
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    try:
        options = sample_data.SampleOptions(
            examples=args.examples,
            shards=args.shards,
            grid=contract.GridSpec.parse(args.grid, args.dim),
            identities=args.identities,
            empty_fraction=args.empty_fraction,
            seed=args.seed,
            gzip=args.gzip,
        )
    except ValueError as error:
        print(f"tripletflow generate: {error}", file=sys.stderr)
        return 2
    paths = sample_data.generate(args.output, options, seed_toy=args.seed_toy)
    print(f"wrote {len(paths)} TFRecord file(s) under {args.output}")
    return 0
