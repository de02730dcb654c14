"""The inference image's entrypoint, run as a process with the environment the Dockerfile sets
(no Docker engine here: the image itself is built in CI/CD, this checks the command it runs)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lakehouse.config import Settings
from lakehouse.delta_rs import read_arrow
from lakehouse.tables import PREDICTIONS
from tests.conftest import MODEL, write_tensors_table
from transforms.sample import write_samples

DOCKERFILE = Path(__file__).resolve().parent.parent / "inference" / "Dockerfile"


def _image_contract() -> tuple[list[str], dict[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", text, re.M):
        for item in shlex.split(line):
            k, _, v = item.partition("=")
            env[k] = v
    return entrypoint, env


def test_dockerfile_is_small_and_runs_as_non_root() -> None:
    text = DOCKERFILE.read_text()
    assert "FROM python:${PYTHON_VERSION}-slim" in text and "\nUSER cxr\n" in text
    assert "constraints" in text and "TORCH_VARIANT" in text and "BAKE_WEIGHTS" in text
    entrypoint, env = _image_contract()
    assert entrypoint == ["cxr", "infer"] and env["CXR_PROFILE"] == "aws"
    # the image ships the CLI, the ground floor and the inference job: no Spark job, no GX suites
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    assert copied == {"cxr", "lakehouse", "inference"}, copied


#: run as sitecustomize in the entrypoint's process: the packages the image does not ship cannot be imported
NOT_IN_IMAGE = """
import sys
class _NotInImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"transforms", "expectations", "dags", "pyspark", "airflow", "great_expectations"}:
            raise ImportError(f"{name} is not in the inference image")
        return None
sys.meta_path.insert(0, _NotInImage())
"""


@pytest.mark.slow
def test_entrypoint_runs_with_the_image_environment(tmp_path: Path, checkpoint: Path, settings: Settings) -> None:
    files = write_samples(tmp_path / "in", count=3, seed=3)
    n = write_tensors_table(tmp_path / "lake", files, settings)
    entrypoint, image_env = _image_contract()
    env = {k: v.replace("/home/cxr", str(tmp_path / "home")) for k, v in image_env.items()}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CXR_")}, **env}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NOT_IN_IMAGE)
    env["PYTHONPATH"] = str(tmp_path / "site")
    args = [
        "--lakehouse",
        str(tmp_path / "lake"),
        "--weights-dir",
        str(checkpoint.parent),
        "--device",
        "cpu",
        "--json",
        "--no-progress",
    ]
    r = subprocess.run([*entrypoint, *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)[0]
    assert (summary["model_id"], summary["predicted"], summary["untrained"]) == (MODEL, n, False)
    assert read_arrow(str(tmp_path / "lake"), PREDICTIONS, settings).num_rows == n
