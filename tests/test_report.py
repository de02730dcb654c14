"""`cxr report`: the HTML run report of a lakehouse built by the real stages.

Numbers in the HTML are checked against the run summaries and the Delta tables read independently
(deltalake directly), and against what the sample set is known to hold; the page is rendered in headless
Chromium and the screenshot checked for content and for the untrained-model banner.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cxr.report import BANNER_RGB, build_report, write_report
from lakehouse.config import Settings
from lakehouse.errors import CxrError
from lakehouse.tables import PATHOLOGY_COLUMNS
from tests.conftest import MODEL, make_bucket, upload_dir
from transforms.sample import INVALID_KINDS, SKIPPED_KINDS, VALID_KINDS

pytestmark = pytest.mark.slow  # every test needs the built lakehouse (Spark + inference)

TOP = 5  # fewer than the 17 images: the cap shows
UNTRAINED = MODEL + "+untrained-random-init"
SECTIONS = {
    "summary": "Run summary",
    "quarantine": "Quarantine reasons",
    "lakehouse-totals": "Lakehouse totals",
    "models": "Models and weights",
    "distributions": "Score distributions",
    "top-images": "Highest-scoring images per finding",
    "validation": "Validation",
}


# --- helpers ------------------------------------------------------------------------------------------
class Page(HTMLParser):
    """Every element with its attributes and its text content (a small DOM for assertions)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[dict[str, Any]] = []
        self._open: list[dict[str, Any]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": [e["attrs"] for e in self._open]}
        self.elements.append(el)
        if tag not in ("img", "meta", "br", "line", "rect", "input"):
            self._open.append(el)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data: str) -> None:
        for el in self._open:
            el["text"] += data

    def find(self, **attrs: str) -> list[dict[str, Any]]:
        """Elements whose attributes include all of ``attrs`` (underscores in names become hyphens)."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [e for e in self.elements if all(e["attrs"].get(k) == v for k, v in want.items())]

    def one(self, **attrs: str) -> str:
        """The stripped text of the single element with these attributes."""
        found = self.find(**attrs)
        assert len(found) == 1, (attrs, len(found))
        return " ".join(found[0]["text"].split())

    def number(self, **attrs: str) -> int:
        return int(self.one(**attrs).replace(",", ""))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _table(lake: Path, name: str, columns: list[str]) -> Any:
    from deltalake import DeltaTable

    return DeltaTable(str(lake / name)).to_pyarrow_table(columns=columns)


def _screenshot(html_path: Path, png: Path) -> np.ndarray:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):  # .ci/run installs it: a CI run must not skip the rendering check
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={png}",
        "--window-size=1280,2400",
        html_path.resolve().as_uri(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), r.stderr[-2000:]
    from PIL import Image

    return np.asarray(Image.open(png).convert("RGB"))


def _banner_pixels(img: np.ndarray) -> int:
    return int((np.abs(img.astype(int) - np.array(BANNER_RGB)).max(axis=2) <= 6).sum())


# --- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lake(built_lakehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy(built_lakehouse, tmp_path_factory.mktemp("report") / "lake")


@pytest.fixture(scope="module")
def report(lake: Path, settings: Settings) -> tuple[Path, Page, str]:
    uri = write_report(str(lake), settings=settings, top=TOP)
    assert uri == str(lake / "reports" / "report.html")
    html = Path(uri).read_text()
    return Path(uri), Page(html), html


@pytest.fixture(scope="module")
def untrained(built_lakehouse: Path, tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> tuple[Path, Page]:
    """A copy where a second set of predictions comes from the untrained stand-in (no weights anywhere)."""
    from inference.job import run_infer
    from lakehouse.publish import publish

    root = tmp_path_factory.mktemp("untrained")
    lake = _copy(built_lakehouse, root / "lake")
    empty = root / "no-weights"
    empty.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_WEIGHTS_BASE_URL", "http://127.0.0.1:9/unreachable")
        mp.setattr("torchxrayvision.utils.get_cache_dir", lambda: str(root / "empty-cache"))
        s = run_infer(
            str(lake),
            settings=settings,
            model_id=MODEL,
            allow_untrained=True,
            weights_dir=str(empty),
            run_id="inf-untrained",
            device="cpu",
            progress=False,
        )
    assert s.untrained and s.model_id == UNTRAINED
    publish(str(lake), settings, run_id="pre-test", infer_run_id="inf-untrained")  # the DAG's next step
    uri = write_report(str(lake), settings=settings, top=TOP)
    return Path(uri), Page(Path(uri).read_text())


# --- numbers ------------------------------------------------------------------------------------------
def test_counts_equal_the_run_summary_and_the_sample_set(lake: Path, report: tuple[Path, Page, str]) -> None:
    page = report[1]
    run = json.loads((lake / "runs" / "pre-test.json").read_text())
    # what the sample set holds: one file of every valid, invalid and skipped-by-design kind
    keys = ("discovered", "new", "already_present", "duplicates", "skipped", "quarantined")
    assert tuple(run[k] for k in keys) == (
        len(VALID_KINDS) + len(INVALID_KINDS) + len(SKIPPED_KINDS),
        len(VALID_KINDS),
        0,
        0,
        len(SKIPPED_KINDS),
        len(INVALID_KINDS),
    )
    assert page.one(data_field="run_id") == "pre-test"
    assert page.number(data_count="discovered") == run["discovered"] == 30
    assert page.number(data_count="accepted") == run["new"] + run["already_present"] == 17
    assert page.number(data_count="duplicates") == 0
    assert page.number(data_count="skipped") == run["skipped"] == 4
    assert page.number(data_count="quarantined") == run["quarantined"] == 9
    skips = Counter(cls for _, _, cls in SKIPPED_KINDS.values())
    assert run["skip_reasons"] == dict(skips)
    for cls, n in skips.items():
        assert page.one(data_skip=cls) == f"{cls} {n}"
    for key in (*keys, "retryable"):
        assert page.number(data_field=key) == run[key], key
    assert page.one(data_field="reconciles") == "yes"
    # one row per error class the invalid kinds are known to produce, with its count
    expected = Counter(cls for _, _, cls in INVALID_KINDS.values())
    assert run["quarantine_reasons"] == dict(expected)
    for cls, n in expected.items():
        assert page.number(data_reason=cls) == n
    assert {e["attrs"]["data-reason"] for e in page.elements if "data-reason" in e["attrs"]} == set(expected)
    files = page.find(id="quarantined-files")
    assert len(files) == 1 and all(f"{kind}_{name}" in files[0]["text"] for kind, (name, _, _) in INVALID_KINDS.items())


def test_totals_equal_the_tables(lake: Path, report: tuple[Path, Page, str]) -> None:
    page = report[1]
    tensors = _table(lake, "tensors", ["image_id", "source_format", "run_id"])
    quarantine = _table(lake, "quarantine", ["error_class"])
    preds = _table(lake, "predictions", ["image_id", "model_id"])
    infer = json.loads((lake / "runs" / f"inf-test-{MODEL}.json").read_text())
    assert page.number(data_total="tensors") == tensors.num_rows == 17
    assert page.number(data_total="tensors_of_run") == tensors.num_rows
    formats = Counter(tensors.column("source_format").to_pylist())
    assert {k: page.number(data_format=k) for k in formats} == dict(formats)
    assert page.number(data_total="quarantine") == quarantine.num_rows == 9
    assert page.number(data_total="predictions") == preds.num_rows == 17
    assert page.number(data_model_rows=MODEL) == 17
    assert page.number(data_count="predicted") == len(set(preds.column("image_id").to_pylist())) == infer["predicted"]
    assert page.number(data_infer_predicted=f"inf-test|{MODEL}") == infer["predicted"] == 17
    weights = set(_table(lake, "predictions", ["weights_sha256"]).column("weights_sha256").to_pylist())
    (sha,) = weights
    assert sha[:16] in page.one(id="models")
    # no pseudonyms in the page (the DICOM samples carry a PatientID)
    pseudonyms = {p for p in _table(lake, "tensors", ["patient_pseudonym"]).column(0).to_pylist() if p}
    assert pseudonyms and not any(p in report[2] for p in pseudonyms)


def test_sections_histograms_and_thumbnails(lake: Path, report: tuple[Path, Page, str]) -> None:
    page = report[1]
    for section_id, heading in SECTIONS.items():
        (sec,) = page.find(id=section_id)
        assert sec["tag"] == "section"
        h2 = [
            e for e in page.elements if e["tag"] == "h2" and e["parents"] and e["parents"][-1].get("id") == section_id
        ]
        assert [" ".join(h["text"].split()) for h in h2] == [heading]
    cols = list(PATHOLOGY_COLUMNS.values())
    preds = _table(lake, "predictions", ["image_id", *cols])
    ids = preds.column("image_id").to_pylist()
    predicted = {c: preds.column(c).to_numpy(zero_copy_only=False) for c in cols}
    predicted = {c: v for c, v in predicted.items() if not np.isnan(v.astype(float)).all()}
    assert len(predicted) >= 10  # the "all" model predicts most default pathologies
    shown = {
        e["attrs"]["data-finding"] for e in page.find(data_model=MODEL) if "finding" in e["attrs"].get("class", "")
    }
    assert shown == set(predicted)
    hists = {e["attrs"]["data-finding"] for e in page.find(data_model=MODEL, **{"class": "hist-box"})}
    assert hists == set(predicted)
    assert len([e for e in page.elements if e["tag"] == "svg"]) == len(predicted)
    assert len([e for e in page.elements if e["tag"] == "rect"]) == 20 * len(predicted)  # 20 bins each
    for col, values in predicted.items():
        (box,) = page.find(data_model=MODEL, data_finding=col, **{"class": "finding"})
        idx = page.elements.index(box)
        inside = [e for e in page.elements[idx + 1 :] if box["attrs"] in e["parents"]]
        imgs = [e for e in inside if e["tag"] == "img"]
        n = int((~np.isnan(values.astype(float))).sum())
        assert len(imgs) == min(TOP, n) == 5, col
        # the first thumbnail is the highest-scoring image of that finding
        best = ids[int(np.nanargmax(values.astype(float)))]
        assert imgs[0]["attrs"]["alt"] == best[:12]
        scores = [float(e["text"]) for e in inside if e["attrs"].get("class") == "score"]
        assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(float(np.nanmax(values)), abs=5e-4)


def test_thumbnail_is_the_stored_tensor(lake: Path, report: tuple[Path, Page, str]) -> None:
    import cv2
    from PIL import Image

    from lakehouse.tables import decode_tensor

    img = next(e for e in report[1].elements if e["tag"] == "img")
    prefix, b64 = img["attrs"]["src"].split(",", 1)
    assert prefix == "data:image/jpeg;base64"
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    assert thumb.shape == (128, 128) and thumb.dtype == np.uint8
    tensors = _table(lake, "tensors", ["image_id", "tensor", "tensor_dtype", "tensor_shape"]).to_pylist()
    row = next(r for r in tensors if r["image_id"].startswith(img["attrs"]["alt"]))
    arr = decode_tensor(row["tensor"], row["tensor_dtype"], row["tensor_shape"])[0]
    small = cv2.resize(arr, (128, 128), interpolation=cv2.INTER_AREA)
    corr = np.corrcoef(small.ravel(), thumb.astype(float).ravel())[0, 1]
    assert corr > 0.99 and thumb.std() > 10


def test_top_larger_than_the_table_shows_every_image(lake: Path, settings: Settings) -> None:
    page = Page(build_report(str(lake), settings=settings, top=50))
    findings = [e for e in page.find(data_model=MODEL) if "finding" in e["attrs"].get("class", "")]
    assert findings
    for box in findings:
        imgs = [e for e in page.elements if e["tag"] == "img" and box["attrs"] in e["parents"]]
        assert len(imgs) == 17, box["attrs"]
    none = Page(build_report(str(lake), settings=settings, top=0))
    assert [e for e in none.elements if e["tag"] == "img"] == []


# --- the untrained banner -----------------------------------------------------------------------------
def test_untrained_banner_only_for_a_stand_in(report: tuple[Path, Page, str], untrained: tuple[Path, Page]) -> None:
    trained_page, stand_in = report[1], untrained[1]
    assert trained_page.find(id="untrained-banner") == []
    assert "UNTRAINED" not in report[2]
    banner = stand_in.one(id="untrained-banner")
    assert banner.startswith("UNTRAINED STAND-IN MODEL: these predictions are meaningless")
    assert UNTRAINED in banner and f"{MODEL}," not in banner  # the trained model is not named in it
    # both models are reported, each with its own rows and thumbnails
    assert stand_in.number(data_model_rows=MODEL) == 17 and stand_in.number(data_model_rows=UNTRAINED) == 17
    assert stand_in.number(data_total="predictions") == 34 and stand_in.number(data_count="predicted") == 17
    assert stand_in.number(data_infer_predicted=f"inf-untrained|{UNTRAINED}") == 17


def test_screenshots_show_content_and_the_banner_only_when_untrained(
    report: tuple[Path, Page, str], untrained: tuple[Path, Page], tmp_path: Path
) -> None:
    trained = _screenshot(report[0], tmp_path / "trained.png")
    stand_in = _screenshot(untrained[0], tmp_path / "untrained.png")
    for img in (trained, stand_in):
        assert img.shape == (2400, 1280, 3)
        assert img.std() > 20  # not blank
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200  # text, plots and grayscale thumbnails
    assert _banner_pixels(trained) == 0
    assert _banner_pixels(stand_in[:200]) > 1280 * 40  # a full-width red band at the top
    assert _banner_pixels(stand_in[400:]) == 0


# --- validation and Data Docs -------------------------------------------------------------------------
def test_validation_section_and_data_docs_link(
    lake: Path, report: tuple[Path, Page, str], settings: Settings, tmp_path: Path
) -> None:
    page = report[1]
    assert {t: page.one(data_validation=t) for t in ("tensors", "quarantine", "predictions")} == dict.fromkeys(
        ("tensors", "quarantine", "predictions"), "not validated"
    )
    (link,) = page.find(id="data-docs-link")
    assert link["attrs"]["href"] == "data_docs/index.html"
    assert "not built yet" in page.one(id="validation")

    work = _copy(lake, tmp_path / "lake")
    (work / "reports" / "validation").mkdir(parents=True)
    # the form expectations.runner writes (TableResult.to_dict)
    (work / "reports" / "validation" / "tensors.json").write_text(
        json.dumps({"table": "tensors", "success": True, "evaluated": 9, "passed": 9, "failed": []})
    )
    failed = {"suite": "p", "expectation_type": "expect_column_values_to_be_between", "column": "edema"}
    (work / "reports" / "validation" / "predictions.json").write_text(
        json.dumps({"table": "predictions", "success": False, "evaluated": 5, "passed": 4, "failed": [failed]})
    )
    (work / "reports" / "data_docs").mkdir()
    (work / "reports" / "data_docs" / "index.html").write_text("<html></html>")
    elsewhere = tmp_path / "out" / "nested" / "r.html"
    uri = write_report(str(work), settings=settings, output=str(elsewhere))
    assert uri == str(elsewhere)
    page = Page(elsewhere.read_text())
    assert [page.one(data_validation=t) for t in ("tensors", "quarantine", "predictions")] == [
        "passed",
        "not validated",
        "failed",
    ]
    text = page.one(id="validation")
    assert "9/9 passed" in text and "4/5 passed" in text and "expect_column_values_to_be_between(edema)" in text
    assert "not built yet" not in text
    (link,) = page.find(id="data-docs-link")
    assert (elsewhere.parent / link["attrs"]["href"]).resolve() == work / "reports" / "data_docs" / "index.html"


# --- run selection and errors -------------------------------------------------------------------------
def test_latest_run_by_default_and_run_id_selects(
    lake: Path, samples_dir: Path, settings: Settings, spark: Any, tmp_path: Path
) -> None:
    from transforms.preprocess import run_preprocess

    work = _copy(lake, tmp_path / "lake")
    run_preprocess(str(samples_dir), str(work), settings=settings, run_id="pre-again", spark=spark, progress=False)
    latest = Page(build_report(str(work), settings=settings))
    assert latest.one(data_field="run_id") == "pre-again"
    assert [latest.number(data_field=k) for k in ("discovered", "new", "already_present", "quarantined")] == [
        30,
        0,
        30,
        0,
    ]
    assert latest.one(data_previously="quarantined") == "quarantined 9"
    assert latest.number(data_count="accepted") == 17 and latest.number(data_total="tensors_of_run") == 0
    # the thumbnails are the reported run's images: this run added none (its histograms still show all)
    assert not [e for e in latest.elements if e["tag"] == "img"]
    assert len([e for e in latest.elements if e["tag"] == "rect"]) > 0
    first = Page(build_report(str(work), settings=settings, run_id="pre-test"))
    assert first.one(data_field="run_id") == "pre-test" and first.number(data_field="new") == 17
    assert first.number(data_total="tensors_of_run") == 17
    assert len([e for e in first.elements if e["tag"] == "img"]) > 0
    with pytest.raises(CxrError, match=r"no preprocessing run 'nope'.*known runs: .*pre-test"):
        build_report(str(work), settings=settings, run_id="nope")


def test_no_lakehouse_is_a_clear_error(tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    from cxr.cli import main

    with pytest.raises(CxrError, match="no lakehouse at .*run `cxr preprocess` first"):
        build_report(str(tmp_path / "missing"), settings=settings)
    (tmp_path / "empty").mkdir()
    assert main(["report", "--lakehouse", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip().startswith("cxr report: CxrError: no lakehouse at")
    assert not (tmp_path / "empty" / "reports").exists()


def test_cli_writes_the_report(lake: Path, tmp_path: Path) -> None:
    from cxr.cli import main

    out = tmp_path / "r.html"
    assert main(["report", "--lakehouse", str(lake), "--output", str(out), "--top", "3", "--run-id", "pre-test"]) == 0
    page = Page(out.read_text())
    assert page.one(data_field="run_id") == "pre-test"
    findings = [e for e in page.find(data_model=MODEL) if "finding" in e["attrs"].get("class", "")]
    assert len([e for e in page.elements if e["tag"] == "img"]) == 3 * len(findings)


def test_report_on_s3(built_lakehouse: Path, settings: Settings) -> None:
    from lakehouse.storage import read_text, s3_client

    bucket = make_bucket(settings, "report-test")
    assert upload_dir(settings, built_lakehouse, f"{bucket}/lake") > 10
    uri = write_report(f"{bucket}/lake", settings=settings, top=TOP)
    assert uri == f"{bucket}/lake/reports/report.html"
    head = s3_client(settings).head_object(Bucket="report-test", Key="lake/reports/report.html")
    assert head["ContentType"].startswith("text/html")
    page = Page(read_text(uri, settings))
    assert [
        page.number(data_count=k) for k in ("discovered", "accepted", "duplicates", "quarantined", "predicted")
    ] == [
        30,
        17,
        0,
        9,
        17,
    ]
    assert page.number(data_total="tensors") == 17 and page.number(data_total="quarantine") == 9
    (link,) = page.find(id="data-docs-link")
    assert link["attrs"]["href"] == "data_docs/index.html"
    assert len([e for e in page.elements if e["tag"] == "img"]) > 0


# --- evaluation, thresholds, drift, published versions --------------------------------------------------
def test_evaluation_thresholds_and_drift_sections(built_lakehouse: Path, settings: Settings, tmp_path: Path) -> None:
    """After the DAG's evaluate (with calibration) and drift steps and a publish: the evaluation table
    sorted by AUROC with ROC and calibration charts, the site threshold beside 0.5, the drift verdict."""
    import pandas as pd

    from cxr.drift import compute_drift
    from cxr.evaluate import evaluate
    from lakehouse.publish import publish

    lake = _copy(built_lakehouse, tmp_path / "lake")
    ids = sorted(_table(lake, "tensors", ["image_id"]).column("image_id").to_pylist())
    rows = [
        {"image_id": i, "pathology": p, "label": (k + j) % 2}
        for k, i in enumerate(ids)
        for j, p in enumerate(("Cardiomegaly", "Effusion"))
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    summary = evaluate(
        str(lake), str(tmp_path / "labels.csv"), settings=settings, key="image_id", n_bootstrap=100, calibrate=True
    )
    compute_drift(str(lake), settings=settings, run_id="inf-test")
    # before the publish nothing of it is shown; --unpublished shows it, marked
    before = Page(build_report(str(lake), settings=settings))
    assert "No published evaluation" in before.one(id="evaluation") and "No published drift" in before.one(id="drift")
    unaudited = Page(build_report(str(lake), settings=settings, published=False))
    assert "UNAUDITED" in unaudited.one(id="table-versions") and unaudited.find(data_auroc="Cardiomegaly")

    publish(str(lake), settings, run_id="pre-test", infer_run_id="inf-test")
    page = Page(build_report(str(lake), settings=settings))
    evaluation = _table(
        lake, "evaluation", ["pathology", "slice", "auroc", "auroc_ci_low", "auroc_ci_high"]
    ).to_pylist()
    overall = {r["pathology"]: r for r in evaluation if r["slice"] == "all"}
    for pathology in ("Cardiomegaly", "Effusion"):
        r = overall[pathology]
        assert page.one(data_auroc=pathology) == f"{r['auroc']:.3f} ({r['auroc_ci_low']:.3f}–{r['auroc_ci_high']:.3f})"
    # sorted by AUROC, highest first, unlabelled pathologies (null AUROC) last
    order = [e["attrs"]["data-evaluation"].split("|")[1] for e in page.find() if "data-evaluation" in e["attrs"]]
    scored = sorted(("Cardiomegaly", "Effusion"), key=lambda p: -overall[p]["auroc"])
    assert order[:2] == scored and len(order) == 18
    assert summary.evaluation_id in page.one(id="evaluation")
    assert len([e for e in page.elements if e["tag"] == "svg" and "ROC " in e["attrs"].get("aria-label", "")]) == 2
    # the site threshold beside the 0.5 count, equal to the thresholds table
    cut = {
        r["prediction_column"]: r["threshold"]
        for r in _table(lake, "thresholds", ["prediction_column", "threshold"]).to_pylist()
    }
    scores = _table(lake, "predictions", ["cardiomegaly"]).column("cardiomegaly").to_pylist()
    expected = sum(1 for v in scores if v >= cut["cardiomegaly"])
    assert page.one(data_site_positive="cardiomegaly") == f"≥site threshold {cut['cardiomegaly']:.3f}: {expected}"
    assert len([e for e in page.elements if e["attrs"].get("class") == "site-threshold"]) == 2
    # drift: the first run has no reference yet
    assert page.one(data_drift_verdict="no_reference") == "no_reference"
    assert "tensors" in page.one(id="table-versions") and "UNAUDITED" not in page.one(id="table-versions")
