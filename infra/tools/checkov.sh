#!/usr/bin/env bash
# Installs checkov, the IaC scanner tests/infra/test_static_checks.py runs over the synthesized templates, into
# its own venv .tools/checkov-venv: checkov pins an old boto3 that the project's venv must not get. Idempotent:
# a venv whose stamp names the pinned version is kept. Usage:
#   bash infra/tools/checkov.sh        # prints the checkov path on its last line
#
# Installing takes a couple of minutes (PyPI). Python: $CHECKOV_PYTHON, else python3 (3.9-3.12).
# Exit status: 0 installed, 1 any failure.
set -euo pipefail

CHECKOV_VERSION=3.3.30

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$root/.tools/checkov-venv"
stamp="$venv/.installed"
checkov="$venv/bin/checkov"

if [ -x "$checkov" ] && [ "$(cat "$stamp" 2>/dev/null)" = "checkov==$CHECKOV_VERSION" ]; then
  echo "$checkov"
  exit 0
fi

python="${CHECKOV_PYTHON:-python3}"
rm -rf "$venv"
mkdir -p "$root/.tools"
echo "installing checkov==$CHECKOV_VERSION into $venv with $("$python" --version 2>&1)" >&2
"$python" -m venv "$venv" || { echo "infra/tools/checkov.sh: $python -m venv failed" >&2; exit 1; }
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION" >&2 \
  || { echo "infra/tools/checkov.sh: pip install checkov==$CHECKOV_VERSION failed (is PyPI reachable?)" >&2; exit 1; }
"$checkov" --version >/dev/null || { echo "infra/tools/checkov.sh: $checkov does not run" >&2; exit 1; }
echo "checkov==$CHECKOV_VERSION" >"$stamp"
echo "$checkov"
