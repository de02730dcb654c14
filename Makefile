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
SAMPLES ?= data/samples
LAKEHOUSE ?= data/lakehouse
COUNT ?= 34

.PHONY: help setup run sample test test-fast lint bench lock clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null \
	  || { echo "need $(PYTHON) 3.11-3.13 (set PYTHON=python3.x)"; exit 1; }
	test -x $(PIP) || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); } \
	  || { echo "cannot create a venv (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) check
	touch $(STAMP)

$(CLASSPATH_FILE): jvm/pom.xml
	@command -v java >/dev/null || { echo "need a Java 17+ runtime for Spark (Debian: apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "need Maven to resolve the Delta/S3A jars (Debian: apt-get install maven)"; exit 1; }
	cd jvm && mvn -q -B dependency:resolve && mvn -q -B dependency:build-classpath -Dmdep.outputFile=classpath.txt
	@echo "Spark jars resolved into the local Maven repository ($(CLASSPATH_FILE))"

CDS_ARCHIVE := jvm/cxr-classes.jsa
$(CDS_ARCHIVE): $(CLASSPATH_FILE) $(STAMP)
	@echo "recording a JVM class-data-sharing archive (Spark starts seconds faster afterwards)"
	@CXR_PSEUDONYM_KEY=setup $(PY) -c "from lakehouse.config import load_settings; from lakehouse.spark import record_cds_archive; print(record_cds_archive(load_settings()) or '(no archive made: Spark will start a little slower)')" 2>/dev/null \
	  || echo "(no archive made: Spark will start a little slower)"

setup: $(STAMP) $(CLASSPATH_FILE) $(CDS_ARCHIVE) ## create .venv, install everything (locked), resolve the Spark jars with Maven

sample: setup ## generate synthetic sample X-rays into $(SAMPLES)
	$(CXR) sample --output $(SAMPLES) --count $(COUNT) --include-invalid

run: sample ## the main job: sample images -> Spark preprocessing -> Delta tensors + quarantine
	$(CXR) preprocess --input $(SAMPLES) --lakehouse $(LAKEHOUSE)

test: setup ## run the whole test suite (slow tests included, as in CI)
	$(PY) -m pytest -q

test-fast: setup ## run the tests that need no Spark / S3 server
	$(PY) -m pytest -q -m "not slow"

lint: setup ## ruff + mypy
	$(VENV)/bin/ruff check lakehouse transforms inference expectations dags tests bench
	$(VENV)/bin/ruff format --check lakehouse transforms inference expectations dags tests bench
	$(VENV)/bin/mypy

bench: setup ## preprocessing and inference benchmarks (results -> docs/benchmarks.md by hand)
	$(PY) bench/preprocess.py
	$(PY) bench/infer.py

lock: ## re-resolve and rewrite constraints.txt from the current .venv
	$(PIP) freeze --exclude-editable > constraints.txt

clean: ## remove generated data (keeps .venv and the Maven repository)
	rm -rf data .pytest_cache
