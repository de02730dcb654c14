"""``cxr evaluate`` over a lakehouse made by the real stages: labels by each key kind, NIH and CheXpert
styles, metrics equal to brute force on the stored predictions, site thresholds and the decisions they
drive in ``cxr infer --thresholds``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable

from cxr.cli import main
from cxr.evaluate import evaluate
from lakehouse.config import Settings
from lakehouse.errors import CxrError
from lakehouse.tables import DECISION_COLUMNS, PATHOLOGY_COLUMNS
from tests.conftest import MODEL

pytestmark = pytest.mark.slow


def brute_auroc(y: list[int], s: list[float]) -> float:
    """Every (positive, negative) pair: 1 when the positive scores higher, 1/2 on a tie."""
    pos = [v for v, t in zip(s, y, strict=True) if t == 1]
    neg = [v for v, t in zip(s, y, strict=True) if t == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.fixture
def lake(built_lakehouse: Path, tmp_path: Path) -> Path:
    """A writable copy of the lakehouse the real stages built (preprocess with Spark, inference)."""
    return Path(shutil.copytree(built_lakehouse, tmp_path / "lake"))


def _images(lake: Path) -> pd.DataFrame:
    """image_id, file name, SOP UID, format and the model's cardiomegaly/effusion probabilities, by image_id."""
    t = DeltaTable(str(lake / "tensors")).to_pandas(columns=["image_id", "source_uri", "sop_uid", "source_format"])
    p = DeltaTable(str(lake / "predictions")).to_pandas(columns=["image_id", "model_id", "cardiomegaly", "effusion"])
    frame = t.merge(p, on="image_id").sort_values("image_id").reset_index(drop=True)
    frame["file_name"] = frame["source_uri"].map(lambda u: u.rsplit("/", 1)[-1])
    return frame


def _tidy(images: pd.DataFrame, key: str) -> pd.DataFrame:
    """Cardiomegaly = even rows; Effusion = every third row, the last image left unlabeled for it."""
    rows = []
    for k, r in images.iterrows():
        rows.append({key: r[key], "pathology": "cardiomegaly", "label": int(k) % 2})  # lower case: mapped
        if k != len(images) - 1:
            rows.append({key: r[key], "pathology": "Effusion", "label": int(int(k) % 3 == 0)})
    return pd.DataFrame(rows)


def _rows(lake: Path, evaluation_id: str) -> pd.DataFrame:
    ev = DeltaTable(str(lake / "evaluation")).to_pandas()
    return ev[ev["evaluation_id"] == evaluation_id]


def _all(rows: pd.DataFrame, pathology: str) -> dict[str, Any]:
    sel = rows[(rows["pathology"] == pathology) & (rows["slice"] == "all")]
    assert len(sel) == 1
    return dict(sel.iloc[0])


def test_evaluation_by_file_name_equals_brute_force(lake: Path, tmp_path: Path, settings: Settings) -> None:
    images = _images(lake)
    n = len(images)
    assert n >= 10
    labels = _tidy(images, "file_name")
    labels = pd.concat(
        [labels, pd.DataFrame([{"file_name": "not-in-the-lake.png", "pathology": "Effusion", "label": 1}])]
    )
    labels.to_csv(tmp_path / "labels.csv", index=False)

    s = evaluate(
        str(lake),
        str(tmp_path / "labels.csv"),
        settings=settings,
        key="file_name",
        slices=["source_format", "manufacturer", "site_pseudonym"],
        n_bootstrap=200,
    )
    assert (s.label_keys, s.matched_keys, s.unmatched_keys, s.ambiguous_keys) == (n + 1, n, 1, 0)
    assert s.models == [MODEL] and s.labels_format == "tidy"
    rows = _rows(lake, s.evaluation_id)

    y = [int(k) % 2 for k in range(n)]
    cardio = _all(rows, "Cardiomegaly")
    assert cardio["auroc"] == pytest.approx(brute_auroc(y, images["cardiomegaly"].tolist()), abs=1e-12)
    assert (cardio["n_pos"], cardio["n_neg"], cardio["n_unlabeled"]) == (sum(y), n - sum(y), 0)
    assert cardio["auroc_ci_low"] <= cardio["auroc"] <= cardio["auroc_ci_high"]
    assert cardio["threshold_rule"] == "youden" and cardio["n_bootstrap"] == 200
    assert cardio["predictions_version"] == DeltaTable(str(lake / "predictions")).version()

    y_eff = [int(k % 3 == 0) for k in range(n - 1)]
    eff = _all(rows, "Effusion")
    assert eff["auroc"] == pytest.approx(brute_auroc(y_eff, images["effusion"].tolist()[: n - 1]), abs=1e-12)
    assert (eff["n_pos"], eff["n_neg"], eff["n_unlabeled"]) == (sum(y_eff), n - 1 - sum(y_eff), 1)
    # sensitivity/specificity at the reported threshold, recomputed by hand
    s_eff = np.array(images["effusion"].tolist()[: n - 1])
    yy = np.array(y_eff)
    pred = s_eff >= eff["threshold"]
    assert eff["sensitivity"] == pytest.approx((pred & (yy == 1)).sum() / yy.sum())
    assert eff["specificity"] == pytest.approx((~pred & (yy == 0)).sum() / (yy == 0).sum())

    # a pathology without labels: counted as unlabeled, AUROC null with the reason
    mass = _all(rows, "Mass")
    assert (mass["n_pos"], mass["n_neg"], mass["n_unlabeled"]) == (0, 0, n) and pd.isna(mass["auroc"])
    assert mass["null_reason"] == "no labelled images"
    # slices partition the labelled images
    by_format = rows[(rows["pathology"] == "Cardiomegaly") & (rows["slice"] == "source_format")]
    assert sorted(by_format["slice_value"]) == sorted(images["source_format"].unique())
    assert by_format["n_pos"].sum() + by_format["n_neg"].sum() == n
    # DICOM lineage slices: the manufacturer, and the site by its keyed pseudonym (PNG/JPEG: 'null')
    by_maker = rows[(rows["pathology"] == "Cardiomegaly") & (rows["slice"] == "manufacturer")]
    assert set(by_maker["slice_value"]) == {"ACME MEDICAL", "GLOBEX IMAGING", "INITECH", "null"}
    assert by_maker["n_pos"].sum() + by_maker["n_neg"].sum() == n
    by_site = rows[(rows["pathology"] == "Cardiomegaly") & (rows["slice"] == "site_pseudonym")]
    assert len(set(by_site["slice_value"]) - {"null"}) == 2 and not any("HOSPITAL" in v for v in by_site["slice_value"])


def test_every_key_kind_gives_the_same_numbers(lake: Path, tmp_path: Path, settings: Settings) -> None:
    images = _images(lake)
    _tidy(images, "image_id").to_parquet(tmp_path / "by_id.parquet")
    _tidy(images, "file_name").to_csv(tmp_path / "by_name.csv", index=False)
    by_id = _rows(
        lake,
        evaluate(
            str(lake), str(tmp_path / "by_id.parquet"), settings=settings, key="image_id", n_bootstrap=0
        ).evaluation_id,
    )
    by_name = _rows(
        lake,
        evaluate(
            str(lake), str(tmp_path / "by_name.csv"), settings=settings, key="file_name", n_bootstrap=0
        ).evaluation_id,
    )
    cols = ["pathology", "n_pos", "n_neg", "n_unlabeled", "auroc", "auprc", "ece", "threshold"]
    assert (
        by_id[cols]
        .sort_values("pathology")
        .reset_index(drop=True)
        .equals(by_name[cols].sort_values("pathology").reset_index(drop=True))
    )

    dicoms = images[images["sop_uid"].notna()].reset_index(drop=True)
    assert len(dicoms) >= 4
    _tidy(dicoms, "sop_uid").rename(columns={"sop_uid": "sop_instance_uid"}).to_csv(
        tmp_path / "by_sop.csv", index=False
    )
    s = evaluate(str(lake), str(tmp_path / "by_sop.csv"), settings=settings, key="sop_instance_uid", n_bootstrap=0)
    cardio = _all(_rows(lake, s.evaluation_id), "Cardiomegaly")
    y = [int(k) % 2 for k in range(len(dicoms))]
    assert (cardio["n_pos"], cardio["n_neg"], cardio["n_unlabeled"]) == (sum(y), len(y) - sum(y), len(images) - len(y))
    assert cardio["auroc"] == pytest.approx(brute_auroc(y, dicoms["cardiomegaly"].tolist()), abs=1e-12)


def test_nih_and_chexpert_style_labels(lake: Path, tmp_path: Path, settings: Settings) -> None:
    images = _images(lake)
    findings = ["Cardiomegaly|Effusion", "No Finding", "Effusion", "Cardiomegaly"]
    nih = pd.DataFrame(
        {
            "Image Index": images["file_name"],
            "Finding Labels": [findings[k % 4] for k in range(len(images))],
            "Patient Age": 50,
        }
    )
    nih.to_csv(tmp_path / "Data_Entry.csv", index=False)
    s = evaluate(str(lake), str(tmp_path / "Data_Entry.csv"), settings=settings, key="file_name", n_bootstrap=0)
    rows = _rows(lake, s.evaluation_id)
    assert s.labels_format == "nih"
    assert s.not_predicted == {} and s.keys_without_prediction == 0
    n = len(images)
    cardio_pos = sum(1 for k in range(n) if "Cardiomegaly" in findings[k % 4])
    assert (_all(rows, "Cardiomegaly")["n_pos"], _all(rows, "Cardiomegaly")["n_neg"]) == (cardio_pos, n - cardio_pos)
    assert _all(rows, "Mass")["null_reason"].startswith("one class only (0 positive")  # NIH labels Mass: all absent
    assert (
        "Lung Opacity" in set(rows["pathology"]) and _all(rows, "Lung Opacity")["null_reason"] == "no labelled images"
    )

    # CheXpert style keyed by a relative path (matched as a path suffix), with -1 and blank cells
    values = [1, 0, -1, None]
    chex = pd.DataFrame(
        {
            "Path": ["/".join(u.split("/")[-2:]) for u in images["source_uri"]],
            "Sex": "F",
            "No Finding": [1 if k % 4 == 1 else None for k in range(n)],
            "Cardiomegaly": [values[k % 4] for k in range(n)],
            "Support Devices": 0,
        }
    )
    chex.to_csv(tmp_path / "train.csv", index=False)
    counts = {v: sum(1 for k in range(n) if values[k % 4] == v) for v in (1, 0, -1)}
    ignore = evaluate(str(lake), str(tmp_path / "train.csv"), settings=settings, key="file_name", n_bootstrap=0)
    positive = evaluate(
        str(lake), str(tmp_path / "train.csv"), settings=settings, key="file_name", n_bootstrap=0, uncertain="positive"
    )
    # keys whose every label cell is blank, or uncertain and ignored, carry no label: they are not keys
    labelled = sum(1 for k in range(n) if k % 4 in (0, 1))
    assert ignore.labels_format == "chexpert" and ignore.matched_keys == labelled and ignore.unmatched_keys == 0
    assert ignore.uncertain == counts[-1] and ignore.uncertain_dropped == counts[-1]
    assert set(ignore.unmapped) >= {"No Finding", "Support Devices"}
    assert ignore.ignored_columns == ["Sex"]  # the key column (Path) is the key, not ignored
    c_ignore = _all(_rows(lake, ignore.evaluation_id), "Cardiomegaly")
    c_pos = _all(_rows(lake, positive.evaluation_id), "Cardiomegaly")
    assert (c_ignore["n_pos"], c_ignore["n_neg"], c_ignore["n_unlabeled"]) == (
        counts[1],
        counts[0],
        n - counts[1] - counts[0],
    )
    assert (c_pos["n_pos"], c_pos["n_neg"]) == (counts[1] + counts[-1], counts[0])


def test_key_mismatch_is_an_error_not_an_empty_table(lake: Path, tmp_path: Path, settings: Settings) -> None:
    images = _images(lake)
    _tidy(images, "image_id").rename(columns={"image_id": "file_name"}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(CxrError, match=r"none of the \d+ label keys \(file_name\) matches an image"):
        evaluate(str(lake), str(tmp_path / "l.csv"), settings=settings, key="file_name")
    assert not (lake / "evaluation").exists()


def test_calibrated_thresholds_change_the_decision_columns_and_nothing_else(
    lake: Path, tmp_path: Path, settings: Settings, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.job import run_infer

    images = _images(lake)
    _tidy(images, "image_id").to_csv(tmp_path / "labels.csv", index=False)
    rc = main(
        ["evaluate", "--lakehouse", str(lake), "--labels", str(tmp_path / "labels.csv"), "--key", "image_id",
         "--calibrate", "sensitivity=0.9", "--bootstrap", "0"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "thresholds: 2 written, thresholds version 1" in out
    thresholds = DeltaTable(str(lake / "thresholds")).to_pandas()
    assert sorted(thresholds["pathology"]) == ["Cardiomegaly", "Effusion"]
    assert set(thresholds["rule"]) == {"sensitivity=0.9"}
    cut = dict(zip(thresholds["prediction_column"], thresholds["threshold"], strict=True))
    y = np.array([int(k) % 2 for k in range(len(images))])
    s = images["cardiomegaly"].to_numpy()
    assert ((s >= cut["cardiomegaly"]) & (y == 1)).sum() / y.sum() >= 0.9  # the rule holds ...
    assert ((s > cut["cardiomegaly"]) & (y == 1)).sum() / y.sum() < 0.9  # ... at the highest such threshold

    # thresholds decide nothing before they are audited and published
    with pytest.raises(CxrError, match="no published thresholds"):
        run_infer(str(lake), settings=settings, model_id=MODEL, weights_dir=str(checkpoint.parent), thresholds="latest")
    assert main(["publish", "--lakehouse", str(lake)]) == 0  # audits (thresholds suite included), then publishes

    # the same tensors scored twice: with the thresholds and without
    with_t, without = (Path(shutil.copytree(lake, tmp_path / n)) for n in ("with", "without"))
    for where in (with_t, without):
        shutil.rmtree(where / "predictions")
    weights = str(checkpoint.parent)
    run_infer(str(with_t), settings=settings, model_id=MODEL, weights_dir=weights, progress=False, thresholds="latest")
    run_infer(str(without), settings=settings, model_id=MODEL, weights_dir=weights, progress=False)
    a = DeltaTable(str(with_t / "predictions")).to_pandas().sort_values("image_id").reset_index(drop=True)
    b = DeltaTable(str(without / "predictions")).to_pandas().sort_values("image_id").reset_index(drop=True)
    probabilities = list(PATHOLOGY_COLUMNS.values())
    assert a[probabilities].equals(b[probabilities])
    assert b[list(DECISION_COLUMNS.values())].isna().all().all() and b["thresholds_version"].isna().all()
    assert (a["thresholds_version"] == 1).all()  # the table is created (v0), then written (v1)
    for column, decision in DECISION_COLUMNS.items():
        if column in cut:
            assert a[decision].tolist() == (a[column] >= cut[column]).tolist()
        else:
            assert a[decision].isna().all()

    with pytest.raises(CxrError, match="thresholds version 7 cannot be read"):
        run_infer(str(without), settings=settings, model_id=MODEL, weights_dir=weights, progress=False, thresholds="7")
