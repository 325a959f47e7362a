"""The tf.Transform `preprocessing_fn` of EmbeddingStats: norms, normalized vectors, dataset statistics.

Written into `transform_graph/` so that the trainer and serving apply exactly this
preprocessing. It works per box (raw input: schemas/box_schema.pbtxt): EmbeddingStats feeds
it the valid boxes of every example, so its cost follows the boxes that hold an object, not
the grid. Full-pass statistics (analyzers) are taken over rows with label >= 0 only (an
example without valid boxes contributes one placeholder row labelled -1).

Outputs, each per box row (`rows` = boxes fed):
  label [rows] int64; l2_norm, l1_norm, max_abs, l2_norm_z [rows] float32 (raw-embedding
  units; z is (l2 - mean) / std, 0 where std is 0); l2_norm_bucket [rows] int64;
  embedding [rows, dim] float32 (centered with --center, then L2-normalized unless
  --no-normalize); fed_max_norm [rows] float32 (largest L2 norm of a valid `embedding` over
  the dataset, so pair distances have a known range for fixed histogram bins; 1 when the
  vectors are normalized).
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_transform as tft

from components import triplet_loss
from schemas import contract

# Relative accuracy of the quantile sketch behind l2_norm_bucket (TFT's default is 0.01).
QUANTILE_EPSILON = 0.001

# Outputs named as the VECTORS columns they become.
OUT_LABEL = contract.COL_LABEL
OUT_L2 = contract.COL_L2_NORM
OUT_L1 = contract.COL_L1_NORM
OUT_MAX_ABS = contract.COL_MAX_ABS
OUT_L2_Z = contract.COL_L2_NORM_Z
OUT_BUCKET = contract.COL_L2_NORM_BUCKET
OUT_EMBEDDING = contract.COL_EMBEDDING
OUT_FED_MAX_NORM = "fed_max_norm"  # a constant of the graph, not a column


def make_preprocessing_fn(*, normalize: bool = True, center: bool = False, norm_buckets: int = 10):
    """Returns the `preprocessing_fn(inputs) -> outputs` for the run's options."""

    def preprocessing_fn(inputs):
        embedding = tf.cast(inputs[contract.BOX_EMBEDDING], tf.float32)  # [rows, dim]
        label = tf.reshape(tf.cast(inputs[contract.BOX_LABEL], tf.int64), [-1])  # [rows]
        valid = label >= 0  # [rows]

        norms = triplet_loss.vector_norms(embedding)  # each [rows]
        # float64 so that squares of huge (1e30-scale) norms do not overflow in the variance.
        valid_l2 = tf.cast(tf.boolean_mask(norms["l2"], valid), tf.float64)  # [valid rows]
        mean = tft.mean(valid_l2)
        std = tf.sqrt(tft.var(valid_l2))
        z = tf.math.divide_no_nan(tf.cast(norms["l2"], tf.float64) - mean, std)
        boundaries = tft.quantiles(tf.boolean_mask(norms["l2"], valid), norm_buckets, QUANTILE_EPSILON)
        bucket = tft.apply_buckets(norms["l2"], boundaries)

        fed = embedding
        if center:
            valid_vectors = tf.cast(tf.boolean_mask(embedding, valid), tf.float64)  # [valid rows, dim]
            mean_vector = tft.mean(valid_vectors, reduce_instance_dims=False)  # [dim]
            fed = tf.cast(tf.cast(embedding, tf.float64) - mean_vector, tf.float32)
        if normalize:
            fed = triplet_loss.l2_normalize(fed)
            # Unit (or zero) vectors: the distance range is known without a pass over the data.
            fed_max_norm = tf.constant(1.0)
        else:
            fed_norms = tf.boolean_mask(triplet_loss.vector_norms(fed)["l2"], valid)
            # max over an empty dataset is -inf/lowest: floor it at 0.
            fed_max_norm = tf.maximum(tft.max(fed_norms), 0.0)

        return {
            OUT_LABEL: label,
            OUT_L2: norms["l2"],
            OUT_L1: norms["l1"],
            OUT_MAX_ABS: norms["max_abs"],
            OUT_L2_Z: tf.cast(z, tf.float32),
            OUT_BUCKET: tf.cast(bucket, tf.int64),
            OUT_EMBEDDING: fed,
            OUT_FED_MAX_NORM: tf.fill(tf.shape(label), fed_max_norm),
        }

    return preprocessing_fn
