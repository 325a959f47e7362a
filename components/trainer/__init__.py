"""Trainer: trains a projection head on EmbeddingStats outputs with the shared triplet loss graph.

spec.py (inputs, outputs, parameters) -> data.py (vectors Parquet -> padded tf.data sets)
-> model.py (head, loss, serving module) -> executor.py (training loop, checkpoints, export)
-> metrics.py (validation figures). Entry point: `tripletflow train` (pipelines/train.py).
"""
