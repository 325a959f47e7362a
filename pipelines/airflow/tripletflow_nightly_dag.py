"""Airflow DAG `tripletflow_nightly`: EmbeddingStats on Dataflow for each day, then the trainer on request.

    embedding_stats  (BeamRunPythonPipelineOperator: `python -m pipelines.nightly --date={{ ds }}`
           |          on DataflowRunner, in the pipeline's own environment)
    should_train     (short circuit: goes on only when the run's param `train` is true)
           |
         train       (`python -m pipelines.cli train --stats <that day's output> --output <model dir>`)

Airflow lives in its own environment (.venv-airflow; its Google provider conflicts with
tfx-bsl), so the operator runs the pipeline with `py_interpreter` = the pipeline's Python:
env TRIPLETFLOW_PYTHON, default `<repo>/.venv/bin/python`. The GCP settings and path
templates are DAG params whose defaults come from the environment (TRIPLETFLOW_*), and can be
overridden per run (`airflow dags trigger tripletflow_nightly -c '{"train": true}'`).
Commands are argument lists, never shell strings.
"""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.sdk import DAG, Param, task
from airflow.timetables.interval import CronDataIntervalTimetable

DAG_ID = "tripletflow_nightly"
CRON = "0 3 * * *"  # 03:00 UTC daily, when yesterday's partition is complete
# Data-interval semantics: the run at 03:00 on day D covers [D-1 03:00, D 03:00), so its
# {{ ds }} is D-1, yesterday's partition (the default of `tripletflow nightly` too).
SCHEDULE = CronDataIntervalTimetable(CRON, timezone="UTC")
START_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)
RETRIES = 2  # per task, on top of nightly's own retry of a failed run
RETRY_DELAY = timedelta(minutes=10)
RUN_TIMEOUT = timedelta(hours=6)

REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINE_PYTHON = os.environ.get("TRIPLETFLOW_PYTHON", str(REPO_ROOT / ".venv" / "bin" / "python"))
NIGHTLY_MODULE = "pipelines.nightly"  # run as `python -m pipelines.nightly`
CLI_MODULE = "pipelines.cli"


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"TRIPLETFLOW_{name}", default)


PARAMS = {
    "project": Param(_env("GCP_PROJECT", "my-gcp-project"), type="string", description="GCP project of the Dataflow job"),
    "region": Param(_env("GCP_REGION", "us-central1"), type="string", description="Dataflow region"),
    "temp_location": Param(_env("TEMP_LOCATION", "gs://my-bucket/tmp"), type="string",
                           description="gs:// path for Dataflow's temporary files"),
    "input_template": Param(_env("INPUT_TEMPLATE", "gs://my-bucket/in/date={date}/*"), type="string",
                            description="input glob; {date} becomes the run's date (YYYY-MM-DD)"),
    "output_template": Param(_env("OUTPUT_TEMPLATE", "gs://my-bucket/out/date={date}"), type="string",
                             description="output directory; {date} becomes the run's date"),
    "model_template": Param(_env("MODEL_TEMPLATE", "gs://my-bucket/models/date={date}"), type="string",
                            description="trainer output directory; {date} becomes the run's date"),
    "grid": Param(_env("GRID", "2,13,13,5"), type="string", description="grid L,H,W,A"),
    "dim": Param(int(_env("DIM", "100")), type="integer", description="floats per box"),
    "runner": Param(_env("RUNNER", "DataflowRunner"), type="string",
                    description="Beam runner (DataflowRunner; FnApiRunner for a local run)"),
    "train": Param(False, type="boolean", description="train a head on the day's outputs after EmbeddingStats"),
}


def trainer_command(python: str, ds: str, output_template: str, model_template: str) -> list[str]:
    """The trainer's argument list for date `ds` (YYYY-MM-DD): reads that day's EmbeddingStats output."""
    return [python, "-m", CLI_MODULE, "train",
            "--stats", output_template.format(date=ds),
            "--output", model_template.format(date=ds)]


with DAG(
    dag_id=DAG_ID,
    description="EmbeddingStats on Dataflow for each day's partition, then the trainer when asked",
    schedule=SCHEDULE,
    start_date=START_DATE,
    catchup=False,  # use `tripletflow nightly --backfill FROM TO` for past dates
    max_active_runs=1,
    params=PARAMS,
    default_args={"retries": RETRIES, "retry_delay": RETRY_DELAY},
    tags=["tripletflow"],
) as dag:
    embedding_stats = BeamRunPythonPipelineOperator(
        task_id="embedding_stats",
        runner="{{ params.runner }}",
        py_interpreter=PIPELINE_PYTHON,
        py_options=["-m"],
        py_file=NIGHTLY_MODULE,
        pipeline_options={
            "date": "{{ ds }}",
            "input_template": "{{ params.input_template }}",
            "output_template": "{{ params.output_template }}",
            "grid": "{{ params.grid }}",
            "dim": "{{ params.dim }}",
            "temp_location": "{{ params.temp_location }}",
        },
        dataflow_config={
            "job_name": "tripletflow-{{ ds_nodash }}",
            "project_id": "{{ params.project }}",
            "location": "{{ params.region }}",
            "wait_until_finished": True,
        },
        execution_timeout=RUN_TIMEOUT,
    )

    @task.short_circuit(task_id="should_train")
    def should_train(params=None) -> bool:
        """Goes on to `train` only when the run asked for it (param `train`)."""
        return bool(params and params.get("train"))

    @task(task_id="train", execution_timeout=RUN_TIMEOUT)
    def train(ds=None, params=None) -> None:
        """Trains on the day's EmbeddingStats output, in the pipeline's environment."""
        command = trainer_command(PIPELINE_PYTHON, ds, params["output_template"], params["model_template"])
        subprocess.run(command, check=True)

    embedding_stats >> should_train() >> train()
