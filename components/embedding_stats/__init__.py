"""EmbeddingStats: TFRecord grids -> norms, normalized vectors, triplet statistics (Parquet).

spec.py (inputs, outputs, parameters), options.py (flags), preprocessing.py (tf.Transform),
transforms.py (composite PTransforms), executor.py (run, manifest, atomic publish).
"""
