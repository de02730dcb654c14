#!/bin/sh
# Amazon MWAA startup script (the environment's StartupScriptS3Path, `startup.sh` in the code bucket;
# `python -m infra.bundle` copies it to <bundle>/startup.sh). MWAA runs it on every scheduler, worker and web
# server before Airflow starts, and what it exports is in Airflow's environment, where lakehouse/config.py
# reads it when the DAG is parsed and when tasks run.
# https://docs.aws.amazon.com/mwaa/latest/userguide/using-startup-script.html
#
# A startup script cannot read stack outputs: the CDK stack (infra/orchestration.py) passes the deployment's
# values as Airflow configuration options `cxr.*`, which MWAA sets as AIRFLOW__CXR__* variables; they are
# copied to the CXR_* settings here. Everything else is the aws profile's committed defaults or an Airflow
# Variable (cxr_code_uri, cxr_emr_serverless_app_id, ...; see README "Airflow on AWS").
# CXR_PSEUDONYM_KEY is not exported: only the Spark job (on EMR) makes pseudonyms.
export CXR_PROFILE=aws
export CXR_EMR_MODE=serverless
# Each setting: MWAA's option AIRFLOW__CXR__<NAME> when set; else the CXR_<NAME> already in the
# environment; else the stack's copy in SSM (/cxr/settings/CXR_<NAME>), so that the DAG never falls back
# to a local default path on MWAA.
for name in INPUT_URI LAKEHOUSE_URI METRICS_NAMESPACE INFER_BACKEND; do
  eval "value=\${AIRFLOW__CXR__$name:-}"
  eval "current=\${CXR_$name:-}"
  if [ -z "$value" ] && [ -z "$current" ] && command -v aws >/dev/null 2>&1; then
    value=$(aws ssm get-parameter --name "/cxr/settings/CXR_$name" --query Parameter.Value --output text 2>/dev/null) \
      || value=""
  fi
  if [ -n "$value" ] && [ "$value" != "None" ]; then export "CXR_$name=$value"; fi
done
true  # an SSM miss leaves the setting unset; it does not fail MWAA's start
