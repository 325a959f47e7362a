"""tf.Transform stages: AnalyzeNorms (full-pass analysis -> transform graph), TransformNorms (apply it).

The record batches from ValidateRecords reach tf.Transform through TFXIO's TensorAdapterConfig.
The analysis and the transform each get their own read of the input (as TFX's Transform does).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from components.embedding_stats import preprocessing as pp
from schemas import contract


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
