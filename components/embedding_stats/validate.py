"""Validate stage: raw records -> box record batches of the good records, dead letters with a reason.

Decoded in batches into the Arrow record batches TFXIO's TFExampleRecord produces and checked
with numpy on the Arrow buffers, so each record is decoded once. A batch whose records
all have the grid's shape is parsed by `tf.io.parse_example` (C++ fast path, ~8x faster than
tfx-bsl's decoder on these records: bench/README_stats.md) into the same Arrow layout; any other
batch goes through tfx-bsl's Example decoder (the one inside TFXIO), which isolates bad records.
Good records leave as their valid boxes (boxes.py) in the same step: the decoded grids (every
box of every record) never become a PCollection that a runner would encode or sample.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from components.embedding_stats.boxes import to_box_batches
from components.embedding_stats.common import DEAD, METRICS_NAMESPACE, dead_letter
from schemas import contract

VALIDATE_MAX_BATCH = 64  # records decoded and validated together
# Largest L1 norm of a valid box (norm_overflow beyond): half float32's max. L1 >= L2 >= max-abs,
# so every norm of an accepted vector is finite in float32; so are the --center'ed vector
# (L1(x - mean) <= L1(x) + L1(mean) <= float32 max) and the distance of two vectors
# (<= L2(a) + L2(b)). One threshold whatever the flags: a record is good or bad for every run.
MAX_L1_NORM = float(np.finfo(np.float32).max) / 2


def norm_overflow_boxes(embeddings: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[boxes] bool: the valid boxes of embeddings [boxes, dim] (finite) whose L1 norm exceeds MAX_L1_NORM.

    L1 <= dim * max-abs: a record below that bound (every real one) skips the float64 sums.
    """
    peak = float(np.abs(embeddings[valid]).max(initial=0.0))
    if peak * embeddings.shape[1] <= MAX_L1_NORM:
        return np.zeros(len(valid), bool)
    return valid & (np.abs(embeddings.astype(np.float64)).sum(axis=1) > MAX_L1_NORM)


class _ValidateFn(beam.DoFn):
    """[(source_file, raw)] -> box record batches of the good records; DEAD: rows with their reason.

    Records decode into exactly the Arrow record batches TFXIO's TFExampleRecord produces
    (tfx-bsl's Example decoder with the input schema, or parse_example laid out the same);
    the good ones leave as their valid boxes (boxes.to_box_batches).
    """

    def __init__(self, grid: contract.GridSpec):
        self._grid = grid

    def setup(self):
        self._new_decoder()
        self._schema = self._decoder.ArrowSchema()  # the layout TFXIO / tf.Transform expect
        self._spec = self._fast_spec()
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._good = Metrics.counter(METRICS_NAMESPACE, "records_good")
        self._rejected = {r: Metrics.counter(METRICS_NAMESPACE, f"rejected_{r}") for r in contract.Reason.ALL}

    def _fast_spec(self):
        """tf.io.parse_example spec: every feature present with exactly the grid's length."""
        import tensorflow as tf

        grid = self._grid
        return {
            contract.EXAMPLE_ID: tf.io.FixedLenFeature([], tf.string),
            contract.EMBEDDINGS: tf.io.FixedLenFeature([grid.embeddings_length], tf.float32),
            contract.LABELS: tf.io.FixedLenFeature([grid.boxes], tf.int64),
        }

    def _fast_decode(self, raws):
        """Record batch of `raws` laid out as the tfx-bsl decoder's (same schema), or None.

        None when parse_example rejects the batch (a record unparseable, a feature missing, of the
        wrong kind or length): the caller then decodes it with tfx-bsl, record by record if needed.
        """
        import tensorflow as tf

        try:
            parsed = tf.io.parse_example(raws, self._spec)
        except Exception:  # noqa: BLE001 - OpError, or e.g. UnicodeDecodeError while TF formats the message
            return None  # of a garbled record: any failure goes to the tfx-bsl path, which classifies it
        n = len(raws)
        columns = {}
        for name, width in (
            (contract.EXAMPLE_ID, 1),
            (contract.EMBEDDINGS, self._grid.embeddings_length),
            (contract.LABELS, self._grid.boxes),
        ):
            values = parsed[name].numpy().reshape(-1)
            field = self._schema.field(name)
            offsets = pa.array(np.arange(n + 1, dtype=np.int64) * width, pa.int64())
            values = pa.array(values.tolist() if values.dtype == object else values, field.type.value_type)
            columns[name] = pa.LargeListArray.from_arrays(offsets, values)
        return pa.RecordBatch.from_arrays([columns[field.name] for field in self._schema], schema=self._schema)

    def _new_decoder(self):
        from tfx_bsl.coders import example_coder

        self._decoder = example_coder.ExamplesToRecordBatchDecoder(
            contract.input_schema(self._grid).SerializeToString()
        )

    def _decode(self, raws):
        """Decodes a batch; isolates undecodable records. Returns (record batch, kept indices, failures).

        tfx-bsl's decoder is left in a broken state by a failed decode, so a new one is made after each.
        """
        fast = self._fast_decode(raws)
        if fast is not None:
            return fast, list(range(len(raws))), {}
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
            return (
                contract.Reason.WRONG_LENGTH,
                f"lengths embeddings={n_emb} labels={n_lab} example_id={n_ids}, expected "
                f"{grid.embeddings_length}, {grid.boxes}, 1 for {shape}",
                example_id,
            )
        if example_id is None:
            return contract.Reason.BAD_EXAMPLE_ID, "example_id is empty or not UTF-8", None
        labels = lab_values[lab_offsets[row] : lab_offsets[row + 1]]
        if labels.min(initial=0) < contract.EMPTY_LABEL:
            box = int(np.argmax(labels < contract.EMPTY_LABEL))
            return (
                contract.Reason.BAD_LABEL,
                f"label {int(labels[box])} below {contract.EMPTY_LABEL} at box {box} "
                f"(level,row,col,anchor)={grid.box_position(box)}",
                example_id,
            )
        embeddings = emb_values[emb_offsets[row] : emb_offsets[row + 1]].reshape(grid.boxes, grid.dim)
        bad_boxes = ~np.isfinite(embeddings).all(axis=1) & (labels >= 0)
        if bad_boxes.any():
            box = int(np.argmax(bad_boxes))
            return (
                contract.Reason.NON_FINITE,
                f"{int(bad_boxes.sum())} valid box(es) hold NaN/Inf, first at box {box} "
                f"(level,row,col,anchor)={grid.box_position(box)}",
                example_id,
            )
        overflow = norm_overflow_boxes(embeddings, labels >= 0)
        if overflow.any():
            box = int(np.argmax(overflow))
            l1 = float(np.abs(embeddings[box].astype(np.float64)).sum())
            return (
                contract.Reason.NORM_OVERFLOW,
                f"{int(overflow.sum())} valid box(es) have an L1 norm above {MAX_L1_NORM:.4g} (half float32's "
                f"max: their norms or distances could overflow), first at box {box} "
                f"(level,row,col,anchor)={grid.box_position(box)} with L1 {l1:.4g}",
                example_id,
            )
        return None, None, example_id

    def process(self, batch):
        raws = [raw for _, raw in batch]
        decoded, kept, failures = self._decode(raws)
        rejected = {}
        for i, (reason, detail) in failures.items():
            rejected[i] = (reason, detail, None)
        if decoded is not None:
            import pyarrow.compute as pc

            columns = {
                name: decoded.column(name) for name in (contract.EXAMPLE_ID, contract.EMBEDDINGS, contract.LABELS)
            }
            nulls = {name: np.asarray(pc.is_null(col)) for name, col in columns.items()}
            emb, lab = columns[contract.EMBEDDINGS], columns[contract.LABELS]
            emb_offsets, lab_offsets = np.asarray(emb.offsets), np.asarray(lab.offsets)
            emb_values = emb.values.to_numpy(zero_copy_only=False)
            lab_values = lab.values.to_numpy(zero_copy_only=False)
            for row, i in enumerate(kept):
                reason, detail, example_id = self._check(
                    columns[contract.EXAMPLE_ID], emb_offsets, emb_values, lab_offsets, lab_values, nulls, row
                )
                if reason is not None:
                    rejected[i] = (reason, detail, example_id)
        for i, (source_file, raw) in enumerate(batch):
            if i in rejected:
                reason, detail, example_id = rejected[i]
                self._rejected[reason].inc()
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(source_file, reason, detail, example_id, raw))
        good_rows = [row for row, i in enumerate(kept) if i not in rejected]
        if good_rows:
            good = decoded if len(good_rows) == decoded.num_rows else decoded.take(pa.array(good_rows))
            yield from to_box_batches(good, self._grid)
        self._read.inc(len(batch))
        self._good.inc(len(batch) - len(rejected))


class ValidateRecords(beam.PTransform):
    """(source_file, raw) -> tagged outputs: main box record batches of good records, DEAD rejected rows."""

    def __init__(self, grid: contract.GridSpec):
        super().__init__()
        self._grid = grid

    def expand(self, records):
        return (
            records
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=VALIDATE_MAX_BATCH)
            | "Validate" >> beam.ParDo(_ValidateFn(self._grid)).with_outputs(DEAD, main="good")
        )
