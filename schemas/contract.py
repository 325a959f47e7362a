"""The data contract of tripletflow, declared once and imported everywhere.

Input: TFRecord files (plain or GZIP) of `tf.train.Example`, one per image, with the
features named below; their shapes live in the tensorflow-metadata schema
`input_schema.pbtxt` beside this file. Outputs: the Parquet tables `vectors`,
`examples` and `dead_letter`, whose pyarrow schemas are defined here, plus
`summary.json` and `MANIFEST.json` whose keys are listed here. README.md beside
this file says what each column means, with units.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import pyarrow as pa

# ---------------------------------------------------------------------------
# Input: tf.train.Example features.
# ---------------------------------------------------------------------------
EXAMPLE_ID = "example_id"  # bytes, one value
EMBEDDINGS = "embeddings"  # float list, row-major [levels, height, width, anchors, dim]
LABELS = "labels"  # int64 list, row-major [levels, height, width, anchors]

EMPTY_LABEL = -1  # label of an empty box (and of padding in padded sets)

DEFAULT_GRID = (2, 13, 13, 5)  # [levels, height, width, anchors], the seeds' shape
DEFAULT_DIM = 100  # floats per box embedding

INPUT_SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "input_schema.pbtxt")

# ---------------------------------------------------------------------------
# Boxes: one row per box, the raw input of the transform graph (box_schema.pbtxt).
# ---------------------------------------------------------------------------
BOX_EMBEDDING = "embedding"  # float [dim], raw units
BOX_LABEL = "label"  # int64 scalar
# Carried past tf.Transform beside each box row (passthrough: not inputs of the transform graph).
BOX_EXAMPLE_ID = EXAMPLE_ID  # the box's example
BOX_INDEX = "box"  # int64: flat index of the box in its grid, row-major [levels, height, width, anchors]
BOX_SET = "set"  # int64: index of the box's example in its record batch (rows of an example are adjacent)
BOX_PASSTHROUGH = (BOX_EXAMPLE_ID, BOX_INDEX, BOX_SET)

BOX_SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "box_schema.pbtxt")


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """Shape of one image's box grid: [levels, height, width, anchors] boxes of `dim` floats."""

    levels: int = DEFAULT_GRID[0]
    height: int = DEFAULT_GRID[1]
    width: int = DEFAULT_GRID[2]
    anchors: int = DEFAULT_GRID[3]
    dim: int = DEFAULT_DIM

    def __post_init__(self):
        for name in ("levels", "height", "width", "anchors", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"grid {name} must be a positive integer, got {value!r}")

    @classmethod
    def parse(cls, grid: str | Sequence[int] = DEFAULT_GRID, dim: int | str = DEFAULT_DIM) -> "GridSpec":
        """Builds a spec from "L,H,W,A" (or a 4-sequence) and a dim; raises ValueError when malformed."""
        if isinstance(grid, str):
            try:
                grid = [int(part) for part in grid.split(",")]
            except ValueError:
                raise ValueError(f"--grid must be four integers L,H,W,A, got {grid!r}") from None
        grid = list(grid)
        if len(grid) != 4:
            raise ValueError(f"--grid must be four integers L,H,W,A, got {grid!r}")
        try:
            dim = int(dim)
        except (TypeError, ValueError):
            raise ValueError(f"--dim must be a positive integer, got {dim!r}") from None
        return cls(*grid, dim=dim)

    @property
    def grid_shape(self) -> tuple[int, int, int, int]:
        """[levels, height, width, anchors]."""
        return (self.levels, self.height, self.width, self.anchors)

    @property
    def boxes(self) -> int:
        """Boxes per image: levels * height * width * anchors."""
        return self.levels * self.height * self.width * self.anchors

    @property
    def embeddings_length(self) -> int:
        """Floats in the flat `embeddings` feature: boxes * dim."""
        return self.boxes * self.dim

    def box_position(self, box_index):
        """(level, row, col, anchor) of flat box indices (ints or numpy arrays), row-major."""
        anchor = box_index % self.anchors
        col = (box_index // self.anchors) % self.width
        row = (box_index // (self.anchors * self.width)) % self.height
        level = box_index // (self.anchors * self.width * self.height)
        return level, row, col, anchor

    def as_list(self) -> list[int]:
        return [self.levels, self.height, self.width, self.anchors]


def _schema_with_shapes(path: str, shapes: dict):
    """The tensorflow-metadata Schema in `path` with each feature's shape set from `shapes`."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    with open(path) as f:
        schema = text_format.Parse(f.read(), schema_pb2.Schema())
    for feature in schema.feature:
        del feature.shape.dim[:]
        for size in shapes[feature.name]:
            feature.shape.dim.add(size=size)
    return schema


def input_schema(grid: GridSpec = GridSpec()):
    """The tensorflow-metadata Schema of the input records, with the shapes of `grid`."""
    return _schema_with_shapes(
        INPUT_SCHEMA_PATH,
        {
            EXAMPLE_ID: [1],
            EMBEDDINGS: [*grid.grid_shape, grid.dim],
            LABELS: list(grid.grid_shape),
        },
    )


def box_schema(grid: GridSpec = GridSpec()):
    """The tensorflow-metadata Schema of one box (the transform graph's raw input) for `grid`'s dim."""
    return _schema_with_shapes(BOX_SCHEMA_PATH, {BOX_EMBEDDING: [grid.dim], BOX_LABEL: []})


# Arrow layout of the box record batches between EmbeddingStats stages: every column a list
# of one value per row (a vector of `dim` for the embedding), as TFXIO lays out features.
BOX_ARROW_SCHEMA = pa.schema(
    [
        pa.field(BOX_EXAMPLE_ID, pa.large_list(pa.large_binary())),
        pa.field(BOX_INDEX, pa.large_list(pa.int64())),
        pa.field(BOX_SET, pa.large_list(pa.int64())),
        pa.field(BOX_LABEL, pa.large_list(pa.int64())),
        pa.field(BOX_EMBEDDING, pa.large_list(pa.float32())),
    ]
)


# ---------------------------------------------------------------------------
# Rejections: why a record went to dead letter.
# ---------------------------------------------------------------------------
class Reason:
    """Reasons a record is rejected; the `reason` column of `dead_letter`."""

    UNPARSEABLE = "unparseable"  # bytes are not a tf.train.Example
    CORRUPT_FILE = "corrupt_file"  # TFRecord framing broken (bad CRC, truncated, not TFRecord)
    MISSING_FEATURE = "missing_feature"  # example_id, embeddings or labels absent
    WRONG_TYPE = "wrong_type"  # a feature holds the wrong kind of list
    WRONG_LENGTH = "wrong_length"  # list length does not match the grid
    NON_FINITE = "non_finite"  # NaN or Inf in a valid (label >= 0) box
    NORM_OVERFLOW = "norm_overflow"  # a valid box's norms could overflow float32 (validate.MAX_L1_NORM)
    BAD_LABEL = "bad_label"  # a label below -1
    BAD_EXAMPLE_ID = "bad_example_id"  # example_id empty or not UTF-8

    ALL = (
        UNPARSEABLE,
        CORRUPT_FILE,
        MISSING_FEATURE,
        WRONG_TYPE,
        WRONG_LENGTH,
        NON_FINITE,
        NORM_OVERFLOW,
        BAD_LABEL,
        BAD_EXAMPLE_ID,
    )


# ---------------------------------------------------------------------------
# Outputs: Parquet tables.
# ---------------------------------------------------------------------------
# Column names, declared once: the schemas below, the stages and every reader use these.
COL_EXAMPLE_ID = "example_id"  # in all three tables
COL_LEVEL, COL_ROW, COL_COL, COL_ANCHOR = "level", "row", "col", "anchor"  # the box's grid position
COL_LABEL = "label"
COL_L2_NORM, COL_L1_NORM, COL_MAX_ABS = "l2_norm", "l1_norm", "max_abs"  # raw-embedding units
COL_L2_NORM_Z, COL_L2_NORM_BUCKET = "l2_norm_z", "l2_norm_bucket"
COL_EMBEDDING = "embedding"  # the fed (normalized) vector
COL_SOURCE_FILE, COL_REASON, COL_DETAIL, COL_RAW = "source_file", "reason", "detail", "raw"  # dead letters

VECTORS_SCHEMA = pa.schema(
    [
        pa.field(COL_EXAMPLE_ID, pa.string(), nullable=False),
        pa.field(COL_LEVEL, pa.int32(), nullable=False),
        pa.field(COL_ROW, pa.int32(), nullable=False),
        pa.field(COL_COL, pa.int32(), nullable=False),
        pa.field(COL_ANCHOR, pa.int32(), nullable=False),
        pa.field(COL_LABEL, pa.int64(), nullable=False),
        pa.field(COL_L2_NORM, pa.float32(), nullable=False),
        pa.field(COL_L1_NORM, pa.float32(), nullable=False),
        pa.field(COL_MAX_ABS, pa.float32(), nullable=False),
        pa.field(COL_L2_NORM_Z, pa.float32(), nullable=False),
        pa.field(COL_L2_NORM_BUCKET, pa.int64(), nullable=False),
        pa.field(COL_EMBEDDING, pa.list_(pa.float32()), nullable=False),
    ]
)

# Statistics per example, in the order the loss graph returns them
# (components.triplet_loss.STATISTIC_NAMES); the means/extremes are null where undefined.
EXAMPLE_COUNT_COLUMNS = (
    "n_boxes",
    "n_identities",
    "n_pos_pairs",
    "n_neg_pairs",
    "n_triplets",
    "n_active_triplets",
)
EXAMPLE_STATISTIC_COLUMNS = (
    "n_boxes",
    "n_identities",
    "n_pos_pairs",
    "n_neg_pairs",
    "pos_dist_mean",
    "pos_dist_max",
    "neg_dist_mean",
    "neg_dist_min",
    "n_triplets",
    "n_active_triplets",
    "triplet_loss_sum",
    "batch_all_loss",
    "batch_hard_loss",
    "semi_hard_loss",
)
# Which count makes each float column defined: the value is null where that count is 0.
NULL_WHEN_ZERO = {
    "pos_dist_mean": "n_pos_pairs",
    "pos_dist_max": "n_pos_pairs",
    "neg_dist_mean": "n_neg_pairs",
    "neg_dist_min": "n_neg_pairs",
    "triplet_loss_sum": "n_triplets",
    "batch_all_loss": "n_triplets",
    "batch_hard_loss": "n_triplets",
    "semi_hard_loss": "n_triplets",
}

EXAMPLES_SCHEMA = pa.schema(
    [pa.field(COL_EXAMPLE_ID, pa.string(), nullable=False)]
    + [
        pa.field(name, pa.int64(), nullable=False)
        if name in EXAMPLE_COUNT_COLUMNS
        else pa.field(name, pa.float32(), nullable=True)
        for name in EXAMPLE_STATISTIC_COLUMNS
    ]
)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field(COL_SOURCE_FILE, pa.string(), nullable=False),
        pa.field(COL_REASON, pa.string(), nullable=False),
        pa.field(COL_DETAIL, pa.string(), nullable=False),
        pa.field(COL_EXAMPLE_ID, pa.string(), nullable=True),
        pa.field(COL_RAW, pa.binary(), nullable=True),
    ]
)


def check_columns(schema: pa.Schema, columns, reader: str) -> tuple:
    """`columns` (a reader's selection) unchanged; ValueError at import when one is not in `schema`."""
    unknown = [name for name in columns if name not in schema.names]
    if unknown:
        raise ValueError(f"{reader} reads columns {unknown} that the contract does not declare")
    return tuple(columns)


# ---------------------------------------------------------------------------
# Outputs: files and JSON documents of one run's output directory.
# ---------------------------------------------------------------------------
VECTORS_DIR = "vectors"
EXAMPLES_DIR = "examples"
DEAD_LETTER_DIR = "dead_letter"
TRANSFORM_GRAPH_DIR = "transform_graph"
SUMMARY_FILE = "summary.json"
SUMMARY_PARQUET_FILE = "summary.parquet"  # summary.json as one row (SUMMARY_SCHEMA)
MANIFEST_FILE = "MANIFEST.json"  # written last: its presence marks a complete run
REPORT_FILE = "report.html"
ALERTS_FILE = "alerts.json"
TABLE_SCHEMAS = {VECTORS_DIR: VECTORS_SCHEMA, EXAMPLES_DIR: EXAMPLES_SCHEMA, DEAD_LETTER_DIR: DEAD_LETTER_SCHEMA}

# summary.json, and the same as one row of summary.parquet (for querying many runs together,
# e.g. every night of a nightly job); see README.md for each key's meaning and units.
_COUNT = pa.int64()
_MEAN = pa.float64()  # null where undefined (nothing to average)
SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("records_read", _COUNT, nullable=False),
        pa.field("records_good", _COUNT, nullable=False),
        pa.field("records_rejected", _COUNT, nullable=False),
        pa.field(
            "rejected_by_reason", pa.struct([pa.field(r, _COUNT, nullable=False) for r in Reason.ALL]), nullable=False
        ),
        *[
            pa.field(name, _COUNT, nullable=False)
            for name in (
                "examples",
                "empty_examples",
                "valid_boxes",
                "identities",
                "pos_pairs",
                "neg_pairs",
                "triplets",
                "active_triplets",
            )
        ],
        *[
            pa.field(name, _MEAN)
            for name in (
                "active_triplet_fraction",
                "mean_batch_all_loss",
                "mean_batch_hard_loss",
                "mean_semi_hard_loss",
            )
        ],
        pa.field(
            "l2_norm",
            pa.struct(
                [
                    pa.field("count", _COUNT, nullable=False),
                    *[pa.field(name, _MEAN) for name in ("mean", "std", "min", "max")],
                    pa.field("quantiles", pa.map_(pa.string(), pa.float64()), nullable=False),  # "p01".."p99"
                ]
            ),
            nullable=False,
        ),
        pa.field(
            "histogram",
            pa.struct(
                [
                    pa.field("distance", pa.string(), nullable=False),
                    pa.field("bin_edges", pa.list_(pa.float64()), nullable=False),
                    pa.field("positive", pa.list_(_COUNT), nullable=False),
                    pa.field("negative", pa.list_(_COUNT), nullable=False),
                ]
            ),
            nullable=False,
        ),
        pa.field("roc_auc", _MEAN),
        pa.field("roc_auc_error_bound", _MEAN),
    ]
)
SUMMARY_KEYS = tuple(SUMMARY_SCHEMA.names)  # top-level keys of summary.json, in order

# Top-level keys of MANIFEST.json.
MANIFEST_KEYS = (
    "tripletflow_version",
    "run_id",
    "run_dir",
    "input_pattern",
    "input_files",
    "options",
    "versions",
    "counts",
    "files",
    "start_time",
    "end_time",
)
# Keys of each entry of MANIFEST.json's "files": the run's files, path relative to the output dir.
MANIFEST_FILE_KEYS = ("path", "bytes", "rows")

# ---------------------------------------------------------------------------
# Layout of an output directory, and the reader rule.
#
#   <output>/MANIFEST.json            the commit record, written last (atomically) by the pipeline
#   <output>/runs/<run_id>/...        the run's files: TABLE_SCHEMAS dirs, transform_graph/, summary.*
#   <output>/report.html, alerts.json the report of the committed run (written after the commit)
#
# Data files are written once, in their run's directory, and never copied: committing a run
# is writing MANIFEST.json. A reader opens MANIFEST.json first and reads only the files it
# lists (`listed_files`); anything else under the output (a run in flight, the leftovers of a
# killed one) is not part of the output. After its commit, a run deletes the runs it replaced.
# ---------------------------------------------------------------------------
RUNS_DIR = "runs"
RUN_ID_TIME_FORMAT = "%Y%m%dT%H%M%S%fZ"  # run ids start with their UTC start time: they sort by it


def output_path(output_dir: str, relative: str) -> str:
    """`relative` (a manifest path, "/"-separated) under `output_dir` (a local path or a URI)."""
    return f"{os.fspath(output_dir).rstrip('/')}/{relative}"


def run_path(output_dir: str, manifest: dict, *parts: str) -> str:
    """A path inside the committed run's directory, e.g. run_path(out, m, TRANSFORM_GRAPH_DIR)."""
    if "run_dir" not in manifest:
        raise ValueError(
            f"{output_path(output_dir, MANIFEST_FILE)} has no run_dir: written by an older "
            "tripletflow; re-run EmbeddingStats into this output"
        )
    return output_path(output_dir, "/".join([manifest["run_dir"], *parts]))


def listed_files(output_dir: str, manifest: dict, item: str) -> list[str]:
    """The committed files of `item` (a table name, SUMMARY_FILE, ...), sorted: the reader rule.

    `item` names a directory of the run (every file under it) or a file of the run.
    """
    run_path(output_dir, manifest)  # the same clear error for an older manifest
    prefix = f"{manifest['run_dir']}/{item}"
    return sorted(
        output_path(output_dir, entry["path"])
        for entry in manifest["files"]
        if entry["path"] == prefix or entry["path"].startswith(prefix + "/")
    )
