"""Independent references for the EmbeddingStats tests: read inputs with tf.data, brute-force numpy."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq

from schemas import contract

NORM_EPS = 1e-12


def read_input(pattern: str, grid: contract.GridSpec) -> dict:
    """example_id -> (embeddings [boxes, dim] float64, labels [boxes]) for well-formed records."""
    import tensorflow as tf

    found = {}
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            gzip = f.read(2) == b"\x1f\x8b"
        for raw in tf.data.TFRecordDataset(path, compression_type="GZIP" if gzip else "").as_numpy_iterator():
            example = tf.train.Example.FromString(raw)
            feature = example.features.feature
            emb = np.array(feature[contract.EMBEDDINGS].float_list.value, np.float64)
            labels = np.array(feature[contract.LABELS].int64_list.value, np.int64)
            if emb.size != grid.embeddings_length or labels.size != grid.boxes:
                continue
            found[feature[contract.EXAMPLE_ID].bytes_list.value[0].decode()] = (
                emb.reshape(grid.boxes, grid.dim),
                labels,
            )
    return found


def manifest(output_dir) -> dict:
    with open(os.path.join(output_dir, contract.MANIFEST_FILE)) as f:
        return json.load(f)


def run_file(output_dir, name: str) -> str:
    """A file or folder of the output's committed run (MANIFEST.json's run_dir), e.g. summary.json."""
    return os.path.join(str(output_dir), manifest(output_dir)["run_dir"], name)


def read_table(output_dir, name: str):
    """A whole output table, read with plain pyarrow from the Parquet files its manifest lists."""
    files = contract.listed_files(str(output_dir), manifest(output_dir), name)
    return pq.read_table(files, partitioning=None) if files else None  # no columns from date=... folders


def read_summary(output_dir) -> dict:
    with open(run_file(output_dir, contract.SUMMARY_FILE)) as f:
        return json.load(f)


def distances(x: np.ndarray, distance: str) -> np.ndarray:
    """[n, n] distances by explicit loops over pairs."""
    n = len(x)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            diff = x[i] - x[j]
            if distance == "euclidean":
                d[i, j] = np.sqrt(diff @ diff)
            elif distance == "squared":
                d[i, j] = diff @ diff
            else:
                ni, nj = np.linalg.norm(x[i]), np.linalg.norm(x[j])
                cos = 0.0 if ni == 0 or nj == 0 else (x[i] @ x[j]) / (ni * nj)
                d[i, j] = 1.0 - cos
    return d


def example_statistics(emb, labels, distance, margin=0.2, normalize=True) -> dict:
    """Brute-force statistics of one example, keyed like contract.EXAMPLE_STATISTIC_COLUMNS (None = null)."""
    valid = labels >= 0
    x, lab = emb[valid], labels[valid]
    if normalize:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.where(norm >= NORM_EPS, x / np.where(norm > 0, norm, 1.0), 0.0)  # too short: no direction
    n = len(x)
    d = distances(x, distance)
    pos_d, neg_d = [], []
    for i in range(n):
        for j in range(i + 1, n):
            (pos_d if lab[i] == lab[j] else neg_d).append(d[i, j])
    hinges, hard, semi = [], [], []
    for a in range(n):
        negs = np.array([d[a, k] for k in range(n) if lab[k] != lab[a]])
        poss = [p for p in range(n) if p != a and lab[p] == lab[a]]
        if poss and len(negs):
            hard.append(max(0.0, max(d[a, p] for p in poss) - negs.min() + margin))
        for p in poss:
            for dn in negs:
                hinges.append(d[a, p] - dn + margin)
            if len(negs):
                farther = negs[negs > d[a, p]]
                chosen = farther.min() if len(farther) else negs.max()
                semi.append(max(0.0, d[a, p] - chosen + margin))
    hinges = np.array(hinges)
    active = hinges[hinges > 0]
    n_triplets = len(hinges)
    return {
        "n_boxes": n,
        "n_identities": len(set(lab.tolist())),
        "n_pos_pairs": len(pos_d),
        "n_neg_pairs": len(neg_d),
        "pos_dist_mean": float(np.mean(pos_d)) if pos_d else None,
        "pos_dist_max": float(np.max(pos_d)) if pos_d else None,
        "neg_dist_mean": float(np.mean(neg_d)) if neg_d else None,
        "neg_dist_min": float(np.min(neg_d)) if neg_d else None,
        "n_triplets": n_triplets,
        "n_active_triplets": len(active),
        "triplet_loss_sum": float(active.sum()) if n_triplets else None,
        "batch_all_loss": (float(active.mean()) if len(active) else 0.0) if n_triplets else None,
        "batch_hard_loss": float(np.mean(hard)) if n_triplets else None,
        "semi_hard_loss": float(np.mean(semi)) if n_triplets else None,
        "_pos": pos_d,
        "_neg": neg_d,
    }


def exact_auc(positive, negative) -> float:
    """P(negative > positive) + 1/2 P(tie) over all (positive, negative) couples."""
    positive = np.sort(np.asarray(positive))
    negative = np.asarray(negative)
    below = np.searchsorted(positive, negative, side="left")
    ties = np.searchsorted(positive, negative, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(positive) * len(negative)))
