#!/usr/bin/env bash
# Packs the Python environment EMR runs the Spark job with: <bundle>/code/cxr-env.tar.gz, which the DAG hands
# to spark-submit as `spark.archives=<cxr_code_uri>/cxr-env.tar.gz#environment`.
#
# The venv must be built on the OS EMR runs (Amazon Linux 2023) with the job's Python (infra/versions.py
# JOB_PYTHON): a venv-pack archive holds compiled wheels and links to the interpreter, so one built on the
# developer's machine does not run on EMR. It therefore runs in Docker, and only in the deploy workflow:
# `make test` never calls it (the test machines have no Docker daemon).
#
# Usage (from the repository root, after `python -m infra.bundle --out DIR`):
#   infra/mwaa/build_spark_env.sh [DIR]       # DIR defaults to infra/build
# Installs <bundle>/code/<wheel>[spark] pinned by the repo lock (constraints.txt) into /env, then venv-pack.
set -euo pipefail

out="$(cd "${1:-infra/build}" && pwd)"
python_version="${JOB_PYTHON:-3.12}"
image="${BUILD_IMAGE:-public.ecr.aws/amazonlinux/amazonlinux:2023}"
shopt -s nullglob
wheels=("$out"/code/cxr_lakehouse-*.whl)
if [ "${#wheels[@]}" -ne 1 ]; then
    echo "expected exactly one cxr_lakehouse wheel in $out/code (run: python -m infra.bundle --out $out)" >&2
    exit 1
fi
wheel="$(basename "${wheels[0]}")"

docker run --rm --platform linux/amd64 \
    -v "$PWD/constraints.txt:/src/constraints.txt:ro" -v "$out/code:/out" \
    -e PY="python$python_version" -e WHEEL="$wheel" -e OWNER="$(id -u):$(id -g)" \
    "$image" bash -euo pipefail -c '
        dnf install -y -q "$PY" "$PY-pip" tar gzip
        "$PY" -m venv /env
        "$PY" -m venv /tools
        /tools/bin/pip install -q venv-pack==0.2.0
        /env/bin/pip install -q --no-cache-dir -c /src/constraints.txt "/out/$WHEEL[spark]"
        rm -f /out/cxr-env.tar.gz
        /tools/bin/venv-pack -p /env -o /out/cxr-env.tar.gz
        chown "$OWNER" /out/cxr-env.tar.gz
    '
echo "wrote $out/code/cxr-env.tar.gz"
