"""Airflow DAG `tripletflow_nightly`: EmbeddingStats for each day's partition, then the trainer on request.

    choose_launch (branch on param `launch`)
      |- "flex_template" (production): embedding_stats_dataflow -> wait_for_manifest_gcs -> report_kubernetes
      |     DataflowStartFlexTemplateOperator, deferrable: the Flex Template job is launched
      |     (job name `tripletflow-<YYYYMMDD>`), its id is Airflow's (XCom `job_id`, job link),
      |     and the triggerer tracks it to JOB_STATE_DONE; the sensor then waits (deferrable)
      |     for the partition's MANIFEST.json to be updated after this DAG run started. The job
      |     writes no report (its launcher is gone by then): a pod of the Flex Template image
      |     runs `tripletflow report` on the committed output, earlier partitions as history.
      |- "beam_local" (dev): embedding_stats_local -> wait_for_manifest_local
      |     BeamRunPythonPipelineOperator: `python -m pipelines.nightly --date=<partition>
      |     --attempts=1` on FnApiRunner in the pipeline's own environment (nightly writes the
      |     report itself, history included), then the same check on the local MANIFEST.json's
      |     modification time.
    choose_trainer (branch: nothing unless param `train`; else on param `trainer_backend`)
      |- "kubernetes": train_kubernetes   (KubernetesPodOperator: the trainer image, GPU limit)
      |- "vertex_ai":  train_vertex_ai    (CreateCustomJobOperator: a Vertex AI CustomJob, GPU)
      |- "local":      train_local        (dev only: `tripletflow train` on the Airflow worker)

Partition date (macro `tripletflow_partition`, one rule for every task):
- param `partition_date` (YYYY-MM-DD) when given: re-runs that partition;
- else the date (UTC) of the run's data interval start. The schedule is 03:00 UTC with
  CronDataIntervalTimetable, so the scheduled run at D 03:00 covers [D-1 03:00, D 03:00):
  partition D-1, yesterday's, complete by then;
- a manual trigger with a logical date L gets from Airflow 3.3 the last complete interval
  before L (`infer_manual_data_interval(run_after=L)`; L = 2024-05-02 10:00 -> 2024-05-01);
- a manual trigger without a logical date (Airflow 3's default for `airflow dags trigger`
  and the API) has no data interval; the DAG then applies the timetable's own rule to the
  run's `run_after`: the last complete interval before the trigger time (10:00 -> yesterday;
  before 03:00 -> the day before yesterday, yesterday not being complete yet).
`{{ ds }}` is not used: in Airflow 3 a manual run's logical date is the trigger time, or none.

One job per partition at a time: the Dataflow job name is stable per partition
(`append_job_name=False`; Dataflow keeps one active job per name and region), each try
first cancels a still-active job of that name (an earlier try whose trigger timed out or
whose worker died: a deferred task's timeout does not cancel its job), and a failed or
retried try cancels its job too (callbacks). One attempt per Airflow try (`--attempts=1`
on the dev path; the Flex Template entry never retries); Airflow's `retries` retry.

Airflow lives in its own environment (.venv-airflow; its Google provider conflicts with
tfx-bsl): the dev path runs the pipeline with `py_interpreter` = the pipeline's Python (env
TRIPLETFLOW_PYTHON, default `<repo>/.venv/bin/python`). Per-run settings are DAG params
whose defaults come from the environment (TRIPLETFLOW_*); deployment settings (GPU count,
machine and accelerator types, Kubernetes service account) from the environment only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
from pathlib import Path

from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.google.cloud.hooks.dataflow import DataflowHook
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator
from airflow.providers.google.cloud.operators.vertex_ai.custom_job import CreateCustomJobOperator
from airflow.providers.google.cloud.sensors.gcs import GCSObjectUpdateSensor
from airflow.sdk import DAG, Param, PokeReturnValue, TriggerRule, task
from airflow.timetables.interval import CronDataIntervalTimetable
from kubernetes.client import models as k8s

DAG_ID = "tripletflow_nightly"
CRON = "0 3 * * *"  # 03:00 UTC daily, when yesterday's partition is complete
SCHEDULE = CronDataIntervalTimetable(CRON, timezone="UTC")
START_DATE = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
RETRIES = 2  # per task: each try is one attempt (no retry loop inside a try)
RETRY_DELAY = dt.timedelta(minutes=10)
RUN_TIMEOUT = dt.timedelta(hours=6)  # one EmbeddingStats try
TRAIN_TIMEOUT = dt.timedelta(hours=8)  # one training try
REPORT_TIMEOUT = dt.timedelta(hours=1)  # one report try: reads the summary and tables, draws figures
MANIFEST_WAIT = dt.timedelta(minutes=30)  # after the job is DONE its commit is there: a short wait
MANIFEST_POKE_S = 60
DATAFLOW_POLL_S = 60
CANCEL_TIMEOUT_S = 10 * 60  # how long a try waits for a stale job's cancellation
POD_STARTUP_TIMEOUT_S = 30 * 60  # a GPU node may have to be scaled up first

LAUNCH_FLEX_TEMPLATE, LAUNCH_BEAM_LOCAL = "flex_template", "beam_local"
TRAIN_KUBERNETES, TRAIN_VERTEX_AI, TRAIN_LOCAL = "kubernetes", "vertex_ai", "local"
DATE_PLACEHOLDER = "{date}"  # in the path templates: the partition date, YYYY-MM-DD
JOB_NAME_PREFIX = "tripletflow-"  # + YYYYMMDD: the Dataflow job name of a partition
MANIFEST_FILE = "MANIFEST.json"  # schemas/contract.py MANIFEST_FILE (Airflow cannot import it)
GPU_RESOURCE = "nvidia.com/gpu"  # the NVIDIA device plugin's extended resource

REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINE_PYTHON = os.environ.get("TRIPLETFLOW_PYTHON", str(REPO_ROOT / ".venv" / "bin" / "python"))
NIGHTLY_MODULE = "pipelines.nightly"  # run as `python -m pipelines.nightly`
CLI_MODULE = "pipelines.cli"

_LOG = logging.getLogger(__name__)


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"TRIPLETFLOW_{name}", default)


# Deployment settings of the trainer (not per run: they follow the cluster's node pools and quotas).
TRAINER_GPUS = int(_env("TRAINER_GPUS", "1"))
TRAINER_CPU, TRAINER_MEMORY = _env("TRAINER_CPU", "8"), _env("TRAINER_MEMORY", "32Gi")
REPORT_CPU, REPORT_MEMORY = _env("REPORT_CPU", "2"), _env("REPORT_MEMORY", "8Gi")  # the report pod (no GPU)
# "1": the report pod exits 4 (ExitCode.ALERT) when an alert fires, so the task fails and the night is red.
REPORT_FAIL_ON_ALERT = _env("REPORT_FAIL_ON_ALERT", "0") == "1"
K8S_SERVICE_ACCOUNT = _env("K8S_SERVICE_ACCOUNT") or None  # e.g. bound to a GCP one (Workload Identity)
K8S_GPU_NODE_SELECTOR = json.loads(
    _env("K8S_NODE_SELECTOR", "{}")
)  # e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}
VERTEX_MACHINE_TYPE = _env("VERTEX_MACHINE_TYPE", "g2-standard-8")
VERTEX_ACCELERATOR_TYPE = _env("VERTEX_ACCELERATOR_TYPE", "NVIDIA_L4")
VERTEX_SERVICE_ACCOUNT = _env("VERTEX_SERVICE_ACCOUNT")

PARAMS = {
    "launch": Param(
        _env("LAUNCH", LAUNCH_FLEX_TEMPLATE),
        enum=[LAUNCH_FLEX_TEMPLATE, LAUNCH_BEAM_LOCAL],
        description="flex_template: the Dataflow Flex Template (production); "
        "beam_local: Beam's local runner on the Airflow worker (dev)",
    ),
    "partition_date": Param(
        "",
        type="string",
        pattern=r"^(\d{4}-\d{2}-\d{2})?$",
        description="YYYY-MM-DD to (re)run that partition; empty: from the data interval",
    ),
    "project": Param(_env("GCP_PROJECT", "my-gcp-project"), type="string", description="GCP project of the jobs"),
    "region": Param(_env("GCP_REGION", "us-central1"), type="string", description="Dataflow and Vertex AI region"),
    "temp_location": Param(
        _env("TEMP_LOCATION", "gs://my-bucket/tmp"),
        type="string",
        description="gs:// path for Dataflow's temporary files",
    ),
    "template_path": Param(
        _env("FLEX_TEMPLATE", "gs://my-bucket/templates/tripletflow.json"),
        type="string",
        description="gs:// path of the Flex Template spec (gcloud dataflow flex-template build)",
    ),
    "flex_image": Param(
        _env("FLEX_IMAGE", "us-central1-docker.pkg.dev/my-gcp-project/tripletflow/tripletflow:0.1.0"),
        type="string",
        description="the Flex Template image, also the workers' SDK container",
    ),
    "input_template": Param(
        _env("INPUT_TEMPLATE", "gs://my-bucket/in/date={date}/*"),
        type="string",
        description="input glob; {date} becomes the partition date (YYYY-MM-DD)",
    ),
    "output_template": Param(
        _env("OUTPUT_TEMPLATE", "gs://my-bucket/out/date={date}"),
        type="string",
        description="output directory; {date} becomes the partition date",
    ),
    "model_template": Param(
        _env("MODEL_TEMPLATE", "gs://my-bucket/models/date={date}"),
        type="string",
        description="trainer output directory; {date} becomes the partition date",
    ),
    "grid": Param(_env("GRID", "2,13,13,5"), type="string", description="grid L,H,W,A"),
    "dim": Param(int(_env("DIM", "100")), type="integer", description="floats per box"),
    "distance": Param(_env("DISTANCE"), type="string", description="euclidean|squared|cosine; empty: the default"),
    "margin": Param(_env("MARGIN"), type="string", description="triplet margin; empty: the default"),
    "train": Param(False, type="boolean", description="train a head on the day's outputs after EmbeddingStats"),
    "trainer_backend": Param(
        _env("TRAINER_BACKEND", TRAIN_KUBERNETES),
        enum=[TRAIN_KUBERNETES, TRAIN_VERTEX_AI, TRAIN_LOCAL],
        description="kubernetes: a GPU pod; vertex_ai: a Vertex AI CustomJob; local: on the Airflow worker (dev)",
    ),
    "trainer_image": Param(
        _env("TRAINER_IMAGE", "us-central1-docker.pkg.dev/my-gcp-project/tripletflow/trainer:0.1.0"),
        type="string",
        description="image of pipelines/trainer/Dockerfile",
    ),
    "k8s_namespace": Param(
        _env("K8S_NAMESPACE", "tripletflow"), type="string", description="Kubernetes namespace of the trainer pod"
    ),
}


# ---------------------------------------------------------------------------
# Partition date and paths (also the DAG's Jinja macros).
# ---------------------------------------------------------------------------
def partition_date(override: str, data_interval_start, run_after) -> str:
    """The run's partition, YYYY-MM-DD: `override`, else the data interval's start date (UTC).

    A run without a data interval (an Airflow 3 manual trigger without a logical date) takes
    the last complete interval before its `run_after`, the timetable's own manual rule.
    """
    if override:
        return dt.date.fromisoformat(override).isoformat()
    if not data_interval_start:
        data_interval_start = SCHEDULE.infer_manual_data_interval(run_after=run_after).start
    return data_interval_start.astimezone(dt.timezone.utc).date().isoformat()


def partition_path(template: str, date: str) -> str:
    """A path template with {date} replaced by the partition date."""
    return template.replace(DATE_PLACEHOLDER, date)


def history_root(template: str) -> str:
    """The folder of every date's partition: the template cut before its {date} segment.

    pipelines/nightly.py history_root, the dev path's report history (Airflow cannot import it).
    """
    return template[: template.index(DATE_PLACEHOLDER)].rsplit("/", 1)[0]


def gcs_bucket(uri: str) -> str:
    """gs://bucket/a/b -> bucket."""
    if not uri.startswith("gs://"):
        raise ValueError(f"not a gs:// path: {uri!r}")
    return uri[len("gs://") :].split("/", 1)[0]


def gcs_object(uri: str) -> str:
    """gs://bucket/a/b -> a/b."""
    gcs_bucket(uri)
    return uri[len("gs://") :].split("/", 1)[1]


# Macro names are prefixed: Airflow 3.3's context has its own `partition_date` (asset partitions).
MACROS = {
    "tripletflow_partition": partition_date,
    "tripletflow_path": partition_path,
    "tripletflow_history": history_root,
    "gcs_bucket": gcs_bucket,
    "gcs_object": gcs_object,
}
_PARTITION = "tripletflow_partition(params.partition_date, dag_run.data_interval_start, dag_run.run_after)"
PARTITION = "{{ " + _PARTITION + " }}"
JOB_NAME = JOB_NAME_PREFIX + "{{ " + _PARTITION + " | replace('-', '') }}"


def _for_partition(param: str, suffix: str = "") -> str:
    """Jinja: the path template `params.<param>` for the run's partition, + suffix."""
    return "{{ tripletflow_path(params.%s, %s) }}%s" % (param, _PARTITION, suffix)


INPUT, OUTPUT, MODEL = (
    _for_partition("input_template"),
    _for_partition("output_template"),
    _for_partition("model_template"),
)
MANIFEST = _for_partition("output_template", "/" + MANIFEST_FILE)
TRAINER_ARGS = ["--stats", OUTPUT, "--output", MODEL]  # `tripletflow train` flags (the image's entrypoint)
HISTORY = "{{ tripletflow_history(params.output_template) }}"
REPORT_ARGS = [  # after `tripletflow`
    "report",
    "--output",
    OUTPUT,
    "--history",
    HISTORY,
    *(["--fail-on-alert"] if REPORT_FAIL_ON_ALERT else []),
]


def trainer_command(python: str) -> list[str]:
    """The local trainer's command (templated args): `python -m pipelines.cli train ...`."""
    return [python, "-m", CLI_MODULE, "train", *TRAINER_ARGS]


def dag_run_start(context) -> dt.datetime:
    """The moment this DAG run started: a manifest updated after it was written by this run's job."""
    return context["dag_run"].start_date


def manifest_committed_since(path: str, since: dt.datetime) -> bool:
    """True when the local MANIFEST.json at `path` exists and was written after `since`."""
    try:
        written = os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    return written > since.timestamp()


# ---------------------------------------------------------------------------
# The Flex Template launch: one active job per partition.
# ---------------------------------------------------------------------------
class PartitionFlexTemplateOperator(DataflowStartFlexTemplateOperator):
    """The Flex Template operator for one partition's job: stable job name, no stale job left running.

    Before launching, cancels any still-active job of the same name (an earlier try's);
    parameters rendered empty are left out, so the template's own default applies.
    """

    def __init__(self, **kwargs):
        super().__init__(append_job_name=False, deferrable=True, cancel_on_kill=True, **kwargs)

    def launch_body(self) -> dict:
        """The rendered body with empty parameters removed (what is sent to flexTemplates.launch)."""
        launch = dict(self.body["launchParameter"])
        launch["parameters"] = {k: v for k, v in launch["parameters"].items() if str(v) != ""}
        return {**self.body, "launchParameter": launch}

    @property
    def job_name(self) -> str:
        return self.body["launchParameter"]["jobName"]

    def cancel_active_job(self) -> None:
        """Cancels (and waits up to cancel_timeout for) any non-terminal job named like this partition's."""
        hook = DataflowHook(
            gcp_conn_id=self.gcp_conn_id,
            impersonation_chain=self.impersonation_chain,
            poll_sleep=self.poll_sleep,
            cancel_timeout=self.cancel_timeout,
            drain_pipeline=False,
        )
        hook.cancel_job(job_name=self.job_name, project_id=self.project_id, location=self.location)

    def execute(self, context):
        self.body = self.launch_body()
        self.cancel_active_job()
        return super().execute(context)


def cancel_partition_job(context) -> None:
    """Task callback (retry, failure): a try that ends leaves no job of its partition running."""
    try:
        context["task"].cancel_active_job()
    except Exception:  # a callback must not hide the task's own error; the next try cancels again
        _LOG.exception("could not cancel the Dataflow job of this partition")


# ---------------------------------------------------------------------------
# The DAG.
# ---------------------------------------------------------------------------
with DAG(
    dag_id=DAG_ID,
    description="EmbeddingStats for each day's partition (Dataflow Flex Template or local), then the trainer",
    schedule=SCHEDULE,
    start_date=START_DATE,
    catchup=False,  # past dates: `airflow backfill create` or param partition_date
    max_active_runs=1,
    params=PARAMS,
    user_defined_macros=MACROS,
    default_args={"retries": RETRIES, "retry_delay": RETRY_DELAY},
    tags=["tripletflow"],
    doc_md=__doc__,
) as dag:

    @task.branch(task_id="choose_launch")
    def choose_launch(params=None) -> str:
        """The EmbeddingStats task of param `launch`."""
        return {LAUNCH_FLEX_TEMPLATE: "embedding_stats_dataflow", LAUNCH_BEAM_LOCAL: "embedding_stats_local"}[
            params["launch"]
        ]

    embedding_stats_dataflow = PartitionFlexTemplateOperator(
        task_id="embedding_stats_dataflow",
        project_id="{{ params.project }}",
        location="{{ params.region }}",
        body={
            "launchParameter": {
                "jobName": JOB_NAME,
                "containerSpecGcsPath": "{{ params.template_path }}",
                # pipelines/dataflow/metadata.json's parameters
                "parameters": {
                    "input": INPUT,
                    "output": OUTPUT,
                    "grid": "{{ params.grid }}",
                    "dim": "{{ params.dim }}",
                    "distance": "{{ params.distance }}",
                    "margin": "{{ params.margin }}",
                },
                "environment": {
                    "tempLocation": "{{ params.temp_location }}",
                    "sdkContainerImage": "{{ params.flex_image }}",
                    "additionalExperiments": ["use_runner_v2"],
                    "additionalUserLabels": {"airflow-dag": DAG_ID, "partition": PARTITION},
                },
            }
        },
        drain_pipeline=False,  # a batch job: cancel, never drain
        cancel_timeout=CANCEL_TIMEOUT_S,
        poll_sleep=DATAFLOW_POLL_S,
        execution_timeout=RUN_TIMEOUT,
        on_retry_callback=cancel_partition_job,
        on_failure_callback=cancel_partition_job,
    )

    wait_for_manifest_gcs = GCSObjectUpdateSensor(
        task_id="wait_for_manifest_gcs",
        bucket="{{ gcs_bucket(tripletflow_path(params.output_template, %s)) }}" % _PARTITION,
        object="{{ gcs_object(tripletflow_path(params.output_template, %s)) }}/%s" % (_PARTITION, MANIFEST_FILE),
        ts_func=dag_run_start,
        deferrable=True,
        poke_interval=MANIFEST_POKE_S,
        timeout=MANIFEST_WAIT.total_seconds(),
    )

    embedding_stats_local = BeamRunPythonPipelineOperator(
        task_id="embedding_stats_local",
        runner="FnApiRunner",
        py_interpreter=PIPELINE_PYTHON,
        py_options=["-m"],
        py_file=NIGHTLY_MODULE,
        pipeline_options={
            "date": PARTITION,
            "attempts": 1,  # one attempt per Airflow try
            "input_template": "{{ params.input_template }}",
            "output_template": "{{ params.output_template }}",
            "grid": "{{ params.grid }}",
            "dim": "{{ params.dim }}",
        },
        execution_timeout=RUN_TIMEOUT,
    )

    @task.sensor(
        task_id="wait_for_manifest_local",
        poke_interval=MANIFEST_POKE_S,
        timeout=MANIFEST_WAIT.total_seconds(),
        mode="reschedule",
    )
    def wait_for_manifest_local(manifest: str, dag_run=None) -> PokeReturnValue:
        """Done once the local MANIFEST.json was written after this DAG run started."""
        return PokeReturnValue(is_done=manifest_committed_since(manifest, dag_run.start_date))

    report_kubernetes = KubernetesPodOperator(
        task_id="report_kubernetes",
        name="tripletflow-report",
        namespace="{{ params.k8s_namespace }}",
        image="{{ params.flex_image }}",  # has tripletflow and its report stack; its entrypoint is Beam's boot
        cmds=["tripletflow"],
        arguments=REPORT_ARGS,
        container_resources=k8s.V1ResourceRequirements(
            requests={"cpu": REPORT_CPU, "memory": REPORT_MEMORY}, limits={"memory": REPORT_MEMORY}
        ),
        service_account_name=K8S_SERVICE_ACCOUNT,  # reads the output and writes report.html beside it
        labels={"app": "tripletflow-report"},
        deferrable=True,
        get_logs=True,
        on_finish_action="delete_pod",
        startup_timeout_seconds=POD_STARTUP_TIMEOUT_S,
        execution_timeout=REPORT_TIMEOUT,
    )

    @task.branch(task_id="choose_trainer", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def choose_trainer(params=None) -> list[str]:
        """Nothing unless param `train`; else the trainer task of param `trainer_backend`."""
        return [f"train_{params['trainer_backend']}"] if params["train"] else []

    train_kubernetes = KubernetesPodOperator(
        task_id="train_kubernetes",
        name="tripletflow-train",
        namespace="{{ params.k8s_namespace }}",
        image="{{ params.trainer_image }}",
        arguments=TRAINER_ARGS,  # after the image's entrypoint, `tripletflow train`
        container_resources=k8s.V1ResourceRequirements(
            requests={"cpu": TRAINER_CPU, "memory": TRAINER_MEMORY},
            limits={GPU_RESOURCE: str(TRAINER_GPUS), "memory": TRAINER_MEMORY},
        ),
        # GPU nodes carry this taint (GKE adds it); the pod tolerates it and selects them.
        tolerations=[k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")],
        node_selector=K8S_GPU_NODE_SELECTOR or None,
        service_account_name=K8S_SERVICE_ACCOUNT,
        labels={"app": "tripletflow-trainer"},
        deferrable=True,
        get_logs=True,
        on_finish_action="delete_pod",
        startup_timeout_seconds=POD_STARTUP_TIMEOUT_S,
        execution_timeout=TRAIN_TIMEOUT,
    )

    train_vertex_ai = CreateCustomJobOperator(
        task_id="train_vertex_ai",
        project_id="{{ params.project }}",
        region="{{ params.region }}",
        custom_job={
            "display_name": JOB_NAME + "-train",
            "job_spec": {
                "worker_pool_specs": [
                    {
                        "machine_spec": {
                            "machine_type": VERTEX_MACHINE_TYPE,
                            "accelerator_type": VERTEX_ACCELERATOR_TYPE,
                            "accelerator_count": TRAINER_GPUS,
                        },
                        "replica_count": 1,
                        # image_uri's entrypoint is `tripletflow train`: args only
                        "container_spec": {"image_uri": "{{ params.trainer_image }}", "args": TRAINER_ARGS},
                    }
                ],
                **({"service_account": VERTEX_SERVICE_ACCOUNT} if VERTEX_SERVICE_ACCOUNT else {}),
            },
            "labels": {"airflow-dag": DAG_ID, "partition": PARTITION},
        },
        deferrable=True,
        execution_timeout=TRAIN_TIMEOUT,
    )

    @task(task_id="train_local", execution_timeout=TRAIN_TIMEOUT)
    def train_local(command: list[str]) -> None:
        """Dev only: trains on the Airflow worker, in the pipeline's environment (no GPU there, as a rule)."""
        subprocess.run(command, check=True)

    launch = choose_launch()
    local_manifest = wait_for_manifest_local(MANIFEST)
    trainer = choose_trainer()
    launch >> embedding_stats_dataflow >> wait_for_manifest_gcs >> [trainer, report_kubernetes]
    launch >> embedding_stats_local >> local_manifest >> trainer
    trainer >> [train_kubernetes, train_vertex_ai, train_local(trainer_command(PIPELINE_PYTHON))]
