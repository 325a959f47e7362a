"""The validator's fast decode (tf.io.parse_example) equals tfx-bsl's Example decoder, the one
inside TFXIO, on every batch it accepts, and hands every other batch to that decoder."""

import numpy as np
import pytest
from tfx_bsl.coders import example_coder

from components import sample_data
from components.embedding_stats.validate import _ValidateFn
from schemas import contract

GRID = contract.GridSpec(1, 3, 3, 2, dim=4)


@pytest.fixture(scope="module")
def validator():
    fn = _ValidateFn(GRID)
    fn.setup()
    return fn


def tfxio_decode(raws):
    decoder = example_coder.ExamplesToRecordBatchDecoder(contract.input_schema(GRID).SerializeToString())
    return decoder.DecodeBatch(raws)


def good_records():
    options = sample_data.SampleOptions(examples=5, grid=GRID, identities=3, seed=7)
    records = [sample_data.to_example(*item) for item in sample_data.sample_arrays(options)]
    embeddings = np.full((GRID.boxes, GRID.dim), np.nan, np.float32)  # NaN, huge values, odd ids:
    embeddings[0] = 1e30  # still well-formed records, judged later by the checks
    labels = np.full(GRID.boxes, contract.EMPTY_LABEL, np.int64)
    labels[0] = 3
    records.append(sample_data.to_example("ünïcödé id", embeddings, labels))
    return records


def test_fast_decode_equals_tfx_bsl_on_well_formed_batches(validator):
    raws = good_records()
    fast = validator._fast_decode(raws)
    reference = tfxio_decode(raws)
    assert fast is not None
    assert fast.schema.equals(reference.schema)
    for name in reference.schema.names:  # same offsets and values, bit for bit (NaN included)
        got, want = fast.column(name), reference.column(name)
        np.testing.assert_array_equal(got.offsets.to_numpy(), want.offsets.to_numpy())
        if name == contract.EMBEDDINGS:
            np.testing.assert_array_equal(got.values.to_numpy().view(np.uint32), want.values.to_numpy().view(np.uint32))
        else:
            assert got.values.equals(want.values)


@pytest.mark.parametrize("bad", ["garbled", "short", "missing"])
def test_other_batches_go_to_tfx_bsl_which_isolates_the_bad_record(validator, bad):
    raws = good_records()
    if bad == "garbled":
        raws.insert(2, b"\xff\xfe not an Example \x80")
    elif bad == "short":
        raws.insert(
            2,
            sample_data.to_example(
                "short", np.ones((GRID.boxes - 1, GRID.dim), np.float32), np.zeros(GRID.boxes - 1, np.int64)
            ),
        )
    else:
        import tensorflow as tf

        example = tf.train.Example.FromString(raws[0])
        del example.features.feature[contract.LABELS]
        raws.insert(2, example.SerializeToString())
    assert validator._fast_decode(raws) is None
    batch, kept, failures = validator._decode(raws)
    if bad == "garbled":  # undecodable: rejected by tfx-bsl, the rest decoded
        assert kept == [i for i in range(len(raws)) if i != 2] and set(failures) == {2}
        assert failures[2][0] == contract.Reason.UNPARSEABLE
    else:  # decodable: the length and presence checks downstream reject it
        assert kept == list(range(len(raws))) and failures == {}
    assert batch.num_rows == len(kept)
    assert batch.column(contract.EXAMPLE_ID).equals(tfxio_decode([raws[i] for i in kept]).column(contract.EXAMPLE_ID))
