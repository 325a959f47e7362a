"""Report and alerts, end to end on real runs of the EmbeddingStats pipeline.

The report is opened in a real headless browser (Debian's chromium) and its rendered text is
checked against figures recomputed here from the run's Parquet tables (brute-force numpy for
the ROC AUC); a screenshot of each rendered report is kept under test-artifacts/.  Alert
cases are tiny real pipeline runs on TFRecords built to breach one threshold each.
"""

from __future__ import annotations

import collections
import html.parser
import itertools
import json
import os
import re
import shutil
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import sample_data
from components.report import Thresholds, generate_report, parse_overrides
from pipelines import cli
from pipelines.exit_codes import ExitCode
from schemas import contract
from tests import embedding_stats_reference as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "test-artifacts")
CHROMIUM_CANDIDATES = ("chromium", "/usr/bin/chromium", "chromium-browser")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
SCREENSHOT_SIZE = "1280,2000"
BROWSER_TIMEOUT_S = 90

# The tiny alert nights: grid 1,3,3,2 (18 boxes) of dim 8, a dozen examples.
NIGHT_GRID = contract.GridSpec(1, 3, 3, 2, dim=8)
NIGHT_EXAMPLES = 12
NIGHT_IDENTITIES = 5
NIGHT_EMPTY_BOX_FRACTION = 0.3
BAD_RECORDS = 4  # appended to the bad night: 2 unparseable, 2 of the wrong length
EMPTY_EXAMPLES = 9  # examples of the empty night with no valid box at all
TINY_SCALE = 1e-5  # raw norms of the collapsed night: far below Thresholds.min_mean_norm
HUGE_SCALE = 1e4  # raw norms of the empty night's valid boxes: far above Thresholds.max_mean_norm

TRAINER_EPOCHS = 2  # a short real training run beside the shared run

# Dates of the history partitions (the collapsed night is the "current" one).
EARLIER_DATE, CURRENT_DATE, LATER_DATE, UNFINISHED_DATE = "2026-11-27", "2026-11-28", "2026-11-29", "2026-11-26"


# ---------------------------------------------------------------------------
# Helpers: browser, DOM parsing, independent reference figures.
# ---------------------------------------------------------------------------
def chromium_binary() -> str:
    for candidate in CHROMIUM_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    pytest.skip(
        "chromium is not installed (bash .ci/setup installs Debian's chromium as root); "
        "the report's browser checks cannot run here"
    )


def browser(args, tmp_path) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    command = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def rendered_dom(report_path, tmp_path) -> str:
    """The DOM chromium builds from the file (what a reader sees), not the raw file."""
    return browser(["--dump-dom", f"file://{os.path.abspath(report_path)}"], tmp_path).stdout


def screenshot(report_path, name, tmp_path) -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    png = os.path.join(ARTIFACTS, f"{name}.png")
    if os.path.exists(png):
        os.unlink(png)
    browser(
        [f"--screenshot={png}", f"--window-size={SCREENSHOT_SIZE}", f"file://{os.path.abspath(report_path)}"], tmp_path
    )
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", "chromium wrote no PNG screenshot"
    return png


class KeyedRows(html.parser.HTMLParser):
    """Collects the text of table rows that carry a data-key, and the data-alert list items."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.alerts: list[str] = []
        self._key = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-key" in attrs:
            self._key = attrs["data-key"]
            self.rows[self._key] = []
        elif tag in ("td", "th") and self._key is not None:
            self._cell = []
        elif tag == "li" and "data-alert" in attrs:
            self.alerts.append(attrs["data-alert"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[self._key].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._key = None


def parse_dom(dom: str) -> KeyedRows:
    parser = KeyedRows()
    parser.feed(dom)
    return parser


def shown_number(text: str):
    """The number a cell shows ("1,234" -> 1234, "0.98" -> 0.98, "n/a" -> None)."""
    if text == "n/a":
        return None
    text = text.replace(",", "")
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)


def read_parquet_dir(run_dir, name, columns=None):
    """The tables of `name`'s Parquet files, as the run's manifest lists them (the reader rule)."""
    files = contract.listed_files(os.fspath(run_dir), ref.manifest(run_dir), name)
    tables = [pq.read_table(path, columns=columns) for path in files]
    if not tables:
        return None
    return tables


def table_rows(run_dir, name, columns=None) -> list[dict]:
    return [row for table in read_parquet_dir(run_dir, name, columns) or [] for row in table.to_pylist()]


def brute_force_auc(vectors: list[dict], distance: str) -> float | None:
    """P(negative pair distance > positive pair distance), ties 1/2, over pairs within each example."""
    by_example = collections.defaultdict(list)
    for row in vectors:
        by_example[row["example_id"]].append(row)
    pos, neg = [], []
    for rows in by_example.values():
        x = np.array([row["embedding"] for row in rows], dtype=np.float64)
        labels = [row["label"] for row in rows]
        for i, j in itertools.combinations(range(len(rows)), 2):
            diff = x[i] - x[j]
            if distance == "euclidean":
                d = np.sqrt(diff @ diff)
            elif distance == "squared":
                d = diff @ diff
            else:  # cosine of the stored (normalized) vectors
                d = 1.0 - x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
            (pos if labels[i] == labels[j] else neg).append(d)
    if not pos or not neg:
        return None
    pos, neg = np.array(pos), np.sort(np.array(neg))
    greater = len(neg) - np.searchsorted(neg, pos, side="right")
    ties = np.searchsorted(neg, pos, side="right") - np.searchsorted(neg, pos, side="left")
    return float((greater + 0.5 * ties).sum() / (len(pos) * len(neg)))


def reference_figures(run_dir) -> dict:
    """Headline figures recomputed from the Parquet tables, not from summary.json."""
    examples = table_rows(run_dir, contract.EXAMPLES_DIR)
    vectors = table_rows(run_dir, contract.VECTORS_DIR, ["example_id", "label", "embedding"])
    dead = table_rows(run_dir, contract.DEAD_LETTER_DIR, ["reason"])
    with_boxes = {row["example_id"] for row in vectors}
    triplets = sum(row["n_triplets"] for row in examples)
    active = sum(row["n_active_triplets"] for row in examples)

    def mean_loss(name):
        values = [row[name] for row in examples if row["n_triplets"] > 0]
        return float(np.mean(values)) if values else None

    figures = {
        "records_read": len(examples) + len(dead),
        "records_good": len(examples),
        "records_rejected": len(dead),
        "examples": len(examples),
        "empty_examples": sum(row["example_id"] not in with_boxes for row in examples),
        "valid_boxes": len(vectors),
        "identities": len({row["label"] for row in vectors}),
        "triplets": triplets,
        "active_triplet_fraction": active / triplets if triplets else None,
        "mean_batch_all_loss": mean_loss("batch_all_loss"),
        "mean_batch_hard_loss": mean_loss("batch_hard_loss"),
        "mean_semi_hard_loss": mean_loss("semi_hard_loss"),
    }
    for reason, count in collections.Counter(row["reason"] for row in dead).items():
        figures[f"rejected_by_reason.{reason}"] = count
    return figures, vectors


def assert_headline_matches_tables(page: KeyedRows, run_dir):
    """Every headline figure shown equals the one recomputed from the Parquet tables."""
    expected, vectors = reference_figures(run_dir)
    shown = {key: shown_number(cells[1]) for key, cells in page.rows.items() if len(cells) == 2}
    for key, value in expected.items():
        assert key in shown, f"the report does not show {key}"
        if isinstance(value, int):
            assert shown[key] == value, key
        elif value is None:
            assert shown[key] is None, key
        else:
            assert shown[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    shown_reasons = {key for key in shown if key.startswith("rejected_by_reason.")}
    assert shown_reasons == {key for key in expected if key.startswith("rejected_by_reason.")}
    return shown, vectors


def run_dir_of(stats_run) -> str:
    """The output directory of the shared `stats_run` fixture (a path or an object holding one)."""
    if isinstance(stats_run, (str, os.PathLike)):
        return os.fspath(stats_run)
    for name in ("output_dir", "output", "path"):
        if hasattr(stats_run, name):
            return os.fspath(getattr(stats_run, name))
    if isinstance(stats_run, dict):
        for name in ("output_dir", "output"):
            if name in stats_run:
                return os.fspath(stats_run[name])
    raise TypeError(f"cannot find the output directory of stats_run {stats_run!r}")


def copy_run(stats_run, destination) -> str:
    """A private copy of the shared run, so writing report.html there cannot disturb other tests."""
    source = run_dir_of(stats_run)
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(contract.REPORT_FILE, contract.ALERTS_FILE))
    return os.fspath(destination)


def read_alerts(run_dir) -> dict:
    with open(os.path.join(run_dir, contract.ALERTS_FILE)) as f:
        return json.load(f)


def read_summary(run_dir) -> dict:
    return ref.read_summary(run_dir)


# ---------------------------------------------------------------------------
# The nights built to breach thresholds: real TFRecords through the real pipeline.
# ---------------------------------------------------------------------------
def night_arrays(seed: int):
    options = sample_data.SampleOptions(
        examples=NIGHT_EXAMPLES,
        grid=NIGHT_GRID,
        identities=NIGHT_IDENTITIES,
        empty_fraction=NIGHT_EMPTY_BOX_FRACTION,
        seed=seed,
    )
    return list(sample_data.sample_arrays(options))


def run_pipeline(records, work_dir, output_dir, *flags) -> int:
    input_dir = os.path.join(work_dir, "input")
    sample_data.write_records(records, input_dir, shards=1)
    argv = [
        "run",
        "--input",
        os.path.join(input_dir, "*"),
        "--output",
        os.fspath(output_dir),
        "--grid",
        ",".join(map(str, NIGHT_GRID.grid_shape)),
        "--dim",
        str(NIGHT_GRID.dim),
        *flags,
    ]
    return cli.main(argv)


@pytest.fixture(scope="module")
def history_root(tmp_path_factory):
    return tmp_path_factory.mktemp("history")


@pytest.fixture(scope="module")
def healthy_night(tmp_path_factory):
    """A plain sample night, run with --fail-on-alert: nothing to report, exit code 0."""
    work = tmp_path_factory.mktemp("healthy")
    records = [sample_data.to_example(*item) for item in night_arrays(seed=4)]
    output = work / "out"
    code = run_pipeline(records, work, output, "--fail-on-alert")
    return os.fspath(output), code


@pytest.fixture(scope="module")
def collapsed_night(tmp_path_factory, history_root):
    """Every valid vector points the same way (tiny norms): distances all 0, AUC 1/2."""
    work = tmp_path_factory.mktemp("collapsed")
    rng = np.random.default_rng(0)
    direction = rng.normal(size=NIGHT_GRID.dim)
    direction /= np.linalg.norm(direction)
    records = []
    for example_id, embeddings, labels in night_arrays(seed=1):
        valid = labels >= 0
        scales = rng.uniform(1.0, 4.0, size=(int(valid.sum()), 1)) * TINY_SCALE
        embeddings[valid] = (direction * scales).astype(np.float32)
        records.append(sample_data.to_example(example_id, embeddings, labels))
    output = history_root / f"date={CURRENT_DATE}"
    assert run_pipeline(records, work, output, "--no-report") == 0
    return os.fspath(output)


@pytest.fixture(scope="module")
def bad_night(tmp_path_factory):
    """A dozen good records plus BAD_RECORDS broken ones; run with --fail-on-alert."""
    work = tmp_path_factory.mktemp("bad")
    records = [sample_data.to_example(*item) for item in night_arrays(seed=2)]
    records += [b"not a tf.train.Example", b"\x00\x01\x02"]
    embeddings = np.ones((NIGHT_GRID.boxes - 1, NIGHT_GRID.dim), np.float32)  # one box short
    labels = np.zeros(NIGHT_GRID.boxes - 1, np.int64)
    records += [sample_data.to_example(f"short-{i}", embeddings, labels) for i in range(BAD_RECORDS - 2)]
    output = work / "out"
    code = run_pipeline(records, work, output, "--fail-on-alert")
    return os.fspath(output), code


@pytest.fixture(scope="module")
def empty_night(tmp_path_factory):
    """EMPTY_EXAMPLES of the examples have no valid box; the others have huge raw norms."""
    work = tmp_path_factory.mktemp("empty")
    records = []
    for index, (example_id, embeddings, labels) in enumerate(night_arrays(seed=3)):
        if index < EMPTY_EXAMPLES:
            labels = np.full_like(labels, contract.EMPTY_LABEL)
        else:
            embeddings = embeddings * np.float32(HUGE_SCALE)
        records.append(sample_data.to_example(example_id, embeddings, labels))
    output = work / "out"
    assert run_pipeline(records, work, output, "--no-report") == 0
    return os.fspath(output)


# ---------------------------------------------------------------------------
# The report of a healthy run, in a browser.
# ---------------------------------------------------------------------------
def test_report_in_browser_shows_the_runs_figures(stats_run, tmp_path):
    run_dir = copy_run(stats_run, tmp_path / "run")
    alerts = generate_report(run_dir)
    report = os.path.join(run_dir, contract.REPORT_FILE)
    page = parse_dom(rendered_dom(report, tmp_path))
    screenshot(report, "report-healthy-run", tmp_path)

    shown, vectors = assert_headline_matches_tables(page, run_dir)

    # The AUC shown agrees with a brute-force AUC over every pair, within the binning error.
    distance = (
        json.load(open(os.path.join(run_dir, contract.MANIFEST_FILE))).get("options", {}).get("distance", "euclidean")
    )
    auc = brute_force_auc(vectors, distance)
    assert auc is not None and shown["roc_auc_error_bound"] is not None
    assert abs(shown["roc_auc"] - auc) <= shown["roc_auc_error_bound"] + 1e-5

    # The shared run holds bad records on purpose: exactly the rejection alert, in alerts.json
    # and at the report's top, with the rate the tables give.
    assert alert_names(alerts) == {"rejection_rate"} and read_alerts(run_dir)["alerts"] == alerts
    assert page.alerts == ["rejection_rate"]
    assert alerts[0]["value"] == pytest.approx(shown["records_rejected"] / shown["records_read"])

    # Norm statistics shown equal the raw norms in the vectors table.
    norms = np.concatenate([t.column("l2_norm").to_numpy() for t in read_parquet_dir(run_dir, "vectors", ["l2_norm"])])
    assert shown["l2_norm.mean"] == pytest.approx(float(norms.astype(np.float64).mean()), rel=1e-4)
    assert shown["l2_norm.max"] == pytest.approx(float(norms.max()), rel=1e-5)


def test_report_is_self_contained(stats_run, tmp_path):
    run_dir = copy_run(stats_run, tmp_path / "run")
    generate_report(run_dir)
    with open(os.path.join(run_dir, contract.REPORT_FILE), encoding="utf-8") as f:
        document = f.read()
    images = re.findall(r"<img\b[^>]*>", document)
    assert len(images) >= 3, "the plots are missing"
    assert all(re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', tag) for tag in images)
    without_data = re.sub(r"data:[a-z/+.-]+;base64,[A-Za-z0-9+/=]+", "DATA", document)
    for pattern in (r"https?:", r"//", r"\bftp:", r"\bwww\."):
        assert not re.search(pattern, without_data, re.IGNORECASE), f"external reference {pattern!r}"
    for match in re.finditer(r"url\(\s*['\"]?([^'\")]*)", without_data, re.IGNORECASE):
        assert match.group(1).startswith("DATA"), match.group(0)
    for match in re.finditer(r"\b(?:src|href|action|poster)\s*=\s*['\"]?([^'\" >]*)", without_data, re.IGNORECASE):
        assert match.group(1).startswith("DATA"), match.group(0)
    assert "<script" not in without_data.lower() and "<link" not in without_data.lower()


def test_report_shows_the_trainer_beside_the_run(stats_run, tmp_path):
    """A real trainer run in <run>/model/ adds its loss curve and validation figures, baseline vs trained."""
    run_dir = copy_run(stats_run, tmp_path / "run")
    model_dir = os.path.join(run_dir, "model")
    assert (
        cli.main(["train", "--stats", run_dir, "--output", model_dir, "--epochs", str(TRAINER_EPOCHS), "--no-export"])
        == 0
    )
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    generate_report(run_dir)  # finds model/ by itself
    report = os.path.join(run_dir, contract.REPORT_FILE)
    page = parse_dom(rendered_dom(report, tmp_path))
    for name in ("roc_auc", "recall_at_1", "mean_batch_all_loss"):
        baseline, trained = metrics["validation"]["baseline"][name], metrics["validation"]["trained"][name]
        cells = page.rows[f"model.{name}"]
        assert cells[0] == name
        assert shown_number(cells[1]) == pytest.approx(baseline, rel=1e-5)
        assert shown_number(cells[2]) == pytest.approx(trained, rel=1e-5)
        assert shown_number(cells[3]) == pytest.approx(trained - baseline, rel=1e-5, abs=1e-12)
    with open(report) as f:
        assert 'alt="trainer loss curve"' in f.read()
    assert len(metrics["epochs"]) == TRAINER_EPOCHS


# ---------------------------------------------------------------------------
# Alerts on nights built to breach each threshold.
# ---------------------------------------------------------------------------
def alert_names(alerts) -> set[str]:
    return {alert["name"] for alert in alerts}


def test_collapsed_directions_raise_auc_collapse_and_norm_alerts(collapsed_night, tmp_path):
    alerts = generate_report(collapsed_night)
    assert alert_names(alerts) == {"auc_low", "direction_collapse", "norm_collapse"}
    by_name = {alert["name"]: alert for alert in alerts}
    # every pair distance ties at 0, so P(neg > pos) + P(tie) / 2 is exactly 1/2
    assert by_name["auc_low"]["value"] == pytest.approx(
        0.5, abs=read_summary(collapsed_night)["roc_auc_error_bound"] + 1e-6
    )
    assert by_name["direction_collapse"]["value"] == pytest.approx(0.0, abs=1e-3)
    norms = np.concatenate(
        [t.column("l2_norm").to_numpy() for t in read_parquet_dir(collapsed_night, "vectors", ["l2_norm"])]
    )
    assert by_name["norm_collapse"]["value"] == pytest.approx(float(norms.astype(np.float64).mean()), rel=1e-4)
    assert read_alerts(collapsed_night)["alerts"] == alerts
    page = parse_dom(rendered_dom(os.path.join(collapsed_night, contract.REPORT_FILE), tmp_path))
    assert page.alerts == [alert["name"] for alert in alerts]  # at the report's top, in order


def test_run_passes_thresholds_and_history_to_its_report(bad_night, tmp_path):
    """`tripletflow run --threshold/--history`: the report of the run applies them."""
    input_glob = os.path.join(os.path.dirname(bad_night[0]), "input", "*")
    rate = BAD_RECORDS / (BAD_RECORDS + NIGHT_EXAMPLES)
    output = tmp_path / "date=2099-01-01"
    argv = [
        "run",
        "--input",
        input_glob,
        "--output",
        os.fspath(output),
        "--grid",
        ",".join(map(str, NIGHT_GRID.grid_shape)),
        "--dim",
        str(NIGHT_GRID.dim),
        "--fail-on-alert",
        "--threshold",
        f"max_rejection_rate={rate + 0.01}",
        "--history",
        os.fspath(tmp_path),
    ]
    assert cli.main(argv) == 0  # the rejection rate is now under the raised threshold
    document = read_alerts(os.fspath(output))
    assert document["alerts"] == []
    assert document["thresholds"]["max_rejection_rate"] == pytest.approx(rate + 0.01)


def test_bad_records_raise_the_rejection_alert_and_fail_the_run(bad_night, tmp_path):
    run_dir, exit_code = bad_night
    assert exit_code == ExitCode.ALERT  # `tripletflow run --fail-on-alert` marks the night red
    alerts = read_alerts(run_dir)["alerts"]
    assert alert_names(alerts) == {"rejection_rate"}
    dead = table_rows(run_dir, contract.DEAD_LETTER_DIR, ["reason"])
    good = table_rows(run_dir, contract.EXAMPLES_DIR, ["example_id"])
    assert len(dead) == BAD_RECORDS and len(good) == NIGHT_EXAMPLES
    assert alerts[0]["value"] == pytest.approx(BAD_RECORDS / (BAD_RECORDS + NIGHT_EXAMPLES))
    # the report written at the end of the run shows the rejections by reason, and the alert on top
    page = parse_dom(rendered_dom(os.path.join(run_dir, contract.REPORT_FILE), tmp_path))
    assert page.alerts == ["rejection_rate"]
    shown, _ = assert_headline_matches_tables(page, run_dir)
    assert sum(v for k, v in shown.items() if k.startswith("rejected_by_reason.")) == BAD_RECORDS
    # `tripletflow report`: exit code only with --fail-on-alert; a raised threshold silences it.
    assert cli.main(["report", "--output", run_dir]) == 0
    assert cli.main(["report", "--output", run_dir, "--fail-on-alert"]) == ExitCode.ALERT
    assert cli.main(["report", "--output", run_dir, "--fail-on-alert", "--threshold", "max_rejection_rate=0.5"]) == 0
    assert read_alerts(run_dir)["thresholds"]["max_rejection_rate"] == 0.5


def test_mostly_empty_examples_raise_the_empty_fraction_alert(empty_night):
    alerts = generate_report(empty_night)
    assert alert_names(alerts) == {"empty_fraction", "norm_explosion"}
    by_name = {alert["name"]: alert for alert in alerts}
    assert by_name["empty_fraction"]["value"] == pytest.approx(EMPTY_EXAMPLES / NIGHT_EXAMPLES)
    assert by_name["norm_explosion"]["value"] > Thresholds().max_mean_norm


def test_healthy_nights_stay_quiet_and_thresholds_are_configurable(healthy_night, tmp_path):
    run_dir, exit_code = healthy_night
    assert exit_code == 0
    assert read_alerts(run_dir)["alerts"] == []  # written by `tripletflow run` itself
    dom = rendered_dom(os.path.join(run_dir, contract.REPORT_FILE), tmp_path)
    assert parse_dom(dom).alerts == [] and "No alerts." in dom
    assert generate_report(run_dir) == []
    assert cli.main(["report", "--output", run_dir, "--fail-on-alert"]) == 0
    mean_norm = read_summary(run_dir)["l2_norm"]["mean"]
    # the same run breaches limits set just past its own figures
    alerts = generate_report(run_dir, thresholds={"max_mean_norm": mean_norm * 0.99, "min_auc": 1.0})
    assert alert_names(alerts) == {"norm_explosion", "auc_low"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_overrides(["no_such_threshold=1"])
    with pytest.raises(ValueError, match="finite"):
        parse_overrides(["min_auc=nan"])
    assert cli.main(["report", "--output", run_dir, "--threshold", "min_auc=abc"]) == 2
    assert cli.main(["report", "--output", os.fspath(tmp_path / "nowhere")]) == 2


# ---------------------------------------------------------------------------
# History: trends and AUC drop against earlier date partitions.
# ---------------------------------------------------------------------------
def test_history_trends_and_auc_drop(stats_run, collapsed_night, history_root, tmp_path):
    healthy = run_dir_of(stats_run)
    earlier = history_root / f"date={EARLIER_DATE}" / "run"  # a run one folder down its partition
    later = history_root / f"date={LATER_DATE}"
    for partition in (earlier, later):
        partition.mkdir(parents=True)
        summary = os.path.relpath(ref.run_file(healthy, contract.SUMMARY_FILE), healthy)
        for name in (contract.MANIFEST_FILE, summary):
            (partition / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(healthy, name), partition / name)
    unfinished = history_root / f"date={UNFINISHED_DATE}"
    unfinished.mkdir()  # a summary but no MANIFEST.json: that run did not finish
    shutil.copy(ref.run_file(healthy, contract.SUMMARY_FILE), unfinished / contract.SUMMARY_FILE)

    alerts = generate_report(collapsed_night, history_root=os.fspath(history_root))
    healthy_auc = read_summary(healthy)["roc_auc"]
    collapsed_auc = read_summary(collapsed_night)["roc_auc"]
    by_name = {}
    for alert in alerts:
        by_name.setdefault(alert["name"], []).append(alert)
    assert {"auc_drop_previous", "auc_drop_trailing"} <= set(by_name)
    # only the earlier finished partition counts: not the later one, not the unfinished one
    assert read_alerts(collapsed_night)["compared_with"] == [EARLIER_DATE]
    drop = healthy_auc - collapsed_auc
    assert by_name["auc_drop_previous"][0]["value"] == pytest.approx(drop)
    assert by_name["auc_drop_previous"][0]["basis"] == f"previous run {EARLIER_DATE}"
    assert by_name["auc_drop_trailing"][0]["value"] == pytest.approx(drop)
    # the collapse of norms shows against history as well as against the absolute floor
    assert [a["basis"] for a in by_name["norm_collapse"]] == ["this run", "trailing mean of 1 runs"]

    report = os.path.join(collapsed_night, contract.REPORT_FILE)
    dom = rendered_dom(report, tmp_path)
    screenshot(report, "report-collapsed-night-with-history", tmp_path)
    assert "History (1 earlier runs)" in dom
    assert f"date={UNFINISHED_DATE}" in dom and "did not finish" in dom
    assert 'alt="trends over earlier runs"' in dom

    # without history the drop alerts cannot fire
    assert not {"auc_drop_previous", "auc_drop_trailing"} & alert_names(generate_report(collapsed_night))


def test_report_of_a_run_without_any_good_record(tmp_path):
    """Every record rejected: the run still publishes, and its report shows n/a, never NaN."""
    records = [
        b"not a tf.train.Example",
        sample_data.to_example(
            "short",
            np.ones((NIGHT_GRID.boxes - 1, NIGHT_GRID.dim), np.float32),
            np.zeros(NIGHT_GRID.boxes - 1, np.int64),
        ),
    ]
    output = tmp_path / "out"
    run_pipeline(records, tmp_path, output, "--no-report")  # its exit code is EmbeddingStats' business
    alerts = generate_report(os.fspath(output))
    assert alert_names(alerts) == {"rejection_rate"} and alerts[0]["value"] == 1.0
    dom = rendered_dom(output / contract.REPORT_FILE, tmp_path)
    page = parse_dom(dom)
    shown = {key: cells[1] for key, cells in page.rows.items() if len(cells) == 2}
    assert shown["records_read"] == "2" and shown["examples"] == "0" and shown["valid_boxes"] == "0"
    for key in ("roc_auc", "mean_batch_all_loss", "active_triplet_fraction", "l2_norm.mean"):
        assert shown[key] == "n/a", key
    text = re.sub(r"data:[a-z/+.-]+;base64,[A-Za-z0-9+/=]+", "", dom)  # base64 may spell anything
    assert not re.search(r"\bnan\b|\binf\b", text, re.IGNORECASE)
    assert "NaN" not in (output / contract.ALERTS_FILE).read_text()


def test_auc_drop_previous_vs_trailing_mean_by_hand():
    """Hand-computed: a slow slide trips the trailing mean but not the previous-run check."""
    from components.report import alerts as alerts_lib

    def figures(auc, norm=2.0):
        return {
            "records_read": 10,
            "rejection_rate": 0.0,
            "empty_fraction": 0.0,
            "roc_auc": auc,
            "mean_norm": norm,
            "neg_distance_fraction": 0.5,
        }

    history = [{"date": f"2026-11-0{day}", **figures(auc)} for day, auc in ((1, 0.95), (2, 0.93), (3, 0.91), (4, 0.89))]
    current = figures(0.87)
    # previous drop 0.02; trailing mean of 4 = 0.92, drop 0.05: both within 0.06
    assert alerts_lib.check(current, history, Thresholds(max_auc_drop=0.06)) == []
    found = alerts_lib.check(current, history, Thresholds(max_auc_drop=0.04))
    assert [(a["name"], round(a["value"], 6), a["basis"]) for a in found] == [
        ("auc_drop_trailing", 0.05, "trailing mean of 4 runs")
    ]
    # a window of the 2 latest runs: mean 0.90, drop 0.03
    assert alerts_lib.check(current, history, Thresholds(max_auc_drop=0.04, trailing_runs=2)) == []
    # norms: 25x the trailing mean trips the ratio, 5x does not
    assert {a["name"] for a in alerts_lib.check(figures(0.95, norm=50.0), history, Thresholds())} == {"norm_explosion"}
    assert alerts_lib.check(figures(0.95, norm=10.0), history, Thresholds()) == []
    with pytest.raises(ValueError, match="max_norm_ratio"):
        Thresholds(max_norm_ratio=0.5)
    with pytest.raises(ValueError, match="trailing_runs"):
        parse_overrides(["trailing_runs=0"])


def test_vector_sample_is_uniform_bounded_and_streams_every_file(tmp_path):
    """The norm figures read a bounded uniform sample of `vectors`, never the whole table."""
    from components.report import run_data

    rows_per_file, files = 1000, 3
    for index in range(files):
        start = index * rows_per_file
        table = pa.table(
            {
                "level": pa.array(np.arange(start, start + rows_per_file) % 2, pa.int32()),
                "anchor": pa.array(np.zeros(rows_per_file), pa.int32()),
                "l2_norm": pa.array(np.arange(start, start + rows_per_file), pa.float32()),
                "l2_norm_z": pa.array(np.zeros(rows_per_file), pa.float32()),
            }
        )
        pq.write_table(table, tmp_path / f"part-{index}.parquet", row_group_size=128)
    paths = [str(tmp_path / f"part-{index}.parquet") for index in range(files)]
    sample, total = run_data.sample_table(paths, contract.VECTORS_SCHEMA, run_data.VECTOR_COLUMNS, 600)
    assert total == files * rows_per_file and sample.num_rows == 600
    picked = np.sort(sample.column("l2_norm").to_numpy())
    assert len(np.unique(picked)) == 600  # distinct rows, each a real row of the table
    np.testing.assert_array_equal(sample.column("level").to_numpy(), picked.astype(np.int64) % 2)
    per_file = np.bincount((picked // rows_per_file).astype(int), minlength=files)
    assert per_file.min() > 150  # about 200 from each file: uniform over the whole table
    everything, total = run_data.sample_table(paths, contract.VECTORS_SCHEMA, run_data.VECTOR_COLUMNS, 10**6)
    np.testing.assert_array_equal(np.sort(everything.column("l2_norm").to_numpy()), np.arange(3000))
