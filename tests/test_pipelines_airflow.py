"""The Airflow DAG (pipelines/airflow/), checked offline in Airflow's own environment.

Airflow cannot share .venv (its Google provider conflicts with tfx-bsl), so the DAG is
loaded by a script run in .venv-airflow (built by .ci/setup-airflow); the test skips with
the set-up's reason when that environment could not be built. The script renders the
Beam task for a date and returns the exact command the operator would start; this test
then parses it with the real `tripletflow nightly` parser and runs it end to end on a
local runner, so the date really travels from {{ ds }} to the published output.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import nightly, train
from schemas import contract

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_PYTHON = REPO / ".venv-airflow" / "bin" / "python"
AIRFLOW_FAILED = REPO / ".venv-airflow.FAILED"  # .ci/setup-airflow's reason when the install failed
AIRFLOW_READY = REPO / ".venv-airflow" / ".tripletflow-airflow-installed"  # its stamp of a complete install
DAG_FOLDER = REPO / "pipelines" / "airflow"
DAG_ID = "tripletflow_nightly"
SUBPROCESS_TIMEOUT_S = 240

GRID, DIM = "1,3,3,4", 8
EXAMPLES = 12
# The first run scheduled after this moment starts at 03:00 UTC the next day and covers the day before.
AFTER = datetime.datetime(2024, 5, 1, 0, 0, tzinfo=datetime.timezone.utc)
EXPECTED_RUN_AFTER = "2024-05-02T03:00:00+00:00"
EXPECTED_DS = "2024-05-01"

# Runs inside .venv-airflow: loads the DAG folder, describes the DAG, renders the Beam task
# for EXPECTED_DS (with per-run param overrides given as JSON) and prints one JSON line.
CHECK_SCRIPT = r"""
import json, sys
import pendulum
from airflow.dag_processing.dagbag import DagBag
from airflow.providers.apache.beam.hooks.beam import beam_options_to_args
from airflow.timetables.base import TimeRestriction

folder, dag_id, after, ds, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
bag = DagBag(dag_folder=folder)
out = {"import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dag_ids": sorted(bag.dags)}
dag = bag.dags[dag_id]
info = dag.timetable.next_dagrun_info(
    last_automated_data_interval=None,
    restriction=TimeRestriction(earliest=pendulum.parse(after), latest=None, catchup=True))
out["run_after"] = info.run_after.isoformat()
out["data_interval_start"] = info.data_interval.start.isoformat()
out["catchup"] = dag.catchup
out["tasks"] = {t.task_id: {"upstream": sorted(t.upstream_task_ids), "retries": t.retries} for t in dag.tasks}

params = {name: dag.params[name] for name in dag.params}
params.update(overrides)
context = {"ds": ds, "ds_nodash": ds.replace("-", ""), "params": params}
beam = dag.get_task("embedding_stats")
beam.render_template_fields(context)
out["operator"] = type(beam).__name__
out["dataflow_config"] = beam.dataflow_config
out["runner"] = beam.runner
# The command BeamHook._start_pipeline starts: [interpreter, *py_options, py_file, --runner=..., options...]
out["command"] = [beam.py_interpreter, *beam.py_options, beam.py_file, "--runner=" + beam.runner,
                  *beam_options_to_args(dict(beam.pipeline_options))]
module = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == dag.fileloc)
out["train_command"] = module.trainer_command(beam.py_interpreter, ds, params["output_template"], params["model_template"])
gate = dag.get_task("should_train").python_callable
out["should_train"] = {"false": gate(params={**params, "train": False}), "true": gate(params={**params, "train": True})}
print(json.dumps(out))
"""


def _airflow_check(tmp_path: Path, overrides: dict, env_defaults: dict) -> dict:
    if not (AIRFLOW_PYTHON.exists() and AIRFLOW_READY.exists()):
        reason = AIRFLOW_FAILED.read_text().strip() if AIRFLOW_FAILED.exists() else "run `bash .ci/setup-airflow`"
        pytest.skip(f".venv-airflow is not built, so the DAG cannot be loaded: {reason}")
    home = tmp_path / "airflow_home"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FOLDER),
        "TRIPLETFLOW_PYTHON": sys.executable,  # the pipeline's environment: this test's venv
        **env_defaults,
    }
    done = subprocess.run(
        [str(AIRFLOW_PYTHON), "-c", CHECK_SCRIPT, str(DAG_FOLDER), DAG_ID, AFTER.isoformat(), EXPECTED_DS,
         json.dumps(overrides)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dataflow_render(tmp_path_factory):
    """The DAG as deployed: params from TRIPLETFLOW_* env defaults, runner DataflowRunner."""
    env_defaults = {
        "TRIPLETFLOW_GCP_PROJECT": "proj-x",
        "TRIPLETFLOW_GCP_REGION": "europe-west4",
        "TRIPLETFLOW_TEMP_LOCATION": "gs://tf-bucket/tmp",
        "TRIPLETFLOW_INPUT_TEMPLATE": "gs://tf-bucket/in/date={date}/*.gz",
        "TRIPLETFLOW_OUTPUT_TEMPLATE": "gs://tf-bucket/out/date={date}",
        "TRIPLETFLOW_MODEL_TEMPLATE": "gs://tf-bucket/models/date={date}",
    }
    return _airflow_check(tmp_path_factory.mktemp("airflow_dataflow"), {}, env_defaults)


def test_dag_imports_with_expected_tasks_schedule_and_retries(dataflow_render):
    out = dataflow_render
    assert out["import_errors"] == {}
    assert out["dag_ids"] == [DAG_ID]
    assert out["tasks"].keys() == {"embedding_stats", "should_train", "train"}
    assert out["tasks"]["embedding_stats"]["upstream"] == []
    assert out["tasks"]["should_train"]["upstream"] == ["embedding_stats"]
    assert out["tasks"]["train"]["upstream"] == ["should_train"]
    assert all(task["retries"] >= 1 for task in out["tasks"].values())
    # Nightly at 03:00 UTC, and the run of 2024-05-02 03:00 covers the day before: ds = 2024-05-01.
    assert out["run_after"] == EXPECTED_RUN_AFTER
    assert out["data_interval_start"][:10] == EXPECTED_DS
    assert out["catchup"] is False


def test_dag_runs_nightly_on_dataflow_with_the_date_passed_through(dataflow_render):
    out = dataflow_render
    assert out["operator"] == "BeamRunPythonPipelineOperator"
    assert out["runner"] == "DataflowRunner"
    assert out["dataflow_config"]["project_id"] == "proj-x"
    assert out["dataflow_config"]["location"] == "europe-west4"
    assert out["dataflow_config"]["job_name"] == "tripletflow-20240501"
    command = out["command"]
    assert command[:3] == [sys.executable, "-m", "pipelines.nightly"]  # the pipeline's own Python
    args, passthrough = nightly.parser().parse_known_args(command[3:])
    assert args.date == datetime.date(2024, 5, 1)
    assert nightly.partition_paths(args.input_template, args.output_template, args.date) == (
        "gs://tf-bucket/in/date=2024-05-01/*.gz", "gs://tf-bucket/out/date=2024-05-01")
    assert "--runner=DataflowRunner" in passthrough
    assert "--temp_location=gs://tf-bucket/tmp" in passthrough
    assert f"--grid={','.join(map(str, contract.DEFAULT_GRID))}" in passthrough


def test_trainer_runs_only_when_asked_on_that_days_output(dataflow_render):
    out = dataflow_render
    assert out["should_train"] == {"false": False, "true": True}
    command = out["train_command"]
    assert command[:4] == [sys.executable, "-m", "pipelines.cli", "train"]
    parsed = train.parser().parse_args(command[4:])  # the real trainer accepts these flags
    assert parsed.stats == ["gs://tf-bucket/out/date=2024-05-01"]
    assert parsed.output == "gs://tf-bucket/models/date=2024-05-01"


def test_rendered_command_runs_end_to_end_on_a_local_runner(tmp_path):
    """The operator's exact command, rendered for ds with a local runner, publishes that day's output."""
    from components import sample_data

    sample_data.generate(
        str(tmp_path / "in" / f"date={EXPECTED_DS}"),
        sample_data.SampleOptions(examples=EXAMPLES, shards=2, grid=contract.GridSpec.parse(GRID, DIM)))
    overrides = {
        "runner": "FnApiRunner",
        "input_template": str(tmp_path / "in" / "date={date}" / "*"),
        "output_template": str(tmp_path / "out" / "date={date}"),
        "grid": GRID,
        "dim": DIM,
    }
    out = _airflow_check(tmp_path, overrides, {})
    command = out["command"] + ["--no-report"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-4000:]
    published = tmp_path / "out" / f"date={EXPECTED_DS}"
    manifest = json.loads((published / contract.MANIFEST_FILE).read_text())
    assert manifest["counts"]["records_in"] == EXAMPLES
    assert len(manifest["input_files"]) == 2
    assert all(f"date={EXPECTED_DS}" in path for path in manifest["input_files"])
    assert pq.read_table(contract.listed_files(str(published), manifest, contract.EXAMPLES_DIR), partitioning=None).num_rows == EXAMPLES
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"date={EXPECTED_DS}"]  # no temp left
