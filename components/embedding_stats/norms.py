"""tf.Transform stages: AnalyzeNorms (full-pass analysis -> transform graph), TransformNorms (apply it),
ReadDatasetConstants (the analyzers' values, read once from the written graph).

Both consume box record batches (contract.BOX_ARROW_SCHEMA) through a TFXIO TensorAdapterConfig
of the box schema; the example id, box index and set index ride along as tf.Transform
passthrough columns, so the transform graph's raw input is one box (what serving feeds).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from components.embedding_stats import preprocessing as pp
from schemas import contract


def box_tensor_adapter_config(grid: contract.GridSpec):
    """How tf.Transform turns box record batches into tensors: the box schema's dense features."""
    from tfx_bsl.tfxio import tensor_adapter, tensor_representation_util

    representations = tensor_representation_util.InferTensorRepresentationsFromSchema(contract.box_schema(grid))
    return tensor_adapter.TensorAdapterConfig(contract.BOX_ARROW_SCHEMA, representations)


class AnalyzeNorms(beam.PTransform):
    """Box record batches -> transform_fn: tf.Transform's analyze phase (full-pass statistics)."""

    def __init__(self, grid, *, normalize, center, norm_buckets, batch_size, temp_dir):
        super().__init__()
        self._grid = grid
        self._fn = pp.make_preprocessing_fn(normalize=normalize, center=center, norm_buckets=norm_buckets)
        self._batch_size = batch_size
        self._temp_dir = temp_dir

    def expand(self, batches):
        import tensorflow_transform.beam as tft_beam

        config = box_tensor_adapter_config(self._grid)
        with tft_beam.Context(temp_dir=self._temp_dir, desired_batch_size=self._batch_size):
            return (batches, config) | "Analyze" >> tft_beam.AnalyzeDataset(self._fn)


class WriteTransformGraph(beam.PTransform):
    """pipeline -> the transform graph `transform_fn` under `directory`, the raw box schema under `metadata/`.

    Applied to the pipeline (tf.Transform's transform_fn is not a plain PValue); returns a
    PCollection that is complete once every file is written (for the commit's barrier).
    """

    def __init__(self, grid, transform_fn, directory: str):
        super().__init__()
        self._grid = grid
        self._transform_fn = transform_fn
        self._directory = directory

    def expand(self, pbegin):
        import tensorflow_transform.beam as tft_beam
        from tensorflow_transform.tf_metadata import dataset_metadata

        graph = self._transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(self._directory)
        raw_metadata = dataset_metadata.DatasetMetadata(
            contract.box_schema(self._grid)
        ) | "WriteRawMetadata" >> tft_beam.WriteMetadata(FileSystems.join(self._directory, "metadata"), pbegin.pipeline)
        return (graph, raw_metadata) | "Written" >> beam.Flatten()


class TransformNorms(beam.PTransform):
    """Box record batches -> transformed box record batches (tf.Transform's transform phase).

    `transform_fn` is AnalyzeNorms' output: (saved model dir PCollection, metadata). Each output
    batch holds the preprocessing outputs and the passthrough columns of one input batch.
    """

    def __init__(self, grid, transform_fn, *, batch_size, temp_dir):
        super().__init__()
        self._grid = grid
        self._transform_fn = transform_fn
        self._batch_size = batch_size
        self._temp_dir = temp_dir

    def expand(self, batches):
        import tensorflow_transform.beam as tft_beam

        config = box_tensor_adapter_config(self._grid)
        with tft_beam.Context(
            temp_dir=self._temp_dir, desired_batch_size=self._batch_size, passthrough_keys=set(contract.BOX_PASSTHROUGH)
        ):
            transformed, _ = ((batches, config), self._transform_fn) | "Transform" >> tft_beam.TransformDataset(
                output_record_batches=True
            )
        # The dataset constants are read once (ReadDatasetConstants), not carried per row.
        return transformed | "DropConstants" >> beam.Map(lambda item: item[0].drop_columns(list(pp.DATASET_CONSTANTS)))


def read_dataset_constants(graph_dir: str) -> dict:
    """{name in preprocessing.DATASET_CONSTANTS: float} of the transform graph written to `graph_dir`.

    The constants are the same for every input, so the graph is run once on one all-zero box.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    graph = tft.TFTransformOutput(graph_dir)
    probe = {name: tf.zeros([1, *spec.shape], spec.dtype) for name, spec in graph.raw_feature_spec().items()}
    outputs = graph.transform_raw_features(probe)
    return {name: float(outputs[name].numpy()[0]) for name in pp.DATASET_CONSTANTS}


class ReadDatasetConstants(beam.PTransform):
    """WriteTransformGraph's output (its barrier) -> one dict of the dataset constants, for side inputs."""

    def __init__(self, graph_dir: str):
        super().__init__()
        self._graph_dir = graph_dir

    def expand(self, graph_written):
        return (
            graph_written.pipeline
            | "GraphDir" >> beam.Create([self._graph_dir])
            | "Read"
            >> beam.Map(
                lambda graph_dir, _written: read_dataset_constants(graph_dir), beam.pvalue.AsIter(graph_written)
            )
        )
