"""Sample input: TFRecord shards of box-embedding grids with a known identity structure.

Each image holds a few identities drawn from a global pool; a valid box's vector is its
identity's centre plus Gaussian noise, at a random scale (so raw norms vary and
normalization matters); empty boxes (label -1) hold small noise. Deterministic for a seed.
`seed_toy_arrays` is the exact toy input of the first seed thread, so its story replays.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from schemas import contract

IDENTITIES_PER_IMAGE = (2, 6)  # [min, max] identities present in one image
NOISE_RATIO = 0.6  # expected norm of the noise around an identity's unit-norm centre (centre units)
SCALE_RANGE = (0.5, 4.0)  # raw vectors are multiplied by a scale drawn from this range
EMPTY_BOX_STD = 0.05  # std of the noise stored in empty boxes
TOY_EXAMPLES = 2  # the seed thread feeds a batch of 2 images


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """What `tripletflow generate` writes: `examples` images over `shards` files."""

    examples: int = 64
    shards: int = 2
    grid: contract.GridSpec = contract.GridSpec()
    identities: int = 20
    empty_fraction: float = 0.5
    seed: int = 0
    gzip: bool = False

    def __post_init__(self):
        if self.examples < 0:
            raise ValueError(f"--examples must be >= 0, got {self.examples}")
        if self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")
        if self.identities < 1:
            raise ValueError(f"--identities must be >= 1, got {self.identities}")
        if not 0.0 <= self.empty_fraction <= 1.0:
            raise ValueError(f"--empty-fraction must be in [0, 1], got {self.empty_fraction}")


def sample_arrays(options: SampleOptions):
    """Yields (example_id, embeddings [boxes, dim] float32, labels [boxes] int64) per image."""
    grid = options.grid
    rng = np.random.default_rng(options.seed)
    centres = rng.normal(size=(options.identities, grid.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    low, high = IDENTITIES_PER_IMAGE
    for index in range(options.examples):
        present = rng.choice(
            options.identities, size=min(options.identities, int(rng.integers(low, high + 1))), replace=False
        )
        valid = rng.random(grid.boxes) >= options.empty_fraction
        labels = np.full(grid.boxes, contract.EMPTY_LABEL, dtype=np.int64)
        labels[valid] = rng.choice(present, size=int(valid.sum()))
        embeddings = rng.normal(scale=EMPTY_BOX_STD, size=(grid.boxes, grid.dim))
        noise = rng.normal(scale=NOISE_RATIO / np.sqrt(grid.dim), size=(int(valid.sum()), grid.dim))
        scale = rng.uniform(*SCALE_RANGE, size=(int(valid.sum()), 1))
        embeddings[valid] = (centres[labels[valid]] + noise) * scale
        yield f"sample-{options.seed}-{index:06d}", embeddings.astype(np.float32), labels


def seed_toy_arrays():
    """The first seed thread's toy batch, as (example_id, embeddings [boxes, dim], labels [boxes]).

    a = zeros([2, 2, 13, 13, 5, 100]); a[..., :2, :2] = 1; a[..., 0, 1:3, 1:2] = 1;
    labels are 1 on the block [:, :, :3, :3, :2] and 0 elsewhere (no empty boxes).
    """
    grid = contract.GridSpec()
    a = np.zeros((TOY_EXAMPLES, *grid.grid_shape, grid.dim), dtype=np.float32)
    a[..., :2, :2] = 1
    a[..., 0, 1:3, 1:2] = 1
    b = np.zeros((TOY_EXAMPLES, *grid.grid_shape), dtype=np.int64)
    b[:, :, :3, :3, :2] = 1
    for index in range(TOY_EXAMPLES):
        yield f"seed-toy-{index}", a[index].reshape(grid.boxes, grid.dim), b[index].reshape(grid.boxes)


def to_example(example_id: str, embeddings: np.ndarray, labels: np.ndarray) -> bytes:
    """Serializes one image as a `tf.train.Example` of the input contract."""
    import tensorflow as tf

    feature = {
        contract.EXAMPLE_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[example_id.encode()])),
        contract.EMBEDDINGS: tf.train.Feature(float_list=tf.train.FloatList(value=embeddings.reshape(-1))),
        contract.LABELS: tf.train.Feature(int64_list=tf.train.Int64List(value=labels.reshape(-1))),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def shard_paths(output_dir: str, shards: int, gzip: bool) -> list[str]:
    suffix = ".tfrecord.gz" if gzip else ".tfrecord"
    return [os.path.join(output_dir, f"part-{i:05d}-of-{shards:05d}{suffix}") for i in range(shards)]


def write_records(records, output_dir: str, shards: int = 1, gzip: bool = False) -> list[str]:
    """Writes serialized records round-robin over `shards` TFRecord files; returns their paths."""
    import tensorflow as tf

    os.makedirs(output_dir, exist_ok=True)
    paths = shard_paths(output_dir, shards, gzip)
    options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
    writers = [tf.io.TFRecordWriter(path, options) for path in paths]
    try:
        for index, record in enumerate(records):
            writers[index % shards].write(record)
    finally:
        for writer in writers:
            writer.close()
    return paths


def generate(output_dir: str, options: SampleOptions = SampleOptions(), seed_toy: bool = False) -> list[str]:
    """Writes sample TFRecord shards (or the seed toy input) under `output_dir`; returns their paths."""
    arrays = seed_toy_arrays() if seed_toy else sample_arrays(options)
    records = (to_example(*item) for item in arrays)
    return write_records(records, output_dir, shards=1 if seed_toy else options.shards, gzip=options.gzip)
