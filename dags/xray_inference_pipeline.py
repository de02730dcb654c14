"""Airflow DAG ``xray_inference_pipeline``: wiring only.

wait for new images -> preprocess (Spark) -> validate tensors -> plan the inference fan-out -> infer (one
mapped task per shard) -> drift -> validate predictions (drift gate) -> evaluate (with labels) -> publish
(Athena DDL on AWS) -> report -> maintain. ``CXR_PROFILE=local|aws`` (``SETTINGS.profile``) picks the
operators (``cxr.operators.stage_tasks``); what each task runs lives in ``cxr.tasks``, imported at run time.
"""

from __future__ import annotations

import shlex
from datetime import timedelta

from airflow.sdk import DAG, Asset, Param

from cxr import operators, tasks
from lakehouse.config import load_settings

SETTINGS = load_settings()  # environment only: no I/O

DOC = """
### Chest X-ray inference pipeline

Images (folder or `s3://`) -> **preprocess** (Spark: decode, normalise, crop, resize; Delta `tensors`,
failures to `quarantine`) -> **validate tensors** (Great Expectations; quarantine share gate) ->
**plan_infer** (counts the predictions to write from ids only, picks N shards) -> **infer**
(TorchXRayVision, one mapped task per shard, `cxr infer --shard i/N`, one run id; Delta `predictions`) ->
**drift** (PSI/KS against the reference run) ->
**validate predictions** (GX; the drift gate) -> **evaluate** (only with `labels_uri`: AUROC with CIs,
thresholds) -> **publish** (the audited versions become what every reader sees; Athena manifests on AWS) -> **report** (HTML) -> **maintain** (orphan data files
older than a day deleted, small files compacted). A failed validation stops the run (no
inference on failing tensors, nothing published, no report). Every stage is idempotent: a retry or
rerun adds no duplicates.

Params: `input_uri`, `lakehouse_uri`, `models`, `allow_untrained` (a random-init stand-in, marked in
every row), `weights_dir`, `labels_uri` and `labels_key` (optional evaluation), `thresholds` (`latest`: the
published site thresholds decide `positive_<pathology>`), `infer_shards` (0: auto, one shard per
`CXR_INFER_IMAGES_PER_TASK` predictions to write). Profile: `CXR_PROFILE=local` (spark-submit + local
processes or Docker) or
`aws` (EMR Serverless or an EMR cluster, ECS or AWS Batch, Athena). See README "Airflow".
"""

default_args = {
    "owner": "cxr",
    "retries": 2,
    "retry_delay": timedelta(seconds=SETTINGS.airflow.retry_delay_s),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "execution_timeout": timedelta(hours=6),
    "on_failure_callback": tasks.on_failure,
}

with DAG(
    dag_id=tasks.DAG_ID,
    description="X-rays -> Delta tensors -> GX -> TorchXRayVision -> Delta predictions -> report",
    doc_md=DOC,
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["cxr", "inference", "delta", "spark", f"profile:{SETTINGS.profile}"],
    default_args=default_args,
    user_defined_filters={"safe_id": tasks.safe_id, "shell_quote": shlex.quote},
    params={
        "input_uri": Param(
            operators.absolute(SETTINGS.input_uri or "data/samples"),
            type="string",
            description="images: folder or s3://",
        ),
        "lakehouse_uri": Param(
            operators.absolute(SETTINGS.lakehouse_uri or "data/lakehouse"),
            type="string",
            description="Delta tables: folder or s3://",
        ),
        "models": Param(list(tasks.DEFAULT_MODELS), type="array", description="TorchXRayVision weights names"),
        "allow_untrained": Param(False, type="boolean", description="random-init stand-in when no weights"),
        "weights_dir": Param("", type="string", description="folder in xrv's cache layout (air-gapped)"),
        "labels_uri": Param("", type="string", description="labels file: evaluate the run against it (optional)"),
        "thresholds": Param(
            "",
            type="string",
            description="'latest' or a thresholds version: add positive_<pathology> decisions (cxr evaluate --calibrate)",
        ),
        "labels_key": Param(
            "file_name",
            enum=["file_name", "image_id", "sop_instance_uid"],
            description="what the labels' key column holds",
        ),
        "infer_shards": Param(
            0,
            type="integer",
            minimum=0,
            maximum=SETTINGS.airflow.infer_max_shards,
            description="inference tasks (shards); 0 = auto: one per CXR_INFER_IMAGES_PER_TASK predictions to write",
        ),
    },
) as dag:
    t = operators.stage_tasks(
        SETTINGS.profile,
        tensors=Asset(name="cxr_tensors", uri="cxr://lakehouse/tensors"),
        predictions=Asset(name="cxr_predictions", uri="cxr://lakehouse/predictions"),
    )
    t.wait >> t.preprocess >> t.validate_tensors >> t.plan_infer >> t.infer >> t.drift >> t.validate_predictions
    t.validate_predictions >> t.evaluate >> t.publish
    if t.athena is not None:  # aws: the Athena tables are (re)declared before the report
        t.publish >> t.athena >> t.report
    else:
        t.publish >> t.report
    t.report >> t.maintain
