"""The exploration notebook: committed without outputs, and executed (nbclient, the venv's python3
kernel) against the lakehouse the real stages built, from a folder and from S3."""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lakehouse.config import Settings
from tests.conftest import MODEL, TEST_KEY, make_bucket, upload_dir

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "exploration.ipynb"


def _read() -> Any:
    import nbformat

    return nbformat.read(NOTEBOOK, as_version=4)


def test_committed_notebook_has_no_outputs() -> None:
    import nbformat

    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 8
    assert [(c.id, c.outputs, c.execution_count) for c in code] == [(c.id, [], None) for c in code]
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_notebook_goes_through_the_package() -> None:
    """No engine or storage client of its own: SQL, Delta and S3 access come from the package."""
    source = "\n".join(c.source for c in _read().cells if c.cell_type == "code")
    for forbidden in ("import duckdb", "deltalake", "boto3", "matplotlib", "pyarrow.dataset", "DeltaTable"):
        assert forbidden not in source
    for used in ("cxr.sql import", "run_saved(", "read_table(", "decode_tensor(", "read_bytes("):
        assert used in source


def _cell(nb: Any, tag: str) -> Any:
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


def _text(cell: Any) -> str:
    parts = []
    for o in cell.outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif "text/plain" in o.get("data", {}):
            parts.append(o.data["text/plain"])
    return "\n".join(parts)


@pytest.fixture(scope="module")
def evaluated_lakehouse(built_lakehouse: Path, tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Path:
    """The built lakehouse after the DAG's drift and evaluate steps (labels by file name), published."""
    import shutil

    import pandas as pd

    from cxr.drift import compute_drift
    from cxr.evaluate import evaluate
    from lakehouse.delta_rs import read_arrow
    from lakehouse.publish import publish
    from lakehouse.tables import TENSORS

    lake = Path(shutil.copytree(built_lakehouse, tmp_path_factory.mktemp("notebook") / "lake"))
    names = sorted(
        u.rsplit("/", 1)[-1] for u in read_arrow(str(lake), TENSORS, settings).column("source_uri").to_pylist()
    )
    labels = pd.DataFrame(
        {"file_name": names, "pathology": "Cardiomegaly", "label": [k % 2 for k in range(len(names))]}
    )
    labels.to_csv(lake.parent / "labels.csv", index=False)
    evaluate(str(lake), str(lake.parent / "labels.csv"), settings=settings, key="file_name", n_bootstrap=50)
    compute_drift(str(lake), settings=settings, run_id="inf-test")
    publish(str(lake), settings, run_id="pre-test", infer_run_id="inf-test")
    return lake


@pytest.mark.slow
@pytest.mark.parametrize("where", ["folder", "s3"])
def test_notebook_executes_against_built_lakehouse(
    where: str,
    evaluated_lakehouse: Path,
    samples_dir: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nbclient import NotebookClient
    from PIL import Image

    from transforms.sample import INVALID_KINDS, VALID_KINDS

    built_lakehouse = evaluated_lakehouse
    uri = str(built_lakehouse)
    if where == "s3":
        uri = make_bucket(settings, "cxr-notebook") + "/lake"
        upload_dir(settings, built_lakehouse, uri)
    monkeypatch.setenv("CXR_LAKEHOUSE_URI", uri)
    monkeypatch.setenv("CXR_S3_ENDPOINT_URL", settings.s3_endpoint_url)
    monkeypatch.setenv("CXR_PSEUDONYM_KEY", TEST_KEY)

    nb = _read()
    NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    assert [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"] == []

    assert f"lakehouse: {uri}" in _text(_cell(nb, "setup"))
    assert f"{len(VALID_KINDS)} images in tensors" in _text(_cell(nb, "counts"))

    # the first four images by image_id (sha256 of the source bytes), each shown beside its tensor
    valid = [p for p in samples_dir.rglob("*") if p.is_file() and not {"invalid", "not_radiographs"} & set(p.parts)]
    first = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in valid)[:4]
    images = _cell(nb, "images")
    shown = [line.split()[0] for line in _text(images).splitlines() if "-> tensor [1, 224, 224]" in line]
    assert shown == [h[:12] for h in first]
    pngs = [
        Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
        for o in images.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(pngs) == 4
    assert all(p.height == 224 and p.width > 224 + 8 for p in pngs)  # source thumbnail + gap + 224-px tensor

    dist = _text(_cell(nb, "distributions"))
    assert f"{len(VALID_KINDS)} predictions from 1 model(s)" in dist
    assert MODEL in _text(_cell(nb, "positives"))

    evaluation = _text(_cell(nb, "evaluation"))
    assert "18 model x pathology rows in the latest evaluation" in evaluation and "Cardiomegaly" in evaluation
    assert "drift of run inf-test: no_reference 30" in _text(_cell(nb, "drift"))

    quarantine = _text(_cell(nb, "quarantine"))
    for error_class, n in Counter(cls for _, _, cls in INVALID_KINDS.values()).items():
        assert re.search(rf"pre-test\s+preprocess\s+{error_class}\s+{n}\s*$", quarantine, re.MULTILINE), error_class
