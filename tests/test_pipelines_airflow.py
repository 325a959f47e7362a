"""The Airflow DAG (pipelines/airflow/) and the trainer image, checked offline.

Airflow cannot share .venv (its Google provider conflicts with tfx-bsl), so the DAG is
loaded by scripts run in .venv-airflow (built by .ci/setup-airflow); those tests skip with
the set-up's reason when that environment could not be built. One script loads the DAG,
renders every operator for a scheduled run and for manual triggers (the data intervals
come from Airflow's own timetable and trigger code) and prints what the operators would
send: the Flex Template launch body, the pod, the Vertex AI CustomJob, the commands. This
side checks them against the real parsers (the template's metadata.json, the pipeline
options, the nightly and trainer CLIs). A second script runs the dev path for real with
`dag.test()`: a manual trigger without a logical date, EmbeddingStats on the local runner,
the manifest sensor, the trainer branch.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.embedding_stats.options import EmbeddingStatsOptions, validate_options
from pipelines import nightly, train
from pipelines import report as report_entry
from schemas import contract

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_PYTHON = REPO / ".venv-airflow" / "bin" / "python"
AIRFLOW_FAILED = REPO / ".venv-airflow.FAILED"  # .ci/setup-airflow's reason when the install failed
AIRFLOW_READY = REPO / ".venv-airflow" / ".tripletflow-airflow-installed"  # its stamp of a complete install
DAG_FOLDER = REPO / "pipelines" / "airflow"
METADATA = REPO / "pipelines" / "dataflow" / "metadata.json"
TRAINER_DOCKERFILE = REPO / "pipelines" / "trainer" / "Dockerfile"
DAG_ID = "tripletflow_nightly"
SUBPROCESS_TIMEOUT_S = 300

GRID, DIM = "1,3,3,4", 8
EXAMPLES = 12
UTC = datetime.timezone.utc
# The first run scheduled after AFTER starts at 03:00 UTC the next day and covers the day before.
AFTER = datetime.datetime(2024, 5, 1, 0, 0, tzinfo=UTC)
EXPECTED_RUN_AFTER = "2024-05-02T03:00:00+00:00"
EXPECTED_DATE = "2024-05-01"
# Manual triggers, by hand from the 03:00 UTC schedule: a trigger at 10:00 on 2024-05-02 is
# after that day's 03:00, so the last complete interval is [05-01 03:00, 05-02 03:00): 2024-05-01.
# At 01:00 on 2024-05-02, 05-01 is not complete yet: the last complete interval starts 04-30.
MANUAL_AT = datetime.datetime(2024, 5, 2, 10, 0, tzinfo=UTC)
MANUAL_BEFORE_CUTOFF = datetime.datetime(2024, 5, 2, 1, 0, tzinfo=UTC)
DATE_BEFORE_CUTOFF = "2024-04-30"
OVERRIDE_DATE = "2024-03-09"
DAG_RUN_START = datetime.datetime(2024, 5, 2, 3, 0, 5, tzinfo=UTC)

ENV_DEFAULTS = {  # the DAG as deployed: per-run param defaults from TRIPLETFLOW_* env
    "TRIPLETFLOW_GCP_PROJECT": "proj-x",
    "TRIPLETFLOW_GCP_REGION": "europe-west4",
    "TRIPLETFLOW_TEMP_LOCATION": "gs://tf-bucket/tmp",
    "TRIPLETFLOW_FLEX_TEMPLATE": "gs://tf-bucket/templates/tripletflow.json",
    "TRIPLETFLOW_FLEX_IMAGE": "europe-docker.pkg.dev/proj-x/img/tripletflow:1",
    "TRIPLETFLOW_INPUT_TEMPLATE": "gs://tf-bucket/in/date={date}/*.gz",
    "TRIPLETFLOW_OUTPUT_TEMPLATE": "gs://tf-bucket/out/date={date}",
    "TRIPLETFLOW_MODEL_TEMPLATE": "gs://tf-bucket/models/date={date}",
    "TRIPLETFLOW_TRAINER_IMAGE": "europe-docker.pkg.dev/proj-x/img/trainer:1",
    "TRIPLETFLOW_REPORT_FAIL_ON_ALERT": "1",
    "TRIPLETFLOW_TRAINER_GPUS": "2",
    "TRIPLETFLOW_K8S_NAMESPACE": "ml",
}
EXPECTED_INPUT = f"gs://tf-bucket/in/date={EXPECTED_DATE}/*.gz"
EXPECTED_OUTPUT = f"gs://tf-bucket/out/date={EXPECTED_DATE}"
EXPECTED_MODEL = f"gs://tf-bucket/models/date={EXPECTED_DATE}"

# Runs inside .venv-airflow: loads the DAG, renders its tasks, prints one JSON line.
CHECK_SCRIPT = r"""
import copy, json, os, sys, tempfile, types
import pendulum
from airflow.api_fastapi.core_api.datamodels.dag_run import TriggerDAGRunPostBody
from airflow.dag_processing.dagbag import DagBag
from airflow.providers.apache.beam.hooks.beam import beam_options_to_args
from airflow.serialization.serialized_objects import DagSerialization
from airflow.timetables.base import TimeRestriction
from kubernetes.client import ApiClient

folder, dag_id, after, manual_at, before_cutoff, override, run_start = sys.argv[1:8]
bag = DagBag(dag_folder=folder)
out = {"import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dag_ids": sorted(bag.dags)}
dag = bag.dags[dag_id]
module = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == dag.fileloc)
out["catchup"], out["max_active_runs"] = dag.catchup, dag.max_active_runs
out["tasks"] = {t.task_id: {"upstream": sorted(t.upstream_task_ids), "retries": t.retries, "type": type(t).__name__,
                            "deferrable": getattr(t, "deferrable", None),
                            "trigger_rule": str(getattr(t.trigger_rule, "value", t.trigger_rule)),
                            "execution_timeout_s": t.execution_timeout.total_seconds() if t.execution_timeout else None}
                for t in dag.tasks}
params = {name: dag.params[name] for name in dag.params}
env = dag.get_template_env()

def dag_run(data_interval_start, run_after):
    return types.SimpleNamespace(data_interval_start=data_interval_start, run_after=run_after,
                                 start_date=pendulum.parse(run_start))

def context(run, overrides=None):
    return {"params": {**params, **(overrides or {})}, "dag_run": run, "run_id": "scheduled__x",
            "dag": dag, "ti": types.SimpleNamespace(dag_id=dag.dag_id, task_id="t", map_index=-1, try_number=1)}

def job_name(run, overrides=None):
    return env.from_string(module.JOB_NAME).render(**context(run, overrides))

# Partition dates: the scheduled run (timetable), manual triggers (Airflow's trigger API model).
info = dag.timetable.next_dagrun_info(last_automated_data_interval=None,
    restriction=TimeRestriction(earliest=pendulum.parse(after), latest=None, catchup=True))
scheduled = dag_run(info.data_interval.start, info.run_after)
out["run_after"] = info.run_after.isoformat()
serialized = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
def manual(logical_date, run_after):
    made = TriggerDAGRunPostBody(logical_date=logical_date, run_after=run_after).validate_context(serialized)
    interval = made["data_interval"]
    return dag_run(interval.start if interval else None, made["run_after"]), interval is not None
names = {"scheduled": job_name(scheduled)}
for label, logical, run_after in (("manual_logical", manual_at, manual_at), ("manual_no_logical", None, manual_at),
                                  ("manual_before_cutoff", None, before_cutoff)):
    run, has_interval = manual(pendulum.parse(logical) if logical else None, pendulum.parse(run_after))
    names[label] = job_name(run)
    out.setdefault("has_interval", {})[label] = has_interval
names["override"] = job_name(scheduled, {"partition_date": override})
out["job_names"] = names

def rendered(task_id, overrides=None):
    task = copy.deepcopy(dag.get_task(task_id))
    task.render_template_fields(context(scheduled, overrides))
    return task

flex = rendered("embedding_stats_dataflow")
out["flex"] = {"body": flex.launch_body(), "project_id": flex.project_id, "location": flex.location,
               "append_job_name": flex.append_job_name, "cancel_on_kill": flex.cancel_on_kill,
               "drain_pipeline": flex.drain_pipeline, "wait_until_finished": flex.wait_until_finished,
               "on_retry_callback": [f.__name__ for f in flex.on_retry_callback or []],
               "on_failure_callback": [f.__name__ for f in flex.on_failure_callback or []]}
out["flex_overridden_parameters"] = rendered(
    "embedding_stats_dataflow", {"distance": "cosine", "margin": "0.35"}).launch_body()["launchParameter"]["parameters"]

gcs = rendered("wait_for_manifest_gcs")
out["gcs_sensor"] = {"bucket": gcs.bucket, "object": gcs.object, "ts": gcs.ts_func(context(scheduled)).isoformat(),
                     "timeout": gcs.timeout}

beam = rendered("embedding_stats_local")
out["beam"] = {"runner": beam.runner,
               "command": [beam.py_interpreter, *beam.py_options, beam.py_file, "--runner=" + beam.runner,
                           *beam_options_to_args(dict(beam.pipeline_options))]}
local_sensor = rendered("wait_for_manifest_local")
out["local_sensor_args"] = list(local_sensor.op_args)
# The local sensor's check on real files: missing, written before the run started, after.
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "MANIFEST.json")
    since = pendulum.parse(run_start)
    checks = {"missing": module.manifest_committed_since(path, since)}
    with open(path, "w") as f:
        f.write("{}")
    os.utime(path, (since.timestamp() - 3600, since.timestamp() - 3600))
    checks["older"] = module.manifest_committed_since(path, since)
    os.utime(path, (since.timestamp() + 60, since.timestamp() + 60))
    checks["newer"] = module.manifest_committed_since(path, since)
out["local_sensor_checks"] = checks

pod_task = rendered("train_kubernetes")
pod = ApiClient().sanitize_for_serialization(pod_task.build_pod_request_obj(context(scheduled), dry_run=True))
out["pod"] = pod
report_task = rendered("report_kubernetes")
out["report_pod"] = ApiClient().sanitize_for_serialization(
    report_task.build_pod_request_obj(context(scheduled), dry_run=True))
vertex = rendered("train_vertex_ai")
out["vertex"] = {"custom_job": vertex.custom_job, "project_id": vertex.project_id, "region": vertex.region}
out["train_local_command"] = list(rendered("train_local").op_args[0])

launch_gate = dag.get_task("choose_launch").python_callable
out["choose_launch"] = {v: launch_gate(params={**params, "launch": v}) for v in ("flex_template", "beam_local")}
train_gate = dag.get_task("choose_trainer").python_callable
out["choose_trainer"] = {"off": train_gate(params={**params, "train": False})}
for backend in ("kubernetes", "vertex_ai", "local"):
    out["choose_trainer"][backend] = train_gate(params={**params, "train": True, "trainer_backend": backend})
print(json.dumps(out, default=str))
"""

# Runs inside .venv-airflow: one real DAG run of the dev path with dag.test(), prints one JSON line.
RUN_SCRIPT = r"""
import datetime as dt, json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.utils import db
folder, dag_id, run_after, conf = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
db.upgradedb()  # `airflow db migrate` of a fresh sqlite AIRFLOW_HOME, in this process
dag = DagBag(dag_folder=folder).dags[dag_id]
for task in dag.tasks:
    task.retries = 0  # a failure fails the test now instead of waiting for retry_delay
run = dag.test(logical_date=None, run_after=dt.datetime.fromisoformat(run_after), run_conf=conf)
print(json.dumps({"state": str(run.state), "data_interval_start": str(run.data_interval_start),
                  "tasks": {ti.task_id: str(ti.state) for ti in run.get_task_instances()}}))
"""


def _require_airflow():
    if not (AIRFLOW_PYTHON.exists() and AIRFLOW_READY.exists()):
        reason = AIRFLOW_FAILED.read_text().strip() if AIRFLOW_FAILED.exists() else "run `bash .ci/setup-airflow`"
        pytest.skip(f".venv-airflow is not built, so the DAG cannot be loaded: {reason}")


def _airflow_env(home: Path, extra: dict) -> dict:
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FOLDER),
        "TRIPLETFLOW_PYTHON": sys.executable,  # the pipeline's environment: this test's venv
        **extra,
    }


def _last_json_line(done) -> dict:
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dag_render(tmp_path_factory):
    _require_airflow()
    tmp = tmp_path_factory.mktemp("airflow_render")
    done = subprocess.run(
        [
            str(AIRFLOW_PYTHON),
            "-c",
            CHECK_SCRIPT,
            str(DAG_FOLDER),
            DAG_ID,
            AFTER.isoformat(),
            MANUAL_AT.isoformat(),
            MANUAL_BEFORE_CUTOFF.isoformat(),
            OVERRIDE_DATE,
            DAG_RUN_START.isoformat(),
        ],
        cwd=tmp,
        env=_airflow_env(tmp / "home", ENV_DEFAULTS),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    return _last_json_line(done)


def test_dag_imports_with_both_paths_and_their_dependencies(dag_render):
    out = dag_render
    assert out["import_errors"] == {}
    assert out["dag_ids"] == [DAG_ID]
    upstream = {task_id: task["upstream"] for task_id, task in out["tasks"].items()}
    assert upstream == {
        "choose_launch": [],
        "embedding_stats_dataflow": ["choose_launch"],
        "wait_for_manifest_gcs": ["embedding_stats_dataflow"],
        "embedding_stats_local": ["choose_launch"],
        "wait_for_manifest_local": ["embedding_stats_local"],
        "report_kubernetes": ["wait_for_manifest_gcs"],  # the Flex Template job writes no report
        "choose_trainer": ["wait_for_manifest_gcs", "wait_for_manifest_local"],
        "train_kubernetes": ["choose_trainer"],
        "train_vertex_ai": ["choose_trainer"],
        "train_local": ["choose_trainer"],
    }
    types = {task_id: task["type"] for task_id, task in out["tasks"].items()}
    assert types["embedding_stats_dataflow"] == "PartitionFlexTemplateOperator"  # the provider's, subclassed
    assert types["wait_for_manifest_gcs"] == "GCSObjectUpdateSensor"
    assert types["embedding_stats_local"] == "BeamRunPythonPipelineOperator"
    assert types["train_kubernetes"] == types["report_kubernetes"] == "KubernetesPodOperator"
    assert types["train_vertex_ai"] == "CreateCustomJobOperator"
    # The trainer branch runs after whichever path ran (the other is skipped, never failed).
    assert out["tasks"]["choose_trainer"]["trigger_rule"] == "none_failed_min_one_success"
    # The branches pick the tasks named by the params.
    assert out["choose_launch"] == {"flex_template": "embedding_stats_dataflow", "beam_local": "embedding_stats_local"}
    assert out["choose_trainer"] == {
        "off": [],
        "kubernetes": ["train_kubernetes"],
        "vertex_ai": ["train_vertex_ai"],
        "local": ["train_local"],
    }
    assert out["catchup"] is False and out["max_active_runs"] == 1


def test_retries_are_airflows_and_long_tasks_wait_deferred(dag_render):
    tasks = dag_render["tasks"]
    assert all(task["retries"] >= 1 for task in tasks.values())
    for task_id in (
        "embedding_stats_dataflow",
        "wait_for_manifest_gcs",
        "train_kubernetes",
        "train_vertex_ai",
        "report_kubernetes",
    ):
        assert tasks[task_id]["deferrable"] is True, task_id  # no worker slot held while the job runs
    for task_id in (
        "embedding_stats_dataflow",
        "embedding_stats_local",
        "train_kubernetes",
        "train_vertex_ai",
        "train_local",
        "report_kubernetes",
    ):
        assert tasks[task_id]["execution_timeout_s"], task_id
    # One attempt per try on the dev path: nightly's own retry loop is off.
    args, _ = nightly.parser().parse_known_args(dag_render["beam"]["command"][3:])
    assert args.attempts == 1


def test_partition_date_for_scheduled_runs_and_manual_triggers(dag_render):
    out = dag_render
    assert out["run_after"] == EXPECTED_RUN_AFTER
    # Airflow 3.3 gives a manual trigger a data interval only when it has a logical date.
    assert out["has_interval"] == {"manual_logical": True, "manual_no_logical": False, "manual_before_cutoff": False}

    def nodash(date):
        return "tripletflow-" + date.replace("-", "")

    assert out["job_names"] == {
        "scheduled": nodash(EXPECTED_DATE),
        "manual_logical": nodash(EXPECTED_DATE),
        "manual_no_logical": nodash(EXPECTED_DATE),
        "manual_before_cutoff": nodash(DATE_BEFORE_CUTOFF),
        "override": nodash(OVERRIDE_DATE),
    }


def test_flex_template_launch_body_is_the_templates_parameters_for_the_date(dag_render):
    flex = dag_render["flex"]
    assert (flex["project_id"], flex["location"]) == ("proj-x", "europe-west4")
    launch = flex["body"]["launchParameter"]
    assert launch["jobName"] == "tripletflow-20240501"
    assert launch["containerSpecGcsPath"] == "gs://tf-bucket/templates/tripletflow.json"
    assert launch["parameters"] == {
        "input": EXPECTED_INPUT,
        "output": EXPECTED_OUTPUT,
        "grid": "2,13,13,5",
        "dim": "100",
    }  # distance and margin left to the template's defaults
    environment = launch["environment"]
    assert environment["tempLocation"] == "gs://tf-bucket/tmp"
    assert environment["sdkContainerImage"] == "europe-docker.pkg.dev/proj-x/img/tripletflow:1"
    assert "use_runner_v2" in environment["additionalExperiments"]
    assert environment["additionalUserLabels"]["partition"] == EXPECTED_DATE
    # Every parameter is one the template declares, passes its regexes, and the real options parse it.
    declared = {p["name"]: p for p in json.loads(METADATA.read_text())["parameters"]}
    for parameters in (launch["parameters"], dag_render["flex_overridden_parameters"]):
        assert parameters.keys() <= declared.keys()
        assert {name for name, p in declared.items() if not p["isOptional"]} <= parameters.keys()
        for name, value in parameters.items():
            assert all(re.fullmatch(pattern, value) for pattern in declared[name].get("regexes", [])), (name, value)
        options = EmbeddingStatsOptions([f"--{name}={value}" for name, value in parameters.items()])
        assert validate_options(options) == contract.GridSpec(2, 13, 13, 5, dim=100)
    overridden = EmbeddingStatsOptions([f"--{k}={v}" for k, v in dag_render["flex_overridden_parameters"].items()])
    assert (overridden.view_as(EmbeddingStatsOptions).distance, overridden.view_as(EmbeddingStatsOptions).margin) == (
        "cosine",
        0.35,
    )


def test_flex_template_keeps_one_job_per_partition(dag_render):
    flex = dag_render["flex"]
    assert flex["append_job_name"] is False  # stable name: Dataflow keeps one active job per name
    assert flex["cancel_on_kill"] is True and flex["drain_pipeline"] is False
    assert flex["wait_until_finished"] is False  # deferrable: the triggerer waits, not the worker
    # A try that is retried or fails cancels its partition's job; each try also cancels a stale one first.
    assert flex["on_retry_callback"] == ["cancel_partition_job"]
    assert flex["on_failure_callback"] == ["cancel_partition_job"]


def test_manifest_sensors_wait_for_this_runs_commit(dag_render):
    gcs = dag_render["gcs_sensor"]
    assert (gcs["bucket"], gcs["object"]) == ("tf-bucket", f"out/date={EXPECTED_DATE}/{contract.MANIFEST_FILE}")
    assert datetime.datetime.fromisoformat(gcs["ts"]) == DAG_RUN_START  # updated after this DAG run started
    assert gcs["timeout"] > 0
    assert dag_render["local_sensor_args"] == [f"{EXPECTED_OUTPUT}/{contract.MANIFEST_FILE}"]
    # An older manifest (a previous run of the date) does not count, nor a missing one.
    assert dag_render["local_sensor_checks"] == {"missing": False, "older": False, "newer": True}


def _trainer_flags(args: list[str]):
    return train.parser().parse_args(args)  # the real trainer accepts them


def test_trainer_pod_runs_the_trainer_image_on_gpus(dag_render):
    pod = dag_render["pod"]
    assert pod["metadata"]["namespace"] == "ml"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "europe-docker.pkg.dev/proj-x/img/trainer:1"
    assert not container.get("command")  # the image's entrypoint: `tripletflow train`
    parsed = _trainer_flags(container["args"])
    assert (parsed.stats, parsed.output) == ([EXPECTED_OUTPUT], EXPECTED_MODEL)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"  # TRIPLETFLOW_TRAINER_GPUS
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["spec"]["tolerations"])


def test_production_report_pod_reports_the_committed_output_with_history(dag_render):
    """The Flex Template path's report: `tripletflow report` in the pipeline's image, once the manifest is there."""
    pod = dag_render["report_pod"]
    assert pod["metadata"]["namespace"] == "ml"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "europe-docker.pkg.dev/proj-x/img/tripletflow:1"  # TRIPLETFLOW_FLEX_IMAGE
    assert container["command"] == ["tripletflow"] and container["args"][0] == "report"
    parsed = report_entry.parser().parse_args(container["args"][1:])  # the real report CLI accepts them
    assert parsed.output == EXPECTED_OUTPUT
    assert parsed.fail_on_alert  # TRIPLETFLOW_REPORT_FAIL_ON_ALERT=1: alerts fail the task
    # The same history as nightly's own report on the dev path: every earlier date partition.
    assert parsed.history == nightly.history_root(ENV_DEFAULTS["TRIPLETFLOW_OUTPUT_TEMPLATE"]) == "gs://tf-bucket/out"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})  # a report needs no GPU


def test_trainer_vertex_ai_custom_job_spec(dag_render):
    vertex = dag_render["vertex"]
    assert (vertex["project_id"], vertex["region"]) == ("proj-x", "europe-west4")
    job = vertex["custom_job"]
    assert job["display_name"] == "tripletflow-20240501-train"
    (pool,) = job["job_spec"]["worker_pool_specs"]
    assert pool["replica_count"] == 1
    assert pool["machine_spec"]["accelerator_count"] == 2 and pool["machine_spec"]["accelerator_type"]
    assert pool["container_spec"]["image_uri"] == "europe-docker.pkg.dev/proj-x/img/trainer:1"
    parsed = _trainer_flags(pool["container_spec"]["args"])
    assert (parsed.stats, parsed.output) == ([EXPECTED_OUTPUT], EXPECTED_MODEL)


def test_dev_path_commands_parse_with_the_real_clis(dag_render):
    beam = dag_render["beam"]
    assert beam["runner"] == "FnApiRunner"
    command = beam["command"]
    assert command[:3] == [sys.executable, "-m", "pipelines.nightly"]  # the pipeline's own Python
    args, passthrough = nightly.parser().parse_known_args(command[3:])
    assert args.date == datetime.date.fromisoformat(EXPECTED_DATE)
    assert nightly.partition_paths(args.input_template, args.output_template, args.date) == (
        EXPECTED_INPUT,
        EXPECTED_OUTPUT,
    )
    assert "--runner=FnApiRunner" in passthrough and "--grid=2,13,13,5" in passthrough
    local = dag_render["train_local_command"]
    assert local[:4] == [sys.executable, "-m", "pipelines.cli", "train"]
    parsed = _trainer_flags(local[4:])
    assert (parsed.stats, parsed.output) == ([EXPECTED_OUTPUT], EXPECTED_MODEL)


def test_dev_path_runs_for_real_on_a_manual_trigger(tmp_path):
    """dag.test(): a manual run without a logical date processes yesterday's partition for real."""
    _require_airflow()
    from components import sample_data

    sample_data.generate(  # input only for the expected partition: any other date has nothing to read
        str(tmp_path / "in" / f"date={EXPECTED_DATE}"),
        sample_data.SampleOptions(examples=EXAMPLES, shards=2, grid=contract.GridSpec.parse(GRID, DIM)),
    )
    conf = {
        "launch": "beam_local",
        "input_template": str(tmp_path / "in" / "date={date}" / "*"),
        "output_template": str(tmp_path / "out" / "date={date}"),
        "grid": GRID,
        "dim": DIM,
        "train": False,
    }
    env = _airflow_env(tmp_path / "home", {"TF_CPP_MIN_LOG_LEVEL": "2"})
    out = _last_json_line(
        subprocess.run(
            [str(AIRFLOW_PYTHON), "-c", RUN_SCRIPT, str(DAG_FOLDER), DAG_ID, MANUAL_AT.isoformat(), json.dumps(conf)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
    )
    assert out["state"] == "success", out
    assert out["data_interval_start"] == "None"  # Airflow gave this run no data interval
    assert out["tasks"] == {
        "choose_launch": "success",
        "embedding_stats_local": "success",
        "wait_for_manifest_local": "success",
        "choose_trainer": "success",
        "embedding_stats_dataflow": "skipped",
        "wait_for_manifest_gcs": "skipped",
        "report_kubernetes": "skipped",
        "train_kubernetes": "skipped",
        "train_vertex_ai": "skipped",
        "train_local": "skipped",
    }
    published = tmp_path / "out" / f"date={EXPECTED_DATE}"
    manifest = json.loads((published / contract.MANIFEST_FILE).read_text())
    assert manifest["counts"]["records_in"] == EXAMPLES
    assert len(manifest["input_files"]) == 2 and all(f"date={EXPECTED_DATE}" in p for p in manifest["input_files"])
    examples = contract.listed_files(str(published), manifest, contract.EXAMPLES_DIR)
    assert pq.read_table(examples, partitioning=None).num_rows == EXAMPLES
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"date={EXPECTED_DATE}"]
    # The dev path's report is nightly's own (the production path's is report_kubernetes).
    assert (published / contract.REPORT_FILE).is_file()


# ---------------------------------------------------------------------------
# The trainer image (no Docker engine here: checked statically).
# ---------------------------------------------------------------------------
def test_trainer_dockerfile_installs_the_cuda_build_of_the_pinned_tensorflow():
    text = TRAINER_DOCKERFILE.read_text()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert re.search(r"^ARG PYTHON_VERSION=(\S+)$", text, re.M).group(1) == python
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim$", text, re.M)
    tf_version = re.search(r"^ARG TENSORFLOW_VERSION=(\S+)$", text, re.M).group(1)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"tensorflow=={tf_version}"' in pyproject  # the same TensorFlow as the project pins
    assert '"tensorflow[and-cuda]==${TENSORFLOW_VERSION}"' in text
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    copies = re.findall(r"^COPY (?!--from)(.+) (\S+)$", text, re.M)
    for sources, _ in copies:  # everything copied exists in the repository
        for source in sources.split():
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    for needed in ("pyproject.toml", "README.md", "schemas/", "components/", "pipelines/"):
        assert any(needed in sources.split() for sources, _ in copies), f"{needed} is not copied"
    assert re.search(rf"^RUN pip install .*{re.escape(workdir)}$", text, re.M)  # tripletflow from the repo
    assert re.search(r'^ENTRYPOINT \["tripletflow", "train"\]$', text, re.M)
    assert 'tripletflow = "pipelines.cli:main"' in pyproject  # the entrypoint's console script
