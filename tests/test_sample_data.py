"""Sample data and the data contract: files read back with TensorFlow's own readers."""

import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf

from components import sample_data
from pipelines import cli
from schemas import contract


def read_examples(path):
    """(example_id, embeddings [boxes*dim], labels [boxes]) per record, via tf.data."""
    compression = "GZIP" if open(path, "rb").read(2) == b"\x1f\x8b" else ""
    out = []
    for raw in tf.data.TFRecordDataset(path, compression_type=compression):
        example = tf.train.Example.FromString(raw.numpy())
        feature = example.features.feature
        out.append(
            (
                feature[contract.EXAMPLE_ID].bytes_list.value[0].decode(),
                np.array(feature[contract.EMBEDDINGS].float_list.value, dtype=np.float32),
                np.array(feature[contract.LABELS].int64_list.value, dtype=np.int64),
            )
        )
    return out


def test_generate_cli_writes_gzip_shards_that_parse(tmp_path):
    out = tmp_path / "in"
    args = [
        "generate",
        "--output",
        str(out),
        "--examples",
        "7",
        "--shards",
        "3",
        "--grid",
        "1,3,4,2",
        "--dim",
        "5",
        "--identities",
        "4",
        "--empty-fraction",
        "0.25",
        "--gzip",
        "--seed",
        "3",
    ]
    assert cli.main(args) == 0
    paths = sorted(out.iterdir())
    assert len(paths) == 3
    assert all(open(p, "rb").read(2) == b"\x1f\x8b" for p in paths)
    records = [r for p in paths for r in read_examples(str(p))]
    assert len(records) == 7
    grid = contract.GridSpec.parse("1,3,4,2", 5)
    for _, embeddings, labels in records:
        assert embeddings.shape == (grid.embeddings_length,)
        assert labels.shape == (grid.boxes,)
        assert set(labels.tolist()) <= set(range(-1, 4))
        assert np.isfinite(embeddings).all()
    fractions = np.mean([np.mean(r[2] == -1) for r in records])
    assert 0.05 < fractions < 0.5  # roughly the requested 25% empty boxes


def test_generate_is_deterministic_for_a_seed(tmp_path):
    options = sample_data.SampleOptions(examples=3, shards=1, grid=contract.GridSpec(1, 2, 2, 3, dim=4), seed=11)
    a = read_examples(sample_data.generate(str(tmp_path / "a"), options)[0])
    b = read_examples(sample_data.generate(str(tmp_path / "b"), options)[0])
    c = read_examples(
        sample_data.generate(
            str(tmp_path / "c"),
            sample_data.SampleOptions(examples=3, shards=1, grid=contract.GridSpec(1, 2, 2, 3, dim=4), seed=12),
        )[0]
    )
    for (ia, ea, la), (ib, eb, lb) in zip(a, b):
        assert ia == ib and np.array_equal(ea, eb) and np.array_equal(la, lb)
    assert not np.array_equal(a[0][1], c[0][1])


def test_identity_structure_same_label_vectors_are_closer(tmp_path):
    options = sample_data.SampleOptions(
        examples=4, shards=1, grid=contract.GridSpec(1, 4, 4, 4, dim=32), identities=5, empty_fraction=0.0, seed=1
    )
    (_, embeddings, labels), *_ = read_examples(sample_data.generate(str(tmp_path), options)[0])
    x = embeddings.reshape(-1, 32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    same, other = [], []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            (same if labels[i] == labels[j] else other).append(np.linalg.norm(x[i] - x[j]))
    assert np.mean(same) + 0.3 < np.mean(other)


def test_seed_toy_is_the_thread_input(tmp_path):
    assert cli.main(["generate", "--output", str(tmp_path), "--seed-toy"]) == 0
    (path,) = list(tmp_path.iterdir())
    records = read_examples(str(path))
    assert len(records) == 2
    a = np.zeros((2, 2, 13, 13, 5, 100), np.float32)
    a[..., :2, :2] = 1
    a[..., 0, 1:3, 1:2] = 1
    b = np.zeros((2, 2, 13, 13, 5), np.int64)
    b[:, :, :3, :3, :2] = 1
    for index, (_, embeddings, labels) in enumerate(records):
        np.testing.assert_array_equal(embeddings, a[index].reshape(-1))
        np.testing.assert_array_equal(labels, b[index].reshape(-1))
    assert records[0][2].sum() == 2 * 3 * 3 * 2  # 36 boxes of label 1 per image


@pytest.mark.parametrize("bad", ["2,13,13", "a,b,c,d", "2,0,13,5", "1,2,3,4,5"])
def test_grid_spec_rejects_malformed_grids(bad):
    with pytest.raises(ValueError, match="grid"):
        contract.GridSpec.parse(bad, 100)


def test_grid_spec_box_positions_are_row_major():
    grid = contract.GridSpec(2, 3, 4, 5, dim=1)
    index = np.arange(grid.boxes)
    level, row, col, anchor = grid.box_position(index)
    expected = np.stack(np.unravel_index(index, grid.grid_shape))
    np.testing.assert_array_equal(np.stack([level, row, col, anchor]), expected)


def test_input_schema_carries_the_configured_shapes():
    schema = contract.input_schema(contract.GridSpec(1, 2, 3, 4, dim=7))
    shapes = {f.name: [d.size for d in f.shape.dim] for f in schema.feature}
    assert shapes == {"example_id": [1], "embeddings": [1, 2, 3, 4, 7], "labels": [1, 2, 3, 4]}


def test_examples_schema_nulls_only_where_a_count_can_be_zero():
    schema = contract.EXAMPLES_SCHEMA
    assert schema.names[1:] == list(contract.EXAMPLE_STATISTIC_COLUMNS)
    for name, count in contract.NULL_WHEN_ZERO.items():
        assert schema.field(name).nullable and schema.field(name).type == pa.float32()
        assert not schema.field(count).nullable
