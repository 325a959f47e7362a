"""EmbeddingStats: TFRecord grids -> norms, normalized vectors, triplet statistics (Parquet).

spec.py (inputs, outputs, parameters), options.py (flags), executor.py (run, manifest, atomic
publish); one module per pipeline stage, in order: read.py -> validate.py -> norms.py
(tf.Transform, graph in preprocessing.py) -> statistics.py -> summary.py -> write.py; common.py
holds the names they share.

Memory stays bounded on every runner: big payloads (records, vectors) only flow through
fused ParDos; what crosses a shuffle or a side input is small (file names, the transform
graph, fixed-size summary accumulators). tf.Transform's analyze and transform phases
read the input separately (as TFX's Transform does), and the second read starts after the
analysis (gated on the transform graph), so no runner holds the dataset between passes.
"""
