"""`tripletflow demo --output DIR [--examples N]`: sample data under DIR/input, then EmbeddingStats
into DIR/output with the local runner (FnApiRunner); prints where the outputs are."""

from __future__ import annotations

import argparse
import os

from components import sample_data
from pipelines import embedding_stats
from pipelines.exit_codes import ExitCode

DEFAULT_EXAMPLES = 64
DEMO_SHARDS = 2


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tripletflow demo", description=__doc__)
    parser.add_argument("--output", required=True, help="demo directory (input/ and output/ go under it)")
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="sample images to generate")
    args, extra = parser.parse_known_args(argv)  # extra flags go to `tripletflow run`
    input_dir = os.path.join(args.output, "input")
    output_dir = os.path.join(args.output, "output")
    try:
        options = sample_data.SampleOptions(examples=args.examples, shards=DEMO_SHARDS)
    except ValueError as error:
        parser.error(str(error))
    paths = sample_data.generate(input_dir, options)
    print(f"demo: wrote {args.examples} sample examples in {len(paths)} TFRecord file(s) under {input_dir}")
    code = embedding_stats.run(
        ["--input", os.path.join(input_dir, "*"), "--output", output_dir, "--runner", "FnApiRunner", *extra]
    )
    if code == ExitCode.OK:
        print(
            f"demo: outputs under {output_dir}: MANIFEST.json (the committed run and its files: vectors/, "
            "examples/, dead_letter/ (Parquet), summary.json (and .parquet), transform_graph/ under runs/), "
            "report.html"
        )
    return code
