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
  --no-normalize).

Dataset constants (DATASET_CONSTANTS), the analyzers' values that the pipeline's statistics
and summary need: each [rows] float32, the same value in every row. They are graph outputs so
that they can be read once from the written transform graph (norms.ReadDatasetConstants);
the data path drops them right after the transform (norms.TransformNorms).
  norm_mean, norm_std, norm_min, norm_max: of the raw L2 norms of valid boxes (std: population);
  fed_max_norm: the largest L2 norm of a valid `embedding`, so pair distances have a known
  range for fixed histogram bins (1 when the vectors are normalized).
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
OUT_NORM_MEAN = "norm_mean"
OUT_NORM_STD = "norm_std"
OUT_NORM_MIN = "norm_min"
OUT_NORM_MAX = "norm_max"
OUT_FED_MAX_NORM = "fed_max_norm"
DATASET_CONSTANTS = (OUT_NORM_MEAN, OUT_NORM_STD, OUT_NORM_MIN, OUT_NORM_MAX, OUT_FED_MAX_NORM)


def make_preprocessing_fn(*, normalize: bool = True, center: bool = False, norm_buckets: int = 10):
    """Returns the `preprocessing_fn(inputs) -> outputs` for the run's options."""

    def preprocessing_fn(inputs):
        embedding = tf.cast(inputs[contract.BOX_EMBEDDING], tf.float32)  # [rows, dim]
        label = tf.reshape(tf.cast(inputs[contract.BOX_LABEL], tf.int64), [-1])  # [rows]
        valid = label >= 0  # [rows]

        norms = triplet_loss.vector_norms(embedding)  # each [rows]
        valid_l2 = tf.boolean_mask(norms["l2"], valid)  # [valid rows]
        # float64 so that squares of huge (1e30-scale) norms do not overflow in the variance.
        mean = tft.mean(tf.cast(valid_l2, tf.float64))
        std = tf.sqrt(tft.var(tf.cast(valid_l2, tf.float64)))
        z = tf.math.divide_no_nan(tf.cast(norms["l2"], tf.float64) - mean, std)
        boundaries = tft.quantiles(valid_l2, norm_buckets, QUANTILE_EPSILON)
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

        outputs = {
            OUT_LABEL: label,
            OUT_L2: norms["l2"],
            OUT_L1: norms["l1"],
            OUT_MAX_ABS: norms["max_abs"],
            OUT_L2_Z: tf.cast(z, tf.float32),
            OUT_BUCKET: tf.cast(bucket, tf.int64),
            OUT_EMBEDDING: fed,
        }
        constants = {
            OUT_NORM_MEAN: mean,
            OUT_NORM_STD: std,
            OUT_NORM_MIN: tft.min(valid_l2),
            OUT_NORM_MAX: tft.max(valid_l2),
            OUT_FED_MAX_NORM: fed_max_norm,
        }
        # tf.Transform's outputs are batched and at most float32: the constants are [rows] copies.
        return outputs | {
            name: tf.fill(tf.shape(label), tf.cast(value, tf.float32)) for name, value in constants.items()
        }

    return preprocessing_fn
