"""Airflow DAG ``xray_inference_pipeline``: wiring only.

wait for new images -> preprocess (Spark) -> validate tensors -> infer -> validate predictions ->
publish (Athena DDL on AWS) -> report. ``CXR_PROFILE=local|aws`` picks the operators; the stage code
lives in the ``cxr`` package (``lakehouse.orchestration``), imported by tasks at run time.
"""

from __future__ import annotations

import os
import shlex
from datetime import timedelta

from airflow.providers.standard.operators.python import PythonOperator
from airflow.providers.standard.sensors.python import PythonSensor
from airflow.sdk import DAG, Asset, Param

from lakehouse import orchestration as orch
from lakehouse.config import load_settings

PROFILE = os.environ.get("CXR_PROFILE", "local")
SETTINGS = load_settings()  # environment only: no I/O
RETRY_DELAY = timedelta(seconds=int(os.environ.get("CXR_RETRY_DELAY_S", "60")))

TENSORS = Asset(name="cxr_tensors", uri="cxr://lakehouse/tensors")
PREDICTIONS = Asset(name="cxr_predictions", uri="cxr://lakehouse/predictions")

P = "params"
LAKEHOUSE = "{{ params.lakehouse_uri }}"
PRE_RUN_ID = "pre-{{ run_id | safe_id }}"
INF_RUN_ID = "inf-{{ run_id | safe_id }}"

DOC = """
### Chest X-ray inference pipeline

Images (folder or `s3://`) -> **preprocess** (Spark: decode, normalise, crop, resize; Delta `tensors`,
failures to `quarantine`) -> **validate tensors** (Great Expectations; quarantine share gate) ->
**infer** (TorchXRayVision; Delta `predictions`) -> **validate predictions** -> **publish** (audited
versions recorded; Athena tables on AWS) -> **report** (HTML). A failed validation stops the run (no
inference on failing tensors, nothing published, no report). Every stage is idempotent: a retry or
rerun adds no duplicates.

Params: `input_uri`, `lakehouse_uri`, `models`, `allow_untrained` (a random-init stand-in, marked in
every row), `weights_dir`. Profile: `CXR_PROFILE=local` (spark-submit + a local process or Docker) or
`aws` (EMR Serverless or an EMR cluster, ECS, Athena). See README "Airflow".
"""

default_args = {
    "owner": "cxr",
    "retries": 2,
    "retry_delay": RETRY_DELAY,
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "execution_timeout": timedelta(hours=6),
    "on_failure_callback": orch.on_failure,
}

with DAG(
    dag_id=orch.DAG_ID,
    description="X-rays -> Delta tensors -> GX -> TorchXRayVision -> Delta predictions -> report",
    doc_md=DOC,
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["cxr", "inference", "delta", "spark", f"profile:{PROFILE}"],
    default_args=default_args,
    user_defined_filters={"safe_id": orch.safe_id, "shell_quote": shlex.quote},
    params={
        "input_uri": Param(
            orch.absolute(SETTINGS.input_uri or "data/samples"), type="string", description="images: folder or s3://"
        ),
        "lakehouse_uri": Param(
            orch.absolute(SETTINGS.lakehouse_uri or "data/lakehouse"),
            type="string",
            description="Delta tables: folder or s3://",
        ),
        "models": Param(list(orch.DEFAULT_MODELS), type="array", description="TorchXRayVision weights names"),
        "allow_untrained": Param(False, type="boolean", description="random-init stand-in when no weights"),
        "weights_dir": Param("", type="string", description="folder in xrv's cache layout (air-gapped)"),
    },
) as dag:
    if PROFILE == "aws":
        from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor

        wait = S3KeySensor(
            task_id="wait_for_images",
            bucket_key="{{ params.input_uri.rstrip('/') }}/*",
            wildcard_match=True,
            mode="reschedule",
            poke_interval=300,
            timeout=timedelta(hours=12).total_seconds(),
            soft_fail=True,
        )
    else:
        wait = PythonSensor(
            task_id="wait_for_images",
            python_callable=orch.new_images_waiting,
            op_kwargs={"input_uri": "{{ params.input_uri }}", "lakehouse_uri": LAKEHOUSE},
            mode="reschedule",
            poke_interval=int(os.environ.get("CXR_POKE_INTERVAL_S", "60")),
            timeout=int(os.environ.get("CXR_WAIT_TIMEOUT_S", str(6 * 3600))),
            soft_fail=True,  # nothing new: the run is skipped, not failed
        )

    preprocess_args = ["preprocess", "--input", "{{ params.input_uri }}", "--lakehouse", LAKEHOUSE]
    preprocess_args += ["--run-id", PRE_RUN_ID, "--no-progress"]
    if PROFILE == "aws":
        preprocess = orch.aws_preprocess_tasks(preprocess_args, outlets=[TENSORS])
    else:
        preprocess = orch.CxrSparkSubmitOperator(
            task_id="preprocess",
            application=orch.spark_application(),
            application_args=preprocess_args,
            conn_id=orch.SPARK_CONN_ID,
            name="cxr-preprocess",
            outlets=[TENSORS],
        )

    validate_tensors = PythonOperator(
        task_id="validate_tensors",
        python_callable=orch.validate_stage,
        op_kwargs={"lakehouse_uri": LAKEHOUSE, "tables": ["tensors", "quarantine"], "run_id": PRE_RUN_ID},
    )

    infer_flags = (  # models, stand-in and weights folder, each value shell-quoted when rendered
        "{% for m in params.models %} --model {{ m | shell_quote }}{% endfor %}"
        "{% if params.allow_untrained %} --allow-untrained{% endif %}"
        "{% if params.weights_dir %} --weights-dir {{ params.weights_dir | shell_quote }}{% endif %}"
    )
    if PROFILE == "aws":
        infer_args = ["infer", "--lakehouse", LAKEHOUSE, "--run-id", INF_RUN_ID, "--no-progress"]
        infer = orch.aws_infer_task(infer_args, outlets=[PREDICTIONS])
    elif orch.docker_available():
        infer = orch.docker_infer_task(LAKEHOUSE, INF_RUN_ID, infer_flags, outlets=[PREDICTIONS])
    else:
        infer = orch.process_infer_task(LAKEHOUSE, INF_RUN_ID, infer_flags, outlets=[PREDICTIONS])

    validate_predictions = PythonOperator(
        task_id="validate_predictions",
        python_callable=orch.validate_stage,
        # the models are those the inference run wrote (a stand-in's id says so: '<name>+untrained-random-init')
        op_kwargs={"lakehouse_uri": LAKEHOUSE, "tables": ["predictions"], "run_id": INF_RUN_ID},
    )

    publish = PythonOperator(
        task_id="publish",
        python_callable=orch.publish_stage,
        op_kwargs={"lakehouse_uri": LAKEHOUSE, "run_id": PRE_RUN_ID},
    )
    published = orch.aws_athena_tasks(LAKEHOUSE) if PROFILE == "aws" else None

    report = PythonOperator(
        task_id="report",
        python_callable=orch.report_stage,
        op_kwargs={"lakehouse_uri": LAKEHOUSE, "run_id": PRE_RUN_ID},
    )

    wait >> preprocess >> validate_tensors >> infer >> validate_predictions >> publish
    if published is not None:  # aws: the Athena tables are (re)declared before the report
        publish >> published >> report
    else:
        publish >> report
