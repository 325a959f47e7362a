"""Trainer end to end on real data: digits TFRecords -> real EmbeddingStats run -> training.

scikit-learn's bundled digits (8x8 images, 64 floats, no download) are the box embeddings;
digit classes are the identities. Each grid (1,4,4,5 = 80 boxes) holds 20 digits of 4
classes, the rest empty; every digit is used once, so validation grids hold unseen digits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from sklearn.datasets import load_digits

from components import sample_data
from components.trainer import data, model
from components.trainer import spec as spec_lib
from components.trainer.executor import Executor
from pipelines import cli
from pipelines import train as train_entry
from schemas import contract
from tests import embedding_stats_reference as ref

GRID = contract.GridSpec(1, 4, 4, 5, dim=64)
CLASSES_PER_GRID = 4
DIGITS_PER_CLASS = 5  # per grid: 4 classes x 5 digits = 20 boxes of 80
VALIDATION_FRACTION = 0.3
TRAIN_OPTIONS = dict(epochs=30, batch_size=8, learning_rate=5e-3, validation_fraction=VALIDATION_FRACTION, seed=0)


def digit_grids(seed=0):
    """{example_id: (embeddings [boxes, 64] float32, labels [boxes] int64)}, raw digits, empty boxes zero."""
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in range(10)}
    grids = {}
    while True:
        available = [c for c in pools if len(pools[c]) >= DIGITS_PER_CLASS]
        if len(available) < CLASSES_PER_GRID:
            return grids
        classes = rng.choice(available, CLASSES_PER_GRID, replace=False)
        boxes = rng.choice(GRID.boxes, CLASSES_PER_GRID * DIGITS_PER_CLASS, replace=False)
        embeddings = np.zeros((GRID.boxes, GRID.dim), np.float32)
        labels = np.full(GRID.boxes, contract.EMPTY_LABEL, np.int64)
        digits = [(pools[c].pop(), c) for c in classes for _ in range(DIGITS_PER_CLASS)]
        for box, (index, label) in zip(boxes, digits):
            embeddings[box], labels[box] = X[index], label
        grids[f"digits-{len(grids):04d}"] = (embeddings, labels)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A real EmbeddingStats run over digit grids written as real TFRecords."""
    root = tmp_path_factory.mktemp("digits")
    grids = digit_grids()
    records = (sample_data.to_example(eid, emb, lab) for eid, (emb, lab) in grids.items())
    sample_data.write_records(records, str(root / "records"), shards=2)
    out = str(root / "stats")
    argv = [
        "run",
        "--input",
        str(root / "records" / "*"),
        "--output",
        out,
        "--grid",
        "1,4,4,5",
        "--dim",
        "64",
        "--no-report",
    ]
    assert cli.main(argv) == 0
    return out, grids


@pytest.fixture(scope="module")
def trained(digits_run, tmp_path_factory):
    stats, _ = digits_run
    spec = spec_lib.TrainerSpec((stats,), str(tmp_path_factory.mktemp("train")), spec_lib.TrainOptions(**TRAIN_OPTIONS))
    executor = Executor(spec, verbose=False)
    return executor.run(), executor.head, spec


def test_training_beats_raw_vectors_on_held_out_digits(trained, digits_run):
    document, _, spec = trained
    _, grids = digits_run
    assert document["status"] == "complete"
    with open(spec.metrics_path) as f:
        assert json.load(f) == json.loads(json.dumps(document))
    validation_ids = [eid for eid in grids if data.is_validation(eid, VALIDATION_FRACTION)]
    assert document["counts"] == {
        "train_examples": len(grids) - len(validation_ids),
        "validation_examples": len(validation_ids),
    }
    assert [e["epoch"] for e in document["epochs"]] == list(range(1, TRAIN_OPTIONS["epochs"] + 1))
    assert document["epochs"][-1]["loss"] < 0.8 * document["epochs"][0]["loss"]

    base, head = document["validation"]["baseline"], document["validation"]["trained"]
    boxes = len(validation_ids) * CLASSES_PER_GRID * DIGITS_PER_CLASS
    assert base["recall_boxes"] == head["recall_boxes"] == boxes
    assert head["mean_triplet_hinge"] < 0.5 * base["mean_triplet_hinge"]
    assert head["mean_batch_hard_loss"] < base["mean_batch_hard_loss"] - 0.05
    assert head["mean_semi_hard_loss"] < 0.6 * base["mean_semi_hard_loss"]
    assert head["roc_auc"] > base["roc_auc"] + 0.05
    assert head["recall_at_1"] > base["recall_at_1"] + 0.01


@pytest.mark.parametrize("run", ["digits", "shared_sample"])
@pytest.mark.parametrize("mining", ["batch_all", "batch_hard", "semi_hard"])
def test_identity_head_loss_equals_examples_table(request, run, mining):
    """Same graph: the trainer's loss per example = EmbeddingStats' per-example loss column."""
    if run == "digits":
        stats = request.getfixturevalue("digits_run")[0]
    else:
        stats = request.getfixturevalue("stats_run").output_dir  # tests/conftest.py: the shared real run
    manifest = data.read_manifest(stats)["options"]
    dim = data.embedding_dim([stats])
    table = ref.read_table(stats, contract.EXAMPLES_DIR).to_pydict()
    expected = dict(zip(table["example_id"], table[f"{mining}_loss"]))
    triplets = dict(zip(table["example_id"], table["n_triplets"]))
    identity = model.ProjectionHead(dim, identity=True)
    got = {}
    for batch in data.make_dataset([stats], dim, None, VALIDATION_FRACTION, 1):
        loss = model.training_loss(
            identity(batch["embeddings"]),
            batch["labels"],
            mining=mining,
            margin=manifest["margin"],
            distance=manifest["distance"],
        )
        got[batch["example_id"].numpy()[0].decode()] = float(loss)
    with_boxes = {eid for eid, n in zip(table["example_id"], table["n_boxes"]) if n > 0}
    assert set(got) == with_boxes  # vectors hold valid boxes only: empty examples have no rows
    assert sum(value is not None for value in expected.values()) >= 10
    for eid in got:
        if expected[eid] is None:  # no triplet: null in the table, 0 from the loss graph
            assert triplets[eid] == 0 and got[eid] == 0.0
        else:
            assert got[eid] == pytest.approx(expected[eid], rel=1e-5, abs=1e-6), eid


def test_resumed_run_ends_like_an_uninterrupted_one(digits_run, tmp_path):
    stats, _ = digits_run
    common = dict(TRAIN_OPTIONS, epochs=3, export=False, hidden=(32,), mining="batch_hard")

    def train(output, **extra):
        executor = Executor(
            spec_lib.TrainerSpec((stats,), str(output), spec_lib.TrainOptions(**common, **extra)), verbose=False
        )
        return executor.run(), executor.head

    whole, whole_head = train(tmp_path / "whole")
    first, _ = train(tmp_path / "resumed", stop_after_epoch=1)
    assert first["status"] == "interrupted" and len(first["epochs"]) == 1 and "validation" not in first
    resumed, resumed_head = train(tmp_path / "resumed")
    assert resumed["status"] == "complete"
    assert [e["loss"] for e in resumed["epochs"]] == pytest.approx([e["loss"] for e in whole["epochs"]], rel=1e-5)
    for a, b in zip(whole_head.trainable_variables, resumed_head.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    _assert_close(resumed["validation"], whole["validation"])
    # other options into the same output are refused, not silently mixed
    with pytest.raises(ValueError, match="other options"):
        train(tmp_path / "resumed", margin=0.5)


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for name, value in a[k].items():
            assert value == pytest.approx(b[k][name], rel=1e-5, abs=1e-7), (k, name)


def _check_serving(saved_model_dir, head, stats, grids, tmp_path):
    """The SavedModel, loaded in a fresh process, on raw boxes/grids = the in-memory head on `vectors`."""
    vectors = ref.read_table(stats, contract.VECTORS_DIR).to_pandas()
    ids = sorted(grids)[:5]
    rows = vectors[vectors.example_id.isin(ids)]
    flat = (((rows.level * GRID.height + rows.row) * GRID.width + rows.col) * GRID.anchors + rows.anchor).to_numpy()
    assert np.all(np.stack(GRID.box_position(flat), 1) == rows[["level", "row", "col", "anchor"]].to_numpy())
    expected = head(np.stack(rows.embedding.to_numpy()).astype(np.float32)).numpy()
    raw_boxes = np.stack([grids[eid][0][i] for eid, i in zip(rows.example_id, flat)])  # 100 boxes > 80 per grid
    raw_grid = grids[ids[0]][0].reshape(1, *GRID.grid_shape, GRID.dim)
    np.save(tmp_path / "boxes.npy", raw_boxes)
    np.save(tmp_path / "grid.npy", raw_grid)
    script = textwrap.dedent(
        f"""
        import numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({saved_model_dir!r})
        boxes = np.load({str(tmp_path / "boxes.npy")!r}); grid = np.load({str(tmp_path / "grid.npy")!r})
        out_boxes = loaded.signatures["serving_default"](tf.constant(boxes))["embeddings"].numpy()
        out_grid = loaded.signatures["serve_grids"](tf.constant(grid))["embeddings"].numpy()
        np.savez({str(tmp_path / "out.npz")!r}, boxes=out_boxes, grid=out_grid)
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    out = np.load(tmp_path / "out.npz")
    assert out["boxes"].shape == expected.shape == (len(ids) * CLASSES_PER_GRID * DIGITS_PER_CLASS, GRID.dim)
    np.testing.assert_allclose(out["boxes"], expected, atol=1e-5)
    grid_out = out["grid"].reshape(GRID.boxes, GRID.dim)
    first = (rows.example_id == ids[0]).to_numpy()
    np.testing.assert_allclose(grid_out[flat[first]], expected[first], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(grid_out, axis=1), 1.0, atol=1e-5)


def test_saved_model_serves_raw_embeddings_in_a_fresh_process(trained, digits_run, tmp_path):
    _, head, spec = trained
    stats, grids = digits_run
    _check_serving(spec.saved_model_dir, head, stats, grids, tmp_path)


def test_saved_model_applies_the_runs_centering(digits_run, tmp_path):
    """With --center the transform graph subtracts the dataset mean: serving must too."""
    _, grids = digits_run
    records = os.path.join(os.path.dirname(digits_run[0]), "records", "*")
    stats = str(tmp_path / "centered")
    argv = ["run", "--input", records, "--output", stats, "--grid", "1,4,4,5", "--dim", "64", "--center", "--no-report"]
    assert cli.main(argv) == 0
    spec = spec_lib.TrainerSpec(
        (stats,), str(tmp_path / "train"), spec_lib.TrainOptions(**dict(TRAIN_OPTIONS, epochs=1))
    )
    executor = Executor(spec, verbose=False)
    executor.run()
    # the centered vectors differ from plain normalization: the check below would catch a skipped mean
    vectors = ref.read_table(stats, contract.VECTORS_DIR).to_pandas().iloc[0]
    raw = grids[vectors.example_id][0][
        ((vectors.level * GRID.height + vectors.row) * GRID.width + vectors.col) * GRID.anchors + vectors.anchor
    ]
    assert np.max(np.abs(np.asarray(vectors.embedding) - raw / np.linalg.norm(raw))) > 0.05
    _check_serving(spec.saved_model_dir, executor.head, stats, grids, tmp_path)


def test_pair_scope_batch_mixed_precision_and_mlp_train(digits_run, tmp_path):
    stats, _ = digits_run
    options = spec_lib.TrainOptions(
        **dict(TRAIN_OPTIONS, epochs=2),
        pair_scope="batch",
        mixed_precision=True,
        hidden=(48, 48),
        export=False,
        mining="semi_hard",
    )
    document = Executor(spec_lib.TrainerSpec((stats,), str(tmp_path), options), verbose=False).run()
    losses = [e["loss"] for e in document["epochs"]]
    assert all(np.isfinite(losses)) and all(loss > 0 for loss in losses)
    assert 0.5 < document["validation"]["trained"]["roc_auc"] <= 1.0


def test_mirrored_strategy_over_two_devices(digits_run, tmp_path):
    """The multi-device path (MirroredStrategy, batches split over replicas) on two virtual CPUs."""
    stats, _ = digits_run
    script = textwrap.dedent(
        f"""
        import json, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from components.trainer import spec as spec_lib
        from components.trainer.executor import Executor
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        options = spec_lib.TrainOptions(epochs=2, batch_size=7, learning_rate=5e-3, validation_fraction=0.3,
                                        export=False)
        spec = spec_lib.TrainerSpec(({stats!r},), {str(tmp_path)!r}, options)
        document = Executor(spec, verbose=False, strategy=strategy).run()
        print(json.dumps(document))
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout.strip().splitlines()[-1])
    assert document["device"] == {"strategy": "MirroredStrategy", "replicas": 2}
    assert all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in document["epochs"])
    assert document["validation"]["trained"]["roc_auc"] > document["validation"]["baseline"]["roc_auc"]


def test_runs_preprocessed_differently_are_refused(digits_run, tmp_path):
    stats, _ = digits_run
    other = tmp_path / "other"
    shutil.copytree(stats, other)
    manifest = json.loads((other / contract.MANIFEST_FILE).read_text())
    manifest["options"]["center"] = not manifest["options"]["center"]
    (other / contract.MANIFEST_FILE).write_text(json.dumps(manifest))
    spec = spec_lib.TrainerSpec((stats, str(other)), str(tmp_path / "out"), spec_lib.TrainOptions(epochs=1))
    with pytest.raises(ValueError, match="preprocessed differently"):
        Executor(spec, verbose=False).run()
    assert not (tmp_path / "out").exists()  # refused before the output was touched


def test_a_run_with_a_whole_grid_transform_graph_is_refused_before_training(digits_run, tmp_path):
    stats, _ = digits_run
    old = tmp_path / "old"
    shutil.copytree(stats, old)
    # The raw schema an older tripletflow wrote: the transform graph took whole input grids.
    shutil.copy(
        contract.INPUT_SCHEMA_PATH,
        os.path.join(ref.run_file(old, contract.TRANSFORM_GRAPH_DIR), "metadata", "schema.pbtxt"),
    )
    spec = spec_lib.TrainerSpec((str(old),), str(tmp_path / "out"), spec_lib.TrainOptions(epochs=1))
    with pytest.raises(ValueError, match="not one box"):
        Executor(spec, verbose=False).run()
    assert not (tmp_path / "out").exists()


def test_cli_trains_and_writes_metrics(digits_run, tmp_path, capsys):
    stats, _ = digits_run
    argv = [
        "train",
        "--stats",
        stats,
        "--output",
        str(tmp_path),
        "--epochs",
        "1",
        "--hidden",
        "16",
        "--no-export",
        "--mining",
        "batch_hard",
        "--distance",
        "cosine",
        "--margin",
        "0.1",
        "--validation-fraction",
        "0.3",
    ]
    assert cli.main(argv) == 0
    assert "complete" in capsys.readouterr().out
    document = json.loads((tmp_path / spec_lib.METRICS_FILE).read_text())
    assert document["options"]["hidden"] == [16] and document["options"]["distance"] == "cosine"
    assert len(document["epochs"]) == 1 and not (tmp_path / spec_lib.SAVED_MODEL_DIR).exists()


def test_cli_rejects_bad_flags_and_inputs(tmp_path, capsys):
    assert train_entry.run(["--stats", str(tmp_path), "--output", str(tmp_path / "o"), "--margin", "-1"]) == 2
    assert "--margin" in capsys.readouterr().err
    assert train_entry.run(["--stats", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "not a finished EmbeddingStats run" in capsys.readouterr().err
    assert train_entry.run(["--stats", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
