"""Composite Beam PTransforms of EmbeddingStats.

ReadRecords -> ValidateRecords -> AnalyzeNorms (tf.Transform) -> PairStatistics ->
Summarize -> WriteOutputs. Records are read per file with tf.data (compression chosen
by the file's content, framing errors caught per file), decoded in batches to Arrow by
tfx-bsl's Example decoder (the decoder inside TFXIO's TFExampleRecord) and validated with
numpy on the Arrow buffers; the good rows go on as record batches to tf.Transform through
TFXIO's TensorAdapterConfig (`TFExampleBeamRecord`), one decode per record.

Memory stays bounded on every runner: big payloads (records, vectors) only flow through
fused ParDos; what crosses a shuffle or a side input is small (file names, the transform
graph, fixed-size summary accumulators). tf.Transform's analyze and transform phases
read the input separately (as TFX's Transform does), and the second read starts after the
analysis (gated on the transform graph), so no runner holds the dataset between passes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from components import triplet_loss
from components.embedding_stats import preprocessing as pp
from schemas import contract

METRICS_NAMESPACE = "tripletflow.embedding_stats"
DEAD = "dead_letter"  # tag of dead-letter outputs
GZIP_MAGIC = b"\x1f\x8b"
READ_BUFFER_BYTES = 8 << 20  # tf.data read buffer per file
READ_BATCH = 64  # records fetched per tf.data step
VALIDATE_MAX_BATCH = 64  # records decoded and validated together
TABLE_BATCH_ROWS = 4096  # rows gathered into one Parquet row group for small tables
SET_SIZE_STEP = 64  # padded set sizes: powers of two up to this, then multiples of it
MAX_PAIR_CELLS_PER_CALL = 1 << 23  # bound on examples * boxes^2 per loss-graph call (memory)
PROGRESS_EVERY_EXAMPLES = 500  # a progress line on stderr every this many examples (per worker)
QUANTILE_POINTS = 101  # p00..p100 of the L2 norm; the summary keeps p01..p99
PARQUET_CODEC = "snappy"
PARQUET_SUFFIX = ".parquet"

_LOG = logging.getLogger(__name__)


def dead_letter(source_file, reason, detail, example_id=None, raw=None) -> dict:
    """One `dead_letter` row (contract.DEAD_LETTER_SCHEMA)."""
    return {"source_file": source_file, "reason": reason, "detail": detail, "example_id": example_id, "raw": raw}


# --------------------------------------------------------------------------- read


def detect_compression(path: str) -> str:
    """"GZIP" if the file starts with the gzip magic bytes, else "" (plain TFRecord)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return "GZIP" if f.read(len(GZIP_MAGIC)) == GZIP_MAGIC else ""


def _clean_tf_message(message: str) -> str:
    """A TensorFlow error message without its op/function decorations."""
    message = re.sub(r"\{\{[^}]*\}\}", "", message)
    message = re.sub(r"\[Op:[^\]]*\].*$", "", message)
    return " ".join(message.split())


class _ReadFileFn(beam.DoFn):
    """file path -> (path, raw record) ...; broken framing -> one corrupt_file dead letter.

    tf.data reports a truncated record, a bad CRC, or a file that is not TFRecord as an
    OpError; the records before it are kept and the rest of the file is skipped.
    """

    def __init__(self, emit_metrics: bool):
        self._emit_metrics = emit_metrics

    def setup(self):
        import tensorflow as tf

        self._tf = tf
        self._corrupt = Metrics.counter(METRICS_NAMESPACE, f"rejected_{contract.Reason.CORRUPT_FILE}")
        self._files = Metrics.counter(METRICS_NAMESPACE, "files_read")

    def process(self, path):
        tf = self._tf
        index = 0
        try:
            compression = detect_compression(path)
            dataset = tf.data.TFRecordDataset(path, compression_type=compression, buffer_size=READ_BUFFER_BYTES)
            try:  # fast path: records in batches (one eager step per READ_BATCH records)
                for records in dataset.batch(READ_BATCH).as_numpy_iterator():
                    for record in records:
                        yield path, record
                    index += len(records)
            except tf.errors.OpError:
                # The batch holding the break is lost: re-read one by one from the first record not
                # yet emitted, so every record before the break is kept and the error is exact.
                for record in dataset.skip(index).as_numpy_iterator():
                    yield path, record
                    index += 1
        except (tf.errors.OpError, OSError) as error:
            message = _clean_tf_message(getattr(error, "message", None) or str(error))
            detail = f"TFRecord framing broken after {index} good record(s); rest of file skipped: {message}"
            _LOG.warning("%s: %s", path, detail)
            if self._emit_metrics:
                self._corrupt.inc()
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(path, contract.Reason.CORRUPT_FILE, detail))
        if self._emit_metrics:
            self._files.inc()


class ReadRecords(beam.PTransform):
    """Input files -> tagged outputs: main (source_file, raw bytes), DEAD (corrupt_file rows)."""

    def __init__(self, files, emit_metrics: bool = True, after=None):
        super().__init__()
        self._files = list(files)
        self._emit_metrics = emit_metrics
        self._after = after  # a PCollection to wait for before reading (see build_pipeline)

    def expand(self, pbegin):
        files = pbegin | "Files" >> beam.Create(self._files) | "SpreadFiles" >> beam.Reshuffle()
        if self._after is not None:
            # Reading starts only once `after` is complete, so the records stream through one fused
            # stage (read, validate, transform, statistics, write) instead of piling up before it.
            files = files | "WaitFor" >> beam.Map(lambda path, _: path, beam.pvalue.AsIter(self._after))
        return files | "ReadFile" >> beam.ParDo(_ReadFileFn(self._emit_metrics)).with_outputs(DEAD, main="records")


# --------------------------------------------------------------------------- validate


class _ValidateFn(beam.DoFn):
    """[(source_file, raw)] -> Arrow record batch of the good records; DEAD: rows with their reason.

    Decoding is tfx-bsl's Example decoder with the input schema: the very decoder TFXIO's
    TFExampleRecord runs, so the record batches are exactly what TFXIO would produce and
    tf.Transform consumes them through TFXIO's TensorAdapterConfig (one decode per record).
    """

    def __init__(self, grid: contract.GridSpec, emit: bool):
        self._grid = grid
        self._emit = emit  # only one of the two reading branches reports

    def setup(self):
        self._new_decoder()
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._good = Metrics.counter(METRICS_NAMESPACE, "records_good")
        self._rejected = {r: Metrics.counter(METRICS_NAMESPACE, f"rejected_{r}") for r in contract.Reason.ALL}

    def _new_decoder(self):
        from tfx_bsl.coders import example_coder

        self._decoder = example_coder.ExamplesToRecordBatchDecoder(
            contract.input_schema(self._grid).SerializeToString())

    def _decode(self, raws):
        """Decodes a batch; isolates undecodable records. Returns (record batch, kept indices, failures).

        tfx-bsl's decoder is left in a broken state by a failed decode, so a new one is made after each.
        """
        try:
            return self._decoder.DecodeBatch(raws), list(range(len(raws))), {}
        except RuntimeError:
            self._new_decoder()
        kept, failures = [], {}
        for i, raw in enumerate(raws):
            try:
                self._decoder.DecodeBatch([raw])
                kept.append(i)
            except RuntimeError as error:
                self._new_decoder()
                message = str(error)
                reason = contract.Reason.WRONG_TYPE if "wrong type" in message else contract.Reason.UNPARSEABLE
                failures[i] = (reason, message)
        batch = self._decoder.DecodeBatch([raws[i] for i in kept]) if kept else None
        return batch, kept, failures

    def _check(self, ids, emb_offsets, emb_values, lab_offsets, lab_values, nulls, row):
        """(reason, detail, example_id) of one decoded row, reason None when good."""
        grid = self._grid
        example_id = None
        if not nulls[contract.EXAMPLE_ID][row]:
            values = ids[row].as_py()
            if len(values) == 1:
                try:
                    example_id = values[0].decode("utf-8") or None
                except UnicodeDecodeError:
                    example_id = None
        missing = [name for name in (contract.EXAMPLE_ID, contract.EMBEDDINGS, contract.LABELS) if nulls[name][row]]
        if missing:
            return contract.Reason.MISSING_FEATURE, f"missing feature(s): {', '.join(missing)}", example_id
        n_ids = len(ids[row])
        n_emb = int(emb_offsets[row + 1] - emb_offsets[row])
        n_lab = int(lab_offsets[row + 1] - lab_offsets[row])
        shape = f"grid {','.join(map(str, grid.grid_shape))} dim {grid.dim}"
        if n_emb != grid.embeddings_length or n_lab != grid.boxes or n_ids != 1:
            return (contract.Reason.WRONG_LENGTH,
                    f"lengths embeddings={n_emb} labels={n_lab} example_id={n_ids}, expected "
                    f"{grid.embeddings_length}, {grid.boxes}, 1 for {shape}", example_id)
        if example_id is None:
            return contract.Reason.BAD_EXAMPLE_ID, "example_id is empty or not UTF-8", None
        labels = lab_values[lab_offsets[row]:lab_offsets[row + 1]]
        if labels.min(initial=0) < contract.EMPTY_LABEL:
            box = int(np.argmax(labels < contract.EMPTY_LABEL))
            return (contract.Reason.BAD_LABEL,
                    f"label {int(labels[box])} below {contract.EMPTY_LABEL} at box {box} "
                    f"(level,row,col,anchor)={grid.box_position(box)}", example_id)
        embeddings = emb_values[emb_offsets[row]:emb_offsets[row + 1]].reshape(grid.boxes, grid.dim)
        bad_boxes = ~np.isfinite(embeddings).all(axis=1) & (labels >= 0)
        if bad_boxes.any():
            box = int(np.argmax(bad_boxes))
            return (contract.Reason.NON_FINITE,
                    f"{int(bad_boxes.sum())} valid box(es) hold NaN/Inf, first at box {box} "
                    f"(level,row,col,anchor)={grid.box_position(box)}", example_id)
        return None, None, example_id

    def process(self, batch):
        raws = [raw for _, raw in batch]
        decoded, kept, failures = self._decode(raws)
        rejected = {}
        for i, (reason, detail) in failures.items():
            rejected[i] = (reason, detail, None)
        if decoded is not None:
            import pyarrow.compute as pc

            columns = {name: decoded.column(name) for name in (contract.EXAMPLE_ID, contract.EMBEDDINGS, contract.LABELS)}
            nulls = {name: np.asarray(pc.is_null(col)) for name, col in columns.items()}
            emb, lab = columns[contract.EMBEDDINGS], columns[contract.LABELS]
            emb_offsets, lab_offsets = np.asarray(emb.offsets), np.asarray(lab.offsets)
            emb_values = emb.values.to_numpy(zero_copy_only=False)
            lab_values = lab.values.to_numpy(zero_copy_only=False)
            for row, i in enumerate(kept):
                reason, detail, example_id = self._check(
                    columns[contract.EXAMPLE_ID], emb_offsets, emb_values, lab_offsets, lab_values, nulls, row)
                if reason is not None:
                    rejected[i] = (reason, detail, example_id)
        for i, (source_file, raw) in enumerate(batch):
            if i in rejected and self._emit:
                reason, detail, example_id = rejected[i]
                self._rejected[reason].inc()
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(source_file, reason, detail, example_id, raw))
        good_rows = [row for row, i in enumerate(kept) if i not in rejected]
        if good_rows:
            yield decoded if len(good_rows) == decoded.num_rows else decoded.take(pa.array(good_rows))
        if self._emit:
            self._read.inc(len(batch))
            self._good.inc(len(batch) - len(rejected))


class ValidateRecords(beam.PTransform):
    """(source_file, raw) -> tagged outputs: main record batches of good records, DEAD rejected rows (when `emit`)."""

    def __init__(self, grid: contract.GridSpec, emit: bool = True):
        super().__init__()
        self._grid = grid
        self._emit = emit

    def expand(self, records):
        return (
            records
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=VALIDATE_MAX_BATCH)
            | "Validate" >> beam.ParDo(_ValidateFn(self._grid, self._emit)).with_outputs(DEAD, main="good")
        )


# --------------------------------------------------------------------------- tf.Transform


def example_tfxio(grid: contract.GridSpec):
    """TFXIO of the input records: its TensorAdapterConfig maps the decoded columns to tensors for TFT."""
    from tfx_bsl.public import tfxio

    return tfxio.TFExampleBeamRecord(
        physical_format="tfrecord", telemetry_descriptors=["tripletflow", "EmbeddingStats"],
        schema=contract.input_schema(grid))


class AnalyzeNorms(beam.PTransform):
    """Good record batches -> transform_fn: tf.Transform's analyze phase (full-pass statistics).

    Writes the transform graph (with the raw schema under `metadata/`) to `transform_graph_dir`.
    """

    def __init__(self, grid, *, normalize, center, norm_buckets, batch_size, temp_dir, transform_graph_dir):
        super().__init__()
        self._grid = grid
        self._fn = pp.make_preprocessing_fn(grid, normalize=normalize, center=center, norm_buckets=norm_buckets)
        self._batch_size = batch_size
        self._temp_dir = temp_dir
        self._transform_graph_dir = transform_graph_dir

    def expand(self, batches):
        import tensorflow_transform.beam as tft_beam
        from tensorflow_transform.tf_metadata import dataset_metadata

        io = example_tfxio(self._grid)
        with tft_beam.Context(temp_dir=self._temp_dir, desired_batch_size=self._batch_size):
            transform_fn = (batches, io.TensorAdapterConfig()) | "Analyze" >> tft_beam.AnalyzeDataset(self._fn)
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(self._transform_graph_dir)
            _ = (dataset_metadata.DatasetMetadata(contract.input_schema(self._grid))
                 | "WriteRawMetadata" >> tft_beam.WriteMetadata(
                     FileSystems.join(self._transform_graph_dir, "metadata"), batches.pipeline))
        return transform_fn


class TransformNorms(beam.PTransform):
    """Good record batches -> transformed record batches (tf.Transform's transform phase).

    `transform_fn` is AnalyzeNorms' output: (saved model dir PCollection, metadata).
    """

    def __init__(self, grid, transform_fn, *, batch_size, temp_dir):
        super().__init__()
        self._grid = grid
        self._transform_fn = transform_fn
        self._batch_size = batch_size
        self._temp_dir = temp_dir

    def expand(self, batches):
        import tensorflow_transform.beam as tft_beam

        transform_fn = self._transform_fn
        io = example_tfxio(self._grid)
        with tft_beam.Context(temp_dir=self._temp_dir, desired_batch_size=self._batch_size):
            transformed, _ = (((batches, io.TensorAdapterConfig()), transform_fn)
                              | "Transform" >> tft_beam.TransformDataset(output_record_batches=True))
        return transformed | "DropPassthrough" >> beam.Map(lambda item: item[0])


# --------------------------------------------------------------------------- pair statistics

VECTORS = "vectors"
EXAMPLES = "examples"
PARTIAL = "partial"
LABEL_SET = "labels"
NORMS = "norms"
FED_MAX = "fed_max_norm"  # the dataset's largest fed-vector norm (a constant of the transform graph)


def _column(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A transformed column as a flat numpy array (list columns flattened)."""
    column = batch.column(batch.schema.get_field_index(name))
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False)


def padded_set_size(valid_boxes: int) -> int:
    """Boxes of the padded set an example is computed in: depends on that example alone.

    Next power of two up to SET_SIZE_STEP, then the next multiple of SET_SIZE_STEP, so an
    example's floating-point reductions never depend on which examples share its batch
    (identical results on every runner), with little padding (1690 boxes -> 1728).
    """
    count = max(1, int(valid_boxes))
    if count <= SET_SIZE_STEP:
        return 1 << (count - 1).bit_length()
    return -(-count // SET_SIZE_STEP) * SET_SIZE_STEP


def _compact(embeddings, labels, m):
    """Moves each example's valid boxes first into a padded set of `m` boxes (m >= valid boxes).

    [n, boxes, dim], [n, boxes] -> [n, m, dim], [n, m]; padding has label -1 and zero vectors.
    The loss graph is O(m^2): sparse grids get far cheaper than the full grid.
    """
    valid = labels >= 0
    counts = valid.sum(axis=1)
    order = np.argsort(~valid, axis=1, kind="stable")[:, :m]
    compact_labels = np.take_along_axis(labels, order, axis=1)
    compact = np.take_along_axis(embeddings, order[:, :, None], axis=1)
    padding = np.arange(order.shape[1])[None, :] >= counts[:, None]
    compact_labels[padding] = contract.EMPTY_LABEL
    compact[padding] = 0.0
    if order.shape[1] < m:  # the set is larger than the grid: pad further
        extra = m - order.shape[1]
        compact = np.pad(compact, [(0, 0), (0, extra), (0, 0)])
        compact_labels = np.pad(compact_labels, [(0, 0), (0, extra)], constant_values=contract.EMPTY_LABEL)
    return compact, compact_labels


def histogram_range(distance: str, normalize: bool, fed_max_norm: float) -> float:
    """Upper edge of the fixed distance bins: the largest distance two fed vectors can have."""
    bound = triplet_loss.max_distance(distance, normalize)
    if not np.isfinite(bound):
        diameter = 2.0 * float(fed_max_norm)
        bound = diameter if distance == "euclidean" else diameter * diameter
        bound = min(bound, triplet_loss.DISTANCE_CAP)
    return bound if bound > 0 else 1.0


def histogram_edges(distance: str, normalize: bool, fed_max_norm: float, bins: int) -> np.ndarray:
    return np.linspace(0.0, histogram_range(distance, normalize, fed_max_norm), bins + 1)


FAULT_ENV = "TRIPLETFLOW_TEST_KILL_WORKER_ONCE"  # test-only: path of a marker file; unset in production
KILLED_WORKER_EXIT_CODE = 17


def _maybe_kill_worker_once():
    """Test-only fault (issue #7): the first worker to get here creates the marker and dies (os._exit)."""
    marker = os.environ.get(FAULT_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(KILLED_WORKER_EXIT_CODE)


class _PairStatisticsFn(beam.DoFn):
    """Transformed record batch -> VECTORS table, EXAMPLES table, PARTIAL summary, LABEL_SET, NORMS.

    One compiled TF call per batch (built once per worker in setup) computes the loss graph's
    statistics and the per-batch histograms of positive/negative pair distances.
    """

    def __init__(self, grid, *, margin, distance, normalize, bins):
        self._grid = grid
        self._margin = margin
        self._distance = distance
        self._normalize = normalize
        self._bins = bins

    def setup(self):
        import tensorflow as tf

        margin, distance, normalize, bins = self._margin, self._distance, self._normalize, self._bins

        @tf.function(input_signature=[
            tf.TensorSpec([None, None, self._grid.dim], tf.float32),
            tf.TensorSpec([None, None], tf.int64),
            tf.TensorSpec([], tf.float32)], autograph=False)  # plain TF ops: no AutoGraph conversion (start-up)
        def statistics(embeddings, labels, upper_edge):
            stats = triplet_loss.triplet_statistics(
                embeddings, labels, margin=margin, distance=distance, normalize=normalize)
            dist = triplet_loss.pairwise_distances(embeddings, distance, normalize)  # [n, m, m]
            valid = labels >= 0
            m = tf.shape(labels)[1]
            upper = tf.range(m)[:, None] < tf.range(m)[None, :]
            both = tf.logical_and(tf.logical_and(valid[:, :, None], valid[:, None, :]), upper[None])
            same = tf.equal(labels[:, :, None], labels[:, None, :])
            index = tf.cast(tf.floor(dist / upper_edge * bins), tf.int32)
            index = tf.clip_by_value(index, 0, bins - 1)  # the last bin also holds values above its edge
            pos = tf.math.bincount(tf.boolean_mask(index, tf.logical_and(both, same)),
                                   minlength=bins, maxlength=bins, dtype=tf.int64)
            neg = tf.math.bincount(tf.boolean_mask(index, tf.logical_and(both, tf.logical_not(same))),
                                   minlength=bins, maxlength=bins, dtype=tf.int64)
            return stats, pos, neg

        self._statistics = statistics
        self._tf = tf
        self._examples_counter = Metrics.counter(METRICS_NAMESPACE, "examples")
        self._empty_counter = Metrics.counter(METRICS_NAMESPACE, "empty_examples")
        self._boxes_counter = Metrics.counter(METRICS_NAMESPACE, "valid_boxes")
        self._done = 0
        self._started = time.monotonic()

    def process(self, batch: pa.RecordBatch):
        _maybe_kill_worker_once()
        grid = self._grid
        n = batch.num_rows
        if n == 0:
            return
        ids = [value.decode("utf-8") for value in _column(batch, pp.OUT_EXAMPLE_ID)]
        labels = _column(batch, pp.OUT_LABELS).astype(np.int64).reshape(n, grid.boxes)
        fed = _column(batch, pp.OUT_EMBEDDING).astype(np.float32, copy=False).reshape(n, grid.boxes, grid.dim)
        fed_max_norm = float(_column(batch, pp.OUT_FED_MAX_NORM)[0])
        upper_edge = histogram_range(self._distance, self._normalize, fed_max_norm)

        stats, pos_hist, neg_hist = self._loss_graph(fed, labels, upper_edge)

        yield beam.pvalue.TaggedOutput(EXAMPLES, self._examples_table(ids, stats))
        valid = labels >= 0
        yield beam.pvalue.TaggedOutput(VECTORS, self._vectors_table(batch, ids, labels, fed, valid))
        l2 = _column(batch, pp.OUT_L2).reshape(n, grid.boxes)[valid].astype(np.float64)
        yield beam.pvalue.TaggedOutput(NORMS, l2.tolist())
        yield beam.pvalue.TaggedOutput(LABEL_SET, np.unique(labels[valid]).tolist())
        yield beam.pvalue.TaggedOutput(FED_MAX, fed_max_norm)
        yield beam.pvalue.TaggedOutput(PARTIAL, _partial_summary(stats, l2, pos_hist, neg_hist))

        empty = int((stats["n_boxes"] == 0).sum())
        self._examples_counter.inc(n)
        self._empty_counter.inc(empty)
        self._boxes_counter.inc(int(valid.sum()))
        before, self._done = self._done, self._done + n
        if before // PROGRESS_EVERY_EXAMPLES != self._done // PROGRESS_EVERY_EXAMPLES:
            rate = self._done / max(time.monotonic() - self._started, 1e-9)
            print(f"EmbeddingStats: {self._done} examples done on this worker ({rate:.1f} examples/s)",
                  file=sys.stderr, flush=True)

    def _loss_graph(self, fed, labels, upper_edge):
        """Statistics [n] per name and pos/neg histograms [bins] of one batch, in calls of bounded size.

        Examples are grouped by their padded set size (`padded_set_size`, valid boxes first), one
        compiled call per group, cut into chunks of at most MAX_PAIR_CELLS_PER_CALL pair cells
        (chunk * m * m) so the graph's O(boxes^2) intermediates stay bounded whatever --batch-size is.
        """
        sizes = np.array([padded_set_size(c) for c in (labels >= 0).sum(axis=1)])
        stats, pos_hist, neg_hist = None, 0, 0
        for m in np.unique(sizes):
            members = np.flatnonzero(sizes == m)
            compact, compact_labels = _compact(fed[members], labels[members], int(m))
            chunk = max(1, MAX_PAIR_CELLS_PER_CALL // int(m * m))
            for first in range(0, len(members), chunk):
                part, pos, neg = self._statistics(
                    compact[first:first + chunk], compact_labels[first:first + chunk], np.float32(upper_edge))
                if stats is None:
                    stats = {name: np.zeros(len(labels), value.dtype.as_numpy_dtype) for name, value in part.items()}
                for name, value in part.items():
                    stats[name][members[first:first + chunk]] = value.numpy()
                pos_hist = pos_hist + pos.numpy()
                neg_hist = neg_hist + neg.numpy()
        return stats, pos_hist, neg_hist

    @staticmethod
    def _examples_table(ids, stats) -> pa.Table:
        arrays = [pa.array(ids, pa.string())]
        for name in contract.EXAMPLE_STATISTIC_COLUMNS:
            values = stats[name]
            if name in contract.EXAMPLE_COUNT_COLUMNS:
                arrays.append(pa.array(values.astype(np.int64), pa.int64()))
            else:
                undefined = stats[contract.NULL_WHEN_ZERO[name]] == 0 if name in contract.NULL_WHEN_ZERO else None
                arrays.append(pa.array(values.astype(np.float32), pa.float32(), mask=undefined))
        return pa.Table.from_arrays(arrays, schema=contract.EXAMPLES_SCHEMA)

    def _vectors_table(self, batch, ids, labels, fed, valid) -> pa.Table:
        grid = self._grid
        n = len(ids)
        example_index, box = np.nonzero(valid)
        level, row, col, anchor = grid.box_position(box)
        embedding = fed[example_index, box].reshape(-1)
        offsets = pa.array(np.arange(len(box) + 1, dtype=np.int32) * grid.dim, pa.int32())

        def per_box(name, dtype):
            return pa.array(_column(batch, name).reshape(n, grid.boxes)[valid].astype(dtype), pa.from_numpy_dtype(dtype))

        arrays = [
            pa.array(np.asarray(ids, dtype=object)[example_index], pa.string()),
            pa.array(level.astype(np.int32)), pa.array(row.astype(np.int32)),
            pa.array(col.astype(np.int32)), pa.array(anchor.astype(np.int32)),
            pa.array(labels[valid].astype(np.int64)),
            per_box(pp.OUT_L2, np.float32), per_box(pp.OUT_L1, np.float32), per_box(pp.OUT_MAX_ABS, np.float32),
            per_box(pp.OUT_L2_Z, np.float32), per_box(pp.OUT_BUCKET, np.int64),
            pa.ListArray.from_arrays(offsets, pa.array(embedding, pa.float32())),
        ]
        return pa.Table.from_arrays(arrays, schema=contract.VECTORS_SCHEMA)


def _partial_summary(stats, l2, pos_hist, neg_hist) -> dict:
    """Bounded per-batch accumulator of the dataset summary (merged by SummaryCombineFn)."""
    has_triplet = stats["n_triplets"] > 0
    count = len(l2)
    mean = float(l2.mean()) if count else 0.0
    return {
        "examples": len(stats["n_boxes"]),
        "empty_examples": int((stats["n_boxes"] == 0).sum()),
        "valid_boxes": int(stats["n_boxes"].sum()),
        "pos_pairs": int(stats["n_pos_pairs"].sum()),
        "neg_pairs": int(stats["n_neg_pairs"].sum()),
        "triplets": int(stats["n_triplets"].sum()),
        "active_triplets": int(stats["n_active_triplets"].sum()),
        "examples_with_triplets": int(has_triplet.sum()),
        "loss_sums": {name: float(stats[name][has_triplet].astype(np.float64).sum())
                      for name in ("batch_all_loss", "batch_hard_loss", "semi_hard_loss")},
        # L2 norms of valid boxes: count, mean, sum of squared deviations (Chan et al. merge), extremes.
        "norm": {"count": count, "mean": mean, "m2": float(((l2 - mean) ** 2).sum()),
                 "min": float(l2.min()) if count else None, "max": float(l2.max()) if count else None},
        "positive": pos_hist.astype(np.int64),
        "negative": neg_hist.astype(np.int64),
    }


def _merge_norm(a, b):
    if a["count"] == 0:
        return dict(b)
    if b["count"] == 0:
        return dict(a)
    count = a["count"] + b["count"]
    delta = b["mean"] - a["mean"]
    return {
        "count": count,
        "mean": a["mean"] + delta * b["count"] / count,
        "m2": a["m2"] + b["m2"] + delta * delta * a["count"] * b["count"] / count,
        "min": min(a["min"], b["min"]),
        "max": max(a["max"], b["max"]),
    }


class SummaryCombineFn(beam.CombineFn):
    """Merges per-batch partial summaries; memory is O(histogram bins), whatever the data size."""

    def __init__(self, bins: int):
        self._bins = bins

    def create_accumulator(self):
        return _partial_summary(
            {name: np.zeros(0, np.int64) for name in ("n_boxes", "n_pos_pairs", "n_neg_pairs", "n_triplets",
                                                       "n_active_triplets")}
            | {name: np.zeros(0, np.float32) for name in ("batch_all_loss", "batch_hard_loss", "semi_hard_loss")},
            np.zeros(0), np.zeros(self._bins, np.int64), np.zeros(self._bins, np.int64))

    def add_input(self, accumulator, partial):
        return self.merge_accumulators([accumulator, partial])

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        merged = accumulators[0]
        for other in accumulators[1:]:
            merged = {
                **{key: merged[key] + other[key] for key in (
                    "examples", "empty_examples", "valid_boxes", "pos_pairs", "neg_pairs", "triplets",
                    "active_triplets", "examples_with_triplets", "positive", "negative")},
                "loss_sums": {k: merged["loss_sums"][k] + other["loss_sums"][k] for k in merged["loss_sums"]},
                "norm": _merge_norm(merged["norm"], other["norm"]),
            }
        return merged

    def extract_output(self, accumulator):
        return accumulator


def _norm_summary(norm, quantiles):
    count = norm["count"]
    if count == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None, "quantiles": {}}
    quantiles = list(quantiles or [])
    points = {}
    if len(quantiles) == QUANTILE_POINTS:
        points = {f"p{q:02d}": float(quantiles[q]) for q in range(1, QUANTILE_POINTS - 1)}
    return {"count": count, "mean": norm["mean"], "std": float(np.sqrt(max(norm["m2"] / count, 0.0))),
            "min": norm["min"], "max": norm["max"], "quantiles": points}


def assemble_summary(_, partial, rejected_by_reason, identities, quantiles, edges) -> dict:
    """summary.json (keys: contract.SUMMARY_KEYS) from the merged accumulators."""
    rejected = {reason: int(rejected_by_reason.get(reason, 0)) for reason in contract.Reason.ALL}
    with_triplets = partial["examples_with_triplets"]
    auc, auc_bound = triplet_loss.roc_auc_from_histograms(partial["positive"], partial["negative"])
    summary = {
        "records_read": partial["examples"] + sum(rejected.values()),
        "records_good": partial["examples"],
        "records_rejected": sum(rejected.values()),
        "rejected_by_reason": rejected,
        "examples": partial["examples"],
        "empty_examples": partial["empty_examples"],
        "valid_boxes": partial["valid_boxes"],
        "identities": int(identities),
        "pos_pairs": partial["pos_pairs"],
        "neg_pairs": partial["neg_pairs"],
        "triplets": partial["triplets"],
        "active_triplets": partial["active_triplets"],
        "active_triplet_fraction": partial["active_triplets"] / partial["triplets"] if partial["triplets"] else None,
        "mean_batch_all_loss": partial["loss_sums"]["batch_all_loss"] / with_triplets if with_triplets else None,
        "mean_batch_hard_loss": partial["loss_sums"]["batch_hard_loss"] / with_triplets if with_triplets else None,
        "mean_semi_hard_loss": partial["loss_sums"]["semi_hard_loss"] / with_triplets if with_triplets else None,
        "l2_norm": _norm_summary(partial["norm"], quantiles),
        "histogram": {
            "distance": edges["distance"],
            "bin_edges": [float(e) for e in edges["edges"]],
            "positive": [int(c) for c in partial["positive"]],
            "negative": [int(c) for c in partial["negative"]],
        },
        "roc_auc": auc,
        "roc_auc_error_bound": auc_bound,
    }
    assert tuple(summary) == contract.SUMMARY_KEYS, "summary keys drifted from the contract"
    return summary


class PairStatistics(beam.PTransform):
    """Transformed record batches -> tagged VECTORS / EXAMPLES tables, PARTIAL summaries, LABEL_SET, NORMS."""

    def __init__(self, grid, *, margin, distance, normalize, bins):
        super().__init__()
        self._fn = _PairStatisticsFn(grid, margin=margin, distance=distance, normalize=normalize, bins=bins)

    def expand(self, batches):
        return batches | "LossGraph" >> beam.ParDo(self._fn).with_outputs(
            VECTORS, EXAMPLES, PARTIAL, LABEL_SET, NORMS, FED_MAX)


class Summarize(beam.PTransform):
    """{PARTIAL, LABEL_SET, NORMS, FED_MAX, DEAD: PCollection} -> one summary dict, bounded memory throughout."""

    def __init__(self, *, distance, normalize, bins):
        super().__init__()
        self._distance = distance
        self._normalize = normalize
        self._bins = bins

    def expand(self, inputs):
        stats, dead = inputs, inputs[DEAD]
        p = dead.pipeline
        partial = stats[PARTIAL] | "MergePartials" >> beam.CombineGlobally(SummaryCombineFn(self._bins))
        by_reason = (dead | "Reason" >> beam.Map(lambda row: row["reason"])
                     | "CountReasons" >> beam.combiners.Count.PerElement()
                     | "ReasonDict" >> beam.combiners.ToDict())
        identities = (stats[LABEL_SET] | "Labels" >> beam.FlatMap(lambda labels: labels)
                      | "DistinctLabels" >> beam.Distinct() | "CountLabels" >> beam.combiners.Count.Globally())
        quantiles = stats[NORMS] | "NormQuantiles" >> beam.ApproximateQuantiles.Globally(
            QUANTILE_POINTS, input_batched=True)
        return (
            p | "One" >> beam.Create([None])
            | "Assemble" >> beam.Map(
                assemble_summary,
                partial=beam.pvalue.AsSingleton(partial),
                rejected_by_reason=beam.pvalue.AsSingleton(by_reason),
                identities=beam.pvalue.AsSingleton(identities),
                quantiles=beam.pvalue.AsSingleton(quantiles),
                edges=beam.pvalue.AsSingleton(self._edges(stats)),
            )
        )

    def _edges(self, stats):
        distance, normalize, bins = self._distance, self._normalize, self._bins

        def edges(fed_max_norm):
            return {"distance": distance, "edges": histogram_edges(distance, normalize, fed_max_norm, bins).tolist()}

        return (stats[FED_MAX] | "FedMaxNorm" >> beam.CombineGlobally(lambda values: max(values, default=0.0))
                | "Edges" >> beam.Map(edges))


# --------------------------------------------------------------------------- write


def _rows_to_table(rows) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=contract.DEAD_LETTER_SCHEMA)


def _concat(tables) -> pa.Table:
    return pa.concat_tables(list(tables))


def _write_json(_, path, document):
    with FileSystems.create(path) as f:
        f.write(json.dumps(document, indent=2, sort_keys=False).encode("utf-8"))
    return path


class WriteTable(beam.PTransform):
    """pyarrow Tables -> Parquet files `<dir>/part-*.parquet` with the declared schema."""

    def __init__(self, directory: str, schema: pa.Schema, rebatch: bool):
        super().__init__()
        self._directory = directory
        self._schema = schema
        self._rebatch = rebatch

    def expand(self, tables):
        from apache_beam.io.parquetio import WriteToParquetBatched

        if self._rebatch:  # small tables -> row groups of a useful size
            tables = (tables | "Rebatch" >> beam.BatchElements(min_batch_size=1, max_batch_size=TABLE_BATCH_ROWS // 16)
                      | "Concat" >> beam.Map(_concat))
        return tables | "Parquet" >> WriteToParquetBatched(
            FileSystems.join(self._directory, "part"), schema=self._schema, codec=PARQUET_CODEC,
            file_name_suffix=PARQUET_SUFFIX)


class _WriteBundleTablesFn(beam.DoFn):
    """Tables -> one staged Parquet file per bundle (pyarrow writer on a Beam FileSystems stream).

    Emits the staged path at the end of the bundle. A retried bundle's file is never listed
    (the runner drops the failed attempt's outputs), so only committed files get published.
    """

    def __init__(self, staging_dir: str, schema: pa.Schema):
        self._staging_dir = staging_dir
        self._schema = schema

    def start_bundle(self):
        self._path = self._stream = self._writer = None

    def process(self, table: pa.Table):
        import pyarrow.parquet as pq
        import uuid

        if self._writer is None:
            self._path = FileSystems.join(self._staging_dir, f"{uuid.uuid4().hex}{PARQUET_SUFFIX}")
            self._stream = FileSystems.create(self._path)
            self._writer = pq.ParquetWriter(self._stream, self._schema, compression=PARQUET_CODEC)
        self._writer.write_table(table)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.timestamp import MIN_TIMESTAMP
        from apache_beam.utils.windowed_value import WindowedValue

        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            yield WindowedValue(self._path, MIN_TIMESTAMP, [GlobalWindow()])


def _commit_staged(paths, directory: str, staging_dir: str, schema: pa.Schema) -> int:
    """Renames the committed staged files to part-NNNNN-of-MMMMM.parquet; an empty table if none."""
    import pyarrow.parquet as pq

    paths = sorted(paths)
    if not paths:
        with FileSystems.create(FileSystems.join(directory, f"part-00000-of-00001{PARQUET_SUFFIX}")) as f:
            pq.write_table(schema.empty_table(), f, compression=PARQUET_CODEC)
        return 0
    FileSystems.rename(paths, [FileSystems.join(directory, f"part-{i:05d}-of-{len(paths):05d}{PARQUET_SUFFIX}")
                               for i in range(len(paths))])
    FileSystems.delete([staging_dir])
    return len(paths)


class WriteTableFused(beam.PTransform):
    """pyarrow Tables -> Parquet `<dir>/part-*.parquet`, written in the producing stage itself.

    For the big `vectors` table. Beam's Parquet sink (WriteToParquetBatched) takes a side input
    that keeps FnApiRunner from fusing its writer with the producer, so every table would be
    held in memory until the writer's stage runs (peak memory growing with the data, measured
    in bench/). Here each bundle streams its tables into one staged file; the committed files
    are renamed in place at the end (only their names cross a shuffle).
    """

    def __init__(self, directory: str, schema: pa.Schema):
        super().__init__()
        self._directory = directory
        self._schema = schema

    def expand(self, tables):
        staging = FileSystems.join(self._directory, ".staging")
        return (tables
                | "WriteBundles" >> beam.ParDo(_WriteBundleTablesFn(staging, self._schema))
                | "Staged" >> beam.combiners.ToList()
                | "Commit" >> beam.Map(_commit_staged, self._directory, staging, self._schema))


class WriteOutputs(beam.PTransform):
    """Writes vectors/, examples/, dead_letter/ Parquet and summary.json under `output_dir`."""

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, inputs):
        vectors, examples, dead, summary = inputs
        out = self._output_dir
        _ = vectors | "WriteVectors" >> WriteTableFused(FileSystems.join(out, contract.VECTORS_DIR), contract.VECTORS_SCHEMA)
        _ = examples | "WriteExamples" >> WriteTable(FileSystems.join(out, contract.EXAMPLES_DIR), contract.EXAMPLES_SCHEMA, True)
        dead_tables = (dead | "BatchDead" >> beam.BatchElements(min_batch_size=1, max_batch_size=TABLE_BATCH_ROWS)
                       | "DeadTable" >> beam.Map(_rows_to_table))
        _ = dead_tables | "WriteDeadLetter" >> WriteTable(
            FileSystems.join(out, contract.DEAD_LETTER_DIR), contract.DEAD_LETTER_SCHEMA, False)
        return summary | "WriteSummary" >> beam.Map(
            lambda document: _write_json(None, FileSystems.join(out, contract.SUMMARY_FILE), document))
