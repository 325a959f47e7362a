"""Projection head, training loss and serving module of the Trainer.

The head is a plain `tf.Module` (variables + matmuls; strategy- and checkpoint-friendly, no
Keras version coupling): optional hidden ReLU layers, then one linear layer to `output_dim`,
then L2 normalization. Its loss is `components.triplet_loss.triplet_loss`, imported: the
same graph that computes EmbeddingStats' per-example statistics.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from components import triplet_loss
from schemas import contract

# Glorot-uniform initialisation: U(-limit, limit), limit = sqrt(GLOROT_SCALE / (fan_in + fan_out)).
GLOROT_SCALE = 6.0
SERVING_LABEL = 0  # label fed with every box at serving (an input of the transform graph; only its analyzers use it)


class ProjectionHead(tf.Module):
    """[..., input_dim] -> L2-normalized [..., output_dim] float32.

    `identity=True` has no variables and only normalizes (the raw-vector baseline).
    `compute_dtype=tf.float16` runs the matmuls in half precision on float32 master weights.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int | None = None,
        hidden: Sequence[int] = (),
        seed: int = 0,
        identity: bool = False,
        compute_dtype=tf.float32,
        name: str = "projection_head",
    ):
        super().__init__(name=name)
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim or input_dim)
        self.identity = bool(identity)
        self.compute_dtype = tf.as_dtype(compute_dtype)
        if self.identity and (hidden or self.output_dim != self.input_dim):
            raise ValueError("an identity head has no hidden layers and output_dim == input_dim")
        widths = [self.input_dim, *map(int, hidden), self.output_dim]
        self.kernels, self.biases = [], []
        if not self.identity:
            with self.name_scope:
                for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
                    limit = math.sqrt(GLOROT_SCALE / (fan_in + fan_out))
                    init = tf.random.stateless_uniform(
                        [fan_in, fan_out], seed=[seed, index], minval=-limit, maxval=limit
                    )
                    self.kernels.append(tf.Variable(init, name=f"kernel_{index}"))
                    self.biases.append(tf.Variable(tf.zeros([fan_out]), name=f"bias_{index}"))

    def __call__(self, x):
        x = tf.convert_to_tensor(x, tf.float32)
        if self.identity:
            return triplet_loss.l2_normalize(x)
        shape = tf.shape(x)
        h = tf.cast(tf.reshape(x, [-1, self.input_dim]), self.compute_dtype)
        last = len(self.kernels) - 1
        for index, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            h = tf.matmul(h, tf.cast(kernel, self.compute_dtype)) + tf.cast(bias, self.compute_dtype)
            if index < last:
                h = tf.nn.relu(h)
        h = tf.cast(h, tf.float32)
        out = tf.reshape(h, tf.concat([shape[:-1], [self.output_dim]], axis=0))
        return triplet_loss.l2_normalize(out)


def training_loss(embeddings, labels, *, mining: str, margin: float, distance: str, pair_scope: str = "example"):
    """Scalar loss of head outputs [batch, boxes, dim] with labels [batch, boxes] (-1 = padding).

    `pair_scope="batch"`: identity labels are global, the sets are merged into one
    (memory O((batch * boxes)^2)); "example": pairs within each image.
    """
    if pair_scope == "batch":
        embeddings, labels = triplet_loss.merge_sets(embeddings, labels)
    return triplet_loss.triplet_loss(
        embeddings, labels, mining=mining, margin=margin, distance=distance, normalize=True
    )


class ServingModule(tf.Module):
    """Raw embeddings -> EmbeddingStats transform graph -> head; exported as a SavedModel.

    `serving_default`: [boxes, dim] raw boxes, any count -> {"embeddings": [boxes, out]}: the
    transform graph's `embedding` output (centered with --center, L2-normalized) -> head. The
    transform graph works per box (schemas/box_schema.pbtxt), given constants computed over
    the dataset such as the centering mean; every box is treated as valid (label 0).
    `serve_grids`: [batch, L, H, W, A, dim] raw grids -> {"embeddings": [batch, L, H, W, A, out]},
    the same per box.
    """

    def __init__(self, head: ProjectionHead, tft_output, grid: contract.GridSpec):
        super().__init__(name="tripletflow_trainer")
        self.head = head
        self.grid_shape = list(grid.grid_shape)
        self.dim = grid.dim
        from components.embedding_stats import preprocessing  # imports tensorflow_transform: export only

        self.transformed_key = preprocessing.OUT_EMBEDDING  # [boxes, dim]
        self.tft_layer = tft_output.transform_features_layer()
        self.serve_boxes = tf.function(self._serve_boxes, input_signature=[tf.TensorSpec([None, grid.dim], tf.float32)])
        self.serve_grids = tf.function(
            self._serve_grids, input_signature=[tf.TensorSpec([None, *grid.grid_shape, grid.dim], tf.float32)]
        )

    def _serve_boxes(self, boxes):
        features = {
            contract.BOX_EMBEDDING: boxes,
            contract.BOX_LABEL: tf.fill(tf.shape(boxes)[:1], tf.constant(SERVING_LABEL, tf.int64)),
        }
        fed = tf.cast(self.tft_layer(features)[self.transformed_key], tf.float32)  # [boxes, dim]
        return {"embeddings": self.head(fed)}

    def _serve_grids(self, grids):
        out = self._serve_boxes(tf.reshape(grids, [-1, self.dim]))["embeddings"]  # [batch * boxes, out]
        shape = tf.concat([tf.shape(grids)[:1], self.grid_shape, [self.head.output_dim]], 0)
        return {"embeddings": tf.reshape(out, shape)}

    def save(self, path: str):
        tf.saved_model.save(
            self,
            path,
            signatures={"serving_default": self.serve_boxes, "serve_grids": self.serve_grids},
        )
