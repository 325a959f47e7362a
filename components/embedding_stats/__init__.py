"""EmbeddingStats: TFRecord grids -> norms, normalized vectors, triplet statistics (Parquet).

options.py (the pipeline's parameters, a Beam `PipelineOptions`), executor.py (checks, builds,
submits); one module per pipeline stage, in order: read.py -> validate.py (with boxes.py: grids
-> one row per valid box) -> norms.py (tf.Transform, graph in preprocessing.py) -> cache.py ->
statistics.py -> summary.py -> write.py -> commit.py (MANIFEST.json, last); common.py holds what
they share. Inputs and outputs are declared once, in schemas/contract.py.

Memory stays bounded on every runner: big payloads (records, boxes, vectors) only flow through
fused ParDos; what crosses a shuffle or a side input is small (file names, the transform
graph, fixed-size summary accumulators). The input is read and decoded once: tf.Transform's
analysis takes the valid boxes straight from the read, and the same boxes, cached on disk
(cache.py), are replayed into the transform once the analysis is over.
"""
