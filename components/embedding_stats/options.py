"""`EmbeddingStatsOptions`: the job's flags as a Beam `PipelineOptions` subclass.

Being a `PipelineOptions` subclass, the same flags parse on every runner (local,
Dataflow, a worker pool) and travel with the pipeline. `validate_options` turns bad
values into one-line `ValueError`s before any work starts.
"""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import (
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from components import loss_settings
from components.embedding_stats.preprocessing import QUANTILE_EPSILON
from components.embedding_stats.read import MAX_RECORD_BYTES
from schemas import contract

DEFAULT_BATCH_SIZE = 16  # examples per loss-graph call and per Arrow record batch
DEFAULT_NORM_BUCKETS = 10  # quantile buckets of the L2 norm (l2_norm_bucket in 0..9)
DEFAULT_HISTOGRAM_BINS = 200  # fixed bins of the pair-distance histograms
# Limits of option values (checked up front, one-line error, exit 2; --margin's in loss_settings):
# --batch-size is tf.Transform's desired batch (rows of boxes): 2^16 rows of the seed dim (100
# floats) are 26 MB per tensor; the loss graph is cut into bounded calls whatever the value.
MAX_BATCH_SIZE = 1 << 16
# Finer buckets than the quantile sketch's accuracy (QUANTILE_EPSILON) would be noise.
MAX_NORM_BUCKETS = round(1 / QUANTILE_EPSILON)
# summary.json lists every bin of two histograms, and every batch's partial summary carries them.
MAX_HISTOGRAM_BINS = 1 << 16
# A tf.train.Example holding more floats would exceed protobuf's 2 GiB: no record could match.
MAX_EMBEDDINGS_LENGTH = MAX_RECORD_BYTES // 4  # 4 bytes per packed float
# The local runner used when none (or plain DirectRunner) is named: FnApiRunner never
# tries to download the Prism binary, and honours --direct_running_mode/--direct_num_workers.
LOCAL_RUNNER = "FnApiRunner"
PRISM_FIRST_RUNNERS = ("DirectRunner", "SwitchingDirectRunner")
# The project's pyproject.toml: Dataflow workers get tripletflow from the sdist built from it.
PYPROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "pyproject.toml")


class EmbeddingStatsOptions(PipelineOptions):
    """EmbeddingStats' pipeline parameters; any Beam pipeline option may be mixed in.

    Only what the job itself needs: they travel with the pipeline to the workers. Flags of the
    launching process (--no-wait, the report's) belong to `pipelines/embedding_stats.py`.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", metavar="GLOB", help="glob of input TFRecord files (plain or GZIP, any name)")
        parser.add_argument(
            "--output",
            metavar="DIR",
            help="output directory (local or gs://): each run commits into it, replacing the previous run",
        )
        parser.add_argument(
            "--grid",
            default=",".join(map(str, contract.DEFAULT_GRID)),
            help="grid shape L,H,W,A (levels, height, width, anchors)",
        )
        parser.add_argument("--dim", default=contract.DEFAULT_DIM, type=int, help="floats per box embedding")
        parser.add_argument(
            "--margin",
            default=loss_settings.DEFAULT_MARGIN,
            type=float,
            help=f"triplet margin, in [0, {loss_settings.MAX_MARGIN:.4g}]",
        )
        parser.add_argument(
            "--distance",
            default=loss_settings.DEFAULT_DISTANCE,
            help=f"pair distance, one of {', '.join(loss_settings.DISTANCES)}",
        )
        parser.add_argument(
            "--no-normalize",
            dest="normalize",
            action="store_false",
            default=True,
            help="use raw vectors instead of L2-normalized ones",
        )
        parser.add_argument(
            "--center", action="store_true", default=False, help="subtract the dataset mean vector before normalizing"
        )
        parser.add_argument(
            "--batch-size", dest="batch_size", default=DEFAULT_BATCH_SIZE, type=int, help="examples per loss-graph call"
        )
        parser.add_argument(
            "--norm-buckets",
            dest="norm_buckets",
            default=DEFAULT_NORM_BUCKETS,
            type=int,
            help="quantile buckets of the L2 norm",
        )
        parser.add_argument(
            "--histogram-bins",
            dest="histogram_bins",
            default=DEFAULT_HISTOGRAM_BINS,
            type=int,
            help="fixed bins of the pair-distance histograms",
        )


def grid_spec(options: EmbeddingStatsOptions) -> contract.GridSpec:
    opts = options.view_as(EmbeddingStatsOptions)
    return contract.GridSpec.parse(opts.grid, opts.dim)


def validate_options(options: PipelineOptions) -> contract.GridSpec:
    """Checks values that need no I/O; returns the grid. Raises ValueError with a one-line message."""
    opts = options.view_as(EmbeddingStatsOptions)
    if not opts.input:
        raise ValueError("--input is required (a glob of TFRecord files)")
    if not opts.output:
        raise ValueError("--output is required (a directory)")
    grid = grid_spec(opts)
    if grid.embeddings_length > MAX_EMBEDDINGS_LENGTH:
        raise ValueError(
            f"--grid {opts.grid} --dim {opts.dim}: {grid.embeddings_length} floats per record, more than "
            f"the {MAX_EMBEDDINGS_LENGTH} a tf.train.Example can hold"
        )
    loss_settings_of(opts)
    for name, limit in (
        ("batch_size", MAX_BATCH_SIZE),
        ("norm_buckets", MAX_NORM_BUCKETS),
        ("histogram_bins", MAX_HISTOGRAM_BINS),
    ):
        if not 1 <= getattr(opts, name) <= limit:
            raise ValueError(f"--{name.replace('_', '-')} must be in [1, {limit}], got {getattr(opts, name)}")
    return grid


def loss_settings_of(options: PipelineOptions) -> loss_settings.LossSettings:
    """The run's loss settings; ValueError naming the flag when one is out of range."""
    opts = options.view_as(EmbeddingStatsOptions)
    try:
        return loss_settings.LossSettings(margin=opts.margin, distance=opts.distance, normalize=opts.normalize)
    except ValueError as error:
        raise ValueError(f"--{error}") from None


def use_local_runner_by_default(options: PipelineOptions) -> None:
    """Names FnApiRunner when no runner (or a Prism-first DirectRunner) is asked for.

    Plain DirectRunner first tries to download Prism, which hangs or fails offline.
    """
    standard = options.view_as(StandardOptions)
    if standard.runner is None or standard.runner in PRISM_FIRST_RUNNERS:
        standard.runner = LOCAL_RUNNER


def stage_project_code(options: PipelineOptions) -> None:
    """Dataflow workers need tripletflow: stage the sdist built from pyproject.toml unless told otherwise."""
    setup = options.view_as(SetupOptions)
    worker = options.view_as(WorkerOptions)
    runner = options.view_as(StandardOptions).runner or ""
    if (
        runner.endswith("DataflowRunner")
        and not (setup.setup_file or setup.extra_packages or worker.sdk_container_image)
        and os.path.exists(PYPROJECT)
    ):
        setup.setup_file = PYPROJECT
