"""EmbeddingStats component spec (TFX-style): declared inputs, outputs and parameters.

The `tfx` package does not install on this stack, so this follows TFX's conventions
without it: a spec, an executor (`executor.execute`), and a thin component entry
(`EmbeddingStats(...).run()` here, `tripletflow run` on the command line).
"""

from __future__ import annotations

import dataclasses

from schemas import contract

INPUTS = {
    "examples": "glob of TFRecord files of tf.train.Example (plain or GZIP), schema schemas/input_schema.pbtxt",
}
OUTPUTS = {
    contract.VECTORS_DIR: "Parquet, contract.VECTORS_SCHEMA: one row per valid box",
    contract.EXAMPLES_DIR: "Parquet, contract.EXAMPLES_SCHEMA: one row per good record",
    contract.DEAD_LETTER_DIR: "Parquet, contract.DEAD_LETTER_SCHEMA: one row per rejected record",
    contract.TRANSFORM_GRAPH_DIR: "tf.Transform output (transform_fn, transformed_metadata, metadata); "
                                  "raw input one box, schemas/box_schema.pbtxt",
    contract.SUMMARY_FILE: "dataset summary, keys contract.SUMMARY_KEYS",
    contract.SUMMARY_PARQUET_FILE: "the same summary as one Parquet row, contract.SUMMARY_SCHEMA",
    contract.MANIFEST_FILE: "written last; keys contract.MANIFEST_KEYS",
}
# parameter -> flag of EmbeddingStatsOptions
PARAMETERS = {
    "grid": "--grid", "dim": "--dim", "margin": "--margin", "distance": "--distance",
    "normalize": "--no-normalize", "center": "--center", "batch_size": "--batch-size",
    "norm_buckets": "--norm-buckets", "histogram_bins": "--histogram-bins",
}


@dataclasses.dataclass
class EmbeddingStats:
    """The component: `EmbeddingStats(input_pattern, output_dir, flags=[...]).run()` -> RunResult."""

    input_pattern: str
    output_dir: str
    flags: list = dataclasses.field(default_factory=list)  # any EmbeddingStats or Beam flags

    def options(self):
        from components.embedding_stats.options import EmbeddingStatsOptions

        return EmbeddingStatsOptions(["--input", self.input_pattern, "--output", self.output_dir, *self.flags])

    def run(self):
        from components.embedding_stats import executor

        return executor.execute(self.options())
