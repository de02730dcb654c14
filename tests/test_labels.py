"""cxr.labels: the label files that ship inside torchxrayvision, read and counted independently here with
plain csv/pandas code, and small crafted tidy, NIH and CheXpert files (CSV, gzip, Parquet, Delta) for the rules.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from cxr.labels import (
    LABEL_SYNONYMS,
    NON_TARGET_LABELS,
    VOCABULARIES,
    Labels,
    LabelsError,
    _build_tables,
    detect_format,
    map_label,
    normalize_name,
    read_labels,
)
from lakehouse.tables import PATHOLOGY_COLUMNS

TARGETS = list(PATHOLOGY_COLUMNS)

#: what these tests expect xrv's dataset classes to make of each CheXpert column (CheX_Dataset's renames)
CHEXPERT_TARGET = {
    "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
    "Cardiomegaly": "Cardiomegaly",
    "Lung Opacity": "Lung Opacity",
    "Lung Lesion": "Lung Lesion",
    "Edema": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax",
    "Pleural Effusion": "Effusion",
    "Fracture": "Fracture",
}
CHEXPERT_NON_TARGET = ("No Finding", "Pleural Other", "Support Devices")
NIH_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
#: positives per finding in Data_Entry_2017_v2020 as observed (a second assertion: a new file is noticed)
NIH_POSITIVES_V2020 = {
    "Atelectasis": 11559,
    "Cardiomegaly": 2776,
    "Effusion": 13317,
    "Infiltration": 19894,
    "Mass": 5782,
    "Nodule": 6331,
    "Pneumonia": 1431,
    "Pneumothorax": 5302,
    "Consolidation": 4667,
    "Edema": 2303,
    "Emphysema": 2516,
    "Fibrosis": 1686,
    "Pleural_Thickening": 3385,
    "Hernia": 227,
}
#: VinDr class names -> the target these tests expect (VinDr_Dataset's names and synonyms)
VINDR_TARGET = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Infiltration": "Infiltration",
    "Lung Opacity": "Lung Opacity",
    "Pleural effusion": "Effusion",
    "Pleural thickening": "Pleural_Thickening",
    "Pneumothorax": "Pneumothorax",
    "Pulmonary fibrosis": "Fibrosis",
}


# --- the files that ship with torchxrayvision ------------------------------------------------------------
@pytest.fixture(scope="module")
def xrv_data() -> Path:
    """torchxrayvision's data folder, found without importing it (no torch import)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        pytest.skip("torchxrayvision is not installed (pip install -e .[inference])")
    return Path(spec.origin).parent / "data"


@pytest.fixture(scope="module")
def nih_file(xrv_data: Path) -> Path:
    return xrv_data / "Data_Entry_2017_v2020.csv.gz"


@pytest.fixture(scope="module")
def nih_raw(nih_file: Path) -> dict[str, str]:
    """Image Index -> Finding Labels, read with the csv module."""
    with gzip.open(nih_file, "rt", newline="") as fh:
        return {row["Image Index"]: row["Finding Labels"] for row in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def nih(nih_file: Path) -> Labels:
    return read_labels(str(nih_file), targets=TARGETS)


@pytest.fixture(scope="module")
def chexpert_file(xrv_data: Path) -> Path:
    return xrv_data / "chexpert_train.csv.gz"


@pytest.fixture(scope="module")
def chexpert_raw(chexpert_file: Path) -> pd.DataFrame:
    return pd.read_csv(chexpert_file)


def test_nih_one_row_per_image_and_finding(nih: Labels, nih_raw: dict[str, str], nih_file: Path) -> None:
    assert len(nih_raw) == 112_120
    assert nih.format == "nih"
    assert nih.rows_read == len(nih_raw) == 112_120
    assert nih.uri == str(nih_file.resolve())
    assert nih.sha256 == hashlib.sha256(nih_file.read_bytes()).hexdigest()
    assert list(nih.table.columns) == ["key", "pathology", "label"]
    assert str(nih.table["label"].dtype) == "int8"
    assert len(nih.table) == 14 * 112_120
    assert nih.table.groupby("pathology").size().to_dict() == dict.fromkeys(NIH_FINDINGS, 112_120)
    assert not nih.table.duplicated(["key", "pathology"]).any()
    assert set(nih.table["key"]) == set(nih_raw)
    assert (nih.uncertain, nih.uncertain_dropped, nih.blank) == (0, 0, 0)


def test_nih_positives_match_the_findings_column(nih: Labels, nih_raw: dict[str, str]) -> None:
    tokens = Counter(t for findings in nih_raw.values() for t in findings.split("|"))
    positives = nih.table.groupby("pathology")["label"].sum().to_dict()
    assert positives == {f: tokens[f] for f in NIH_FINDINGS}
    assert positives == NIH_POSITIVES_V2020
    assert positives["Cardiomegaly"] == sum("Cardiomegaly" in f for f in nih_raw.values()) == 2776
    assert set(nih.table["label"].unique()) == {0, 1}


def test_nih_no_finding_is_unmapped_and_negative_for_all_14(nih: Labels, nih_raw: dict[str, str]) -> None:
    healthy = {k for k, f in nih_raw.items() if f == "No Finding"}
    assert len(healthy) == 60_361
    assert nih.unmapped == {"No Finding": 60_361}
    rows = nih.table[nih.table["key"].isin(healthy)]
    assert len(rows) == 14 * 60_361
    assert int(rows["label"].sum()) == 0


def test_nih_example_image(nih: Labels, nih_raw: dict[str, str]) -> None:
    assert nih_raw["00000001_001.png"] == "Cardiomegaly|Emphysema"
    rows = nih.table[nih.table["key"] == "00000001_001.png"].set_index("pathology")["label"].to_dict()
    assert rows == {f: int(f in ("Cardiomegaly", "Emphysema")) for f in NIH_FINDINGS}


# the second assertion of each: counts observed in the bundled chexpert_train.csv.gz
CHEXPERT_OBSERVED = {
    "ignore": {"Cardiomegaly": (27_000, 11_116), "Effusion": (86_187, 35_396)},
    "positive": {"Cardiomegaly": (35_087, 11_116), "Effusion": (97_815, 35_396)},
    "negative": {"Cardiomegaly": (27_000, 19_203), "Effusion": (86_187, 47_024)},
}
CHEXPERT_UNMAPPED_OBSERVED = {
    "ignore": {"No Finding": 22_381, "Pleural Other": 3_839, "Support Devices": 122_138},
    "positive": {"No Finding": 22_381, "Pleural Other": 6_492, "Support Devices": 123_217},
    "negative": {"No Finding": 22_381, "Pleural Other": 6_492, "Support Devices": 123_217},
}


@pytest.mark.parametrize("rule", ["ignore", "positive", "negative"])
def test_chexpert_counts_under_each_uncertain_rule(rule: str, chexpert_file: Path, chexpert_raw: pd.DataFrame) -> None:
    labels = read_labels(str(chexpert_file), targets=TARGETS, uncertain=rule)  # type: ignore[arg-type]
    raw = chexpert_raw
    assert labels.format == "chexpert"
    assert labels.rows_read == len(raw) == 223_414
    assert labels.sha256 == hashlib.sha256(chexpert_file.read_bytes()).hexdigest()

    got = labels.table.groupby("pathology")["label"].agg(["sum", "size"])
    expected = {}
    for column, target in CHEXPERT_TARGET.items():
        pos, neg, unsure = (int((raw[column] == v).sum()) for v in (1, 0, -1))
        expected[target] = (
            pos + (unsure if rule == "positive" else 0),
            neg + (unsure if rule == "negative" else 0),
        )
    assert {p: (int(r["sum"]), int(r["size"] - r["sum"])) for p, r in got.iterrows()} == expected
    for target, counts in CHEXPERT_OBSERVED[rule].items():
        assert expected[target] == counts

    label_columns = [*CHEXPERT_TARGET, *CHEXPERT_NON_TARGET]
    n_unsure = int((raw[label_columns] == -1).sum().sum())
    n_blank = int(raw[label_columns].isna().sum().sum())
    assert (n_unsure, n_blank) == (139_958, 2_277_974)
    assert labels.uncertain == n_unsure
    assert labels.uncertain_dropped == (n_unsure if rule == "ignore" else 0)
    assert labels.blank == n_blank
    unmapped = {
        c: int(raw[c].isin([1, 0]).sum()) + (0 if rule == "ignore" else int((raw[c] == -1).sum()))
        for c in CHEXPERT_NON_TARGET
    }
    assert labels.unmapped == unmapped == CHEXPERT_UNMAPPED_OBSERVED[rule]
    # every label cell has exactly one outcome: blank, dropped as uncertain, a row, or unmapped
    assert len(raw) * len(label_columns) == (
        labels.blank + labels.uncertain_dropped + len(labels.table) + sum(labels.unmapped.values())
    )
    # the key is CheXpert's Path, as given
    assert set(labels.table["key"]) <= set(raw["Path"])
    assert labels.table["key"].iloc[0].startswith("CheXpert-v1.0-small/train/patient")


def test_rsna_target_zip_identical_duplicates_dropped(xrv_data: Path) -> None:
    path = xrv_data / "kaggle_stage_2_train_labels.csv.zip"
    raw = pd.read_csv(path)
    assert raw.groupby("patientId")["Target"].nunique().max() == 1  # one box per row, one Target per patient
    per_patient = raw.drop_duplicates("patientId").set_index("patientId")["Target"]
    labels = read_labels(str(path), key_column="patientId", targets=TARGETS)
    assert labels.format == "chexpert"
    assert labels.rows_read == len(raw) == 30_227
    assert len(labels.table) == len(per_patient) == 26_684
    assert set(labels.table["pathology"]) == {"Lung Opacity"}
    assert int(labels.table["label"].sum()) == int(per_patient.sum()) == 6_012
    assert labels.table.set_index("key")["label"].astype(int).to_dict() == per_patient.astype(int).to_dict()
    assert labels.unmapped == {}


def test_vindr_class_names_map_as_xrv_does(xrv_data: Path, tmp_path: Path) -> None:
    raw = pd.read_csv(xrv_data / "vinbigdata-train.csv.gz")
    with pytest.raises(LabelsError, match="cannot tell the labels' layout"):
        detect_format(list(raw.columns))  # one row per box, no label column: not a labels layout
    tidy = pd.DataFrame({"image_id": raw["image_id"], "pathology": raw["class_name"], "label": 1})
    tidy.to_parquet(tmp_path / "vindr.parquet")
    labels = read_labels(str(tmp_path / "vindr.parquet"), key_column="image_id", targets=TARGETS)
    positives = labels.table.groupby("pathology")["label"].agg(["sum", "size"])
    expected = {t: 0 for t in VINDR_TARGET.values()}
    for name, target in VINDR_TARGET.items():
        expected[target] += int(raw.loc[raw["class_name"] == name, "image_id"].nunique())
    assert positives["size"].to_dict() == positives["sum"].to_dict() == expected
    assert expected["Effusion"] == 1_032 and expected["Pleural_Thickening"] == 1_981
    others = raw.loc[~raw["class_name"].isin(list(VINDR_TARGET)), "class_name"].value_counts().to_dict()
    assert labels.unmapped == others
    assert set(others) == {"No finding", "Aortic enlargement", "Nodule/Mass", "Other lesion", "ILD", "Calcification"}
    assert labels.unmapped["ILD"] == 1_000 and labels.unmapped["No finding"] == 31_818


# --- names and the mapping table --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "normalized"),
    [
        ("Pleural_Thickening", "pleuralthickening"),
        ("pleural thickening", "pleuralthickening"),
        ("PLEURAL-THICKENING", "pleuralthickening"),
        (" Lung  Opacity\t", "lungopacity"),
        ("Nodule/Mass", "nodule/mass"),
    ],
)
def test_normalize_name(name: str, normalized: str) -> None:
    assert normalize_name(name) == normalized


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("pleural thickening", "Pleural_Thickening"),
        ("PLEURAL_THICKENING", "Pleural_Thickening"),
        ("Pleural thickening", "Pleural_Thickening"),  # VinDr
        ("Pleural Effusion", "Effusion"),  # CheXpert / MIMIC-CXR
        ("Pleural effusion", "Effusion"),  # VinDr
        ("Airspace Opacity", "Lung Opacity"),  # CheXpert paper
        ("Airspace opacity", "Lung Opacity"),  # NIH Google
        ("Lung Opacity", "Lung Opacity"),  # CheXpert, RSNA, VinDr
        ("Target", "Lung Opacity"),  # RSNA
        ("Infiltrate", "Infiltration"),  # NIH bounding boxes
        ("enlarged_cardiomediastinum", "Enlarged Cardiomediastinum"),
        ("interstitial pattern", "Infiltration"),  # PadChest
        ("air bronchogram", "Consolidation"),  # PadChest: xrv counts it for Infiltration too
        ("hiatal hernia", "Hernia"),  # PadChest
        ("Pulmonary fibrosis", "Fibrosis"),
        ("No Finding", None),
        ("No finding", None),
        ("Support Devices", None),
        ("Pleural Other", None),
        ("ILD", None),
        ("Nodule/Mass", None),
        ("pseudonodule", None),
        ("pericardial effusion", None),
        ("Tuberculosis", None),
        ("", None),
    ],
)
def test_map_label(name: str, target: str | None) -> None:
    assert map_label(name, TARGETS) == target


def test_map_label_answers_in_the_callers_spelling() -> None:
    targets = ["", "Pleural Effusion", "cardiomegaly", "Pleural Thickening"]  # a model's targets, "" unused
    assert map_label("Effusion", targets) == "Pleural Effusion"
    assert map_label("Pleural effusion", targets) == "Pleural Effusion"
    assert map_label("Cardiomegaly", targets) == "cardiomegaly"
    assert map_label("Pleural_Thickening", targets) == "Pleural Thickening"
    assert map_label("Edema", targets) is None
    assert map_label("", targets) is None


def test_mapping_table_is_consistent() -> None:
    assert set(LABEL_SYNONYMS.values()) <= set(PATHOLOGY_COLUMNS)
    assert all(normalize_name(k) == k for k in (*LABEL_SYNONYMS, *NON_TARGET_LABELS))
    assert not set(LABEL_SYNONYMS) & NON_TARGET_LABELS
    assert all(map_label(t, TARGETS) == t for t in TARGETS)
    assert {map_label(n, TARGETS) for n in VOCABULARIES["nih"]} == {*NIH_FINDINGS, None}
    assert {n: map_label(n, TARGETS) for n in CHEXPERT_TARGET} == CHEXPERT_TARGET
    assert {n: map_label(n, TARGETS) for n in VINDR_TARGET} == VINDR_TARGET
    with pytest.raises(ValueError, match="means"):
        _build_tables({"a": {"Pleural Effusion": "Effusion"}, "b": {"pleural_effusion": None}})


@pytest.mark.parametrize(
    ("columns", "fmt"),
    [
        (["Image Index", "Finding Labels", "Patient ID"], "nih"),
        (["image_id", "pathology", "label"], "tidy"),
        (["Path", "Sex", "Age", "No Finding", "Pleural Effusion"], "chexpert"),
        (["dicom_id", "subject_id", "Edema"], "chexpert"),
        (["patientId", "x", "y", "Target"], "chexpert"),
    ],
)
def test_detect_format(columns: list[str], fmt: str) -> None:
    assert detect_format(columns) == fmt


@pytest.mark.parametrize("columns", [[], ["image_id", "class_name", "x_min"], ["file_name", "finding", "value"]])
def test_detect_format_names_the_layouts(columns: list[str]) -> None:
    with pytest.raises(LabelsError) as err:
        detect_format(columns)
    assert all(word in str(err.value) for word in ("tidy", "nih", "chexpert", "pathology", "Finding Labels"))


# --- crafted files ------------------------------------------------------------------------------------------
TIDY_CSV = """image_id,pathology,label
a,pleural thickening,1
b,PLEURAL_THICKENING,0
c,Pleural Effusion,1
c,Effusion,1
d,No Finding,1
e,No Finding,1
e,Support Devices,0
f,Cardiomegaly,-1
g,Cardiomegaly,
00012,Edema,1.0
"""


def _rows(labels: Labels) -> list[tuple[str, str, int]]:
    return sorted((k, p, int(v)) for k, p, v in labels.table.itertuples(index=False))


@pytest.mark.parametrize(
    ("rule", "extra"),
    [("ignore", []), ("positive", [("f", "Cardiomegaly", 1)]), ("negative", [("f", "Cardiomegaly", 0)])],
)
def test_tidy_csv(tmp_path: Path, rule: str, extra: list[tuple[str, str, int]]) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(TIDY_CSV)
    labels = read_labels(str(path), key_column="image_id", targets=TARGETS, uncertain=rule)  # type: ignore[arg-type]
    assert labels.format == "tidy"
    assert _rows(labels) == sorted(
        [
            ("00012", "Edema", 1),  # the key stays text: leading zeros kept
            ("a", "Pleural_Thickening", 1),
            ("b", "Pleural_Thickening", 0),
            ("c", "Effusion", 1),  # "Pleural Effusion" and "Effusion": one row, identical duplicates dropped
            *extra,
        ]
    )
    assert labels.unmapped == {"No Finding": 2, "Support Devices": 1}
    assert (labels.uncertain, labels.uncertain_dropped) == (1, 1 if rule == "ignore" else 0)
    assert labels.blank == 1
    assert labels.rows_read == 10
    assert labels.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_only_targets_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(TIDY_CSV)
    labels = read_labels(str(path), key_column="image_id", targets=["Effusion"])
    assert _rows(labels) == [("c", "Effusion", 1)]
    assert labels.unmapped == {
        "Edema": 1,
        "No Finding": 2,
        "PLEURAL_THICKENING": 1,
        "Support Devices": 1,
        "pleural thickening": 1,
    }


def test_conflicting_duplicates_raise_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("image_id,pathology,label\nx,Effusion,1\nx,Pleural Effusion,0\ny,Edema,1\ny,Edema,1\n")
    with pytest.raises(LabelsError, match=r"1 \(key, pathology\) pairs are labelled both 0 and 1, e.g. key 'x'"):
        read_labels(str(path), key_column="image_id", targets=TARGETS)


def test_bad_label_values_raise_with_the_count(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("image_id,pathology,label\na,Edema,1\nb,Edema,2\nc,Edema,yes\nd,Edema,0.5\ne,Edema,0\n")
    with pytest.raises(LabelsError, match=r"3 'label' values are not 0, 1, -1 or blank, e.g. '2' for key 'b'"):
        read_labels(str(path), key_column="image_id", targets=TARGETS)


def test_tidy_parquet_with_numbers_and_booleans(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "sop_instance_uid": ["1.2.840.1", "1.2.840.2", "1.2.840.3"],
            "pathology": ["Pneumothorax", "Pneumothorax", "Hernia"],
            "label": [True, False, True],
        }
    )
    frame.to_parquet(tmp_path / "labels.parquet")
    labels = read_labels(str(tmp_path / "labels.parquet"), key_column="sop_instance_uid", targets=TARGETS)
    assert _rows(labels) == [
        ("1.2.840.1", "Pneumothorax", 1),
        ("1.2.840.2", "Pneumothorax", 0),
        ("1.2.840.3", "Hernia", 1),
    ]
    frame.assign(sop_instance_uid=[10, 20, 30], label=[1, 0, None]).to_parquet(tmp_path / "ints.parquet")
    labels = read_labels(str(tmp_path / "ints.parquet"), key_column="sop_instance_uid", targets=TARGETS)
    assert _rows(labels) == [("10", "Pneumothorax", 1), ("20", "Pneumothorax", 0)]
    assert labels.blank == 1


def test_nih_csv_gz_with_other_targets(tmp_path: Path) -> None:
    text = (
        "Image Index,Finding Labels,Patient ID\n"
        "x1.png,Cardiomegaly|Effusion,1\n"
        "x2.png,No Finding,2\n"
        "x3.png,Pleural_Thickening | Mass,3\n"
        "x4.png,,4\n"
    )
    path = tmp_path / "Data_Entry.csv.gz"
    path.write_bytes(gzip.compress(text.encode()))
    targets = ["Cardiomegaly", "Effusion", "Pleural Thickening", ""]
    labels = read_labels(str(path), key_column="file_name", targets=targets)  # no file_name: Image Index
    assert labels.format == "nih"
    assert _rows(labels) == sorted(
        (key, t, int(key in pos))
        for t, pos in {
            "Cardiomegaly": {"x1.png"},
            "Effusion": {"x1.png"},
            "Pleural Thickening": {"x3.png"},
        }.items()
        for key in ("x1.png", "x2.png", "x3.png")
    )
    others = set(NIH_FINDINGS) - {"Cardiomegaly", "Effusion", "Pleural_Thickening"}
    assert labels.unmapped == {"No Finding": 1, **dict.fromkeys(others, 3)}
    assert labels.blank == 1 and labels.rows_read == 4


def test_chexpert_style_with_a_key_column_and_other_columns(tmp_path: Path) -> None:
    text = (
        "dicom_id,subject_id,study_id,ViewPosition,Pleural Effusion,Support Devices,No Finding,Atelectasis\n"
        "d1,10,100,PA,1.0,,,-1.0\n"
        "d2,11,101,AP,0.0,1.0,,\n"
        "d3,12,102,PA,,,1.0, 0 \n"
    )
    path = tmp_path / "mimic.csv"
    path.write_text(text)
    labels = read_labels(str(path), key_column="dicom_id", targets=TARGETS)
    assert labels.format == "chexpert"
    assert _rows(labels) == [("d1", "Effusion", 1), ("d2", "Effusion", 0), ("d3", "Atelectasis", 0)]
    assert labels.unmapped == {"No Finding": 1, "Support Devices": 1}
    assert (labels.uncertain, labels.uncertain_dropped, labels.blank) == (1, 1, 6)
    with pytest.raises(LabelsError, match=r"no key column 'file_name'.*columns seen: \['dicom_id', 'subject_id'"):
        read_labels(str(path), key_column="file_name", targets=TARGETS)


def test_delta_table(tmp_path: Path) -> None:
    from deltalake import write_deltalake

    folder = tmp_path / "labels"
    first = pd.DataFrame({"file_name": ["a.png", "b.png"], "pathology": ["Fracture", "Nodule"], "label": [1, 0]})
    write_deltalake(str(folder), first)
    labels = read_labels(str(folder), key_column="file_name", targets=TARGETS)
    assert _rows(labels) == [("a.png", "Fracture", 1), ("b.png", "Nodule", 0)]
    files = sorted(p.name for p in folder.glob("*.parquet"))
    assert labels.sha256 == hashlib.sha256(("".join(f"{f}\n" for f in files) + "version=0\n").encode()).hexdigest()
    assert labels.uri == str(folder.resolve())

    write_deltalake(str(folder), first.assign(file_name=["c.png", "d.png"]), mode="append")
    again = read_labels(str(folder), key_column="file_name", targets=TARGETS)
    assert len(again.table) == 4
    files = sorted(p.name for p in folder.glob("*.parquet"))
    assert again.sha256 == hashlib.sha256(("".join(f"{f}\n" for f in files) + "version=1\n").encode()).hexdigest()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "labels file not found"),
        (b"", r"is empty \(0 bytes\)"),
        (b"image_id,pathology,label\n", "no label rows"),
        (b"\n", "has no header and no rows"),
        (gzip.compress(TIDY_CSV.encode())[:-8], "cannot read it as CSV or Parquet: Compressed file ended"),
        (b"PAR1" + bytes(20), "cannot read it as CSV or Parquet"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "labels.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LabelsError, match=message):
        read_labels(str(path), key_column="image_id", targets=TARGETS)


def test_key_column_errors(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(TIDY_CSV)
    with pytest.raises(LabelsError, match=r"give the key column .*columns seen: \['image_id', 'pathology', 'label'\]"):
        read_labels(str(path), targets=TARGETS)
    with pytest.raises(LabelsError, match=r"no key column 'file_name' .*\['image_id', 'pathology', 'label'\]"):
        read_labels(str(path), key_column="file_name", targets=TARGETS)


def test_bad_arguments_and_a_plain_folder(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(TIDY_CSV)
    with pytest.raises(LabelsError, match="uncertain='maybe'"):
        read_labels(str(path), key_column="image_id", targets=TARGETS, uncertain="maybe")  # type: ignore[arg-type]
    with pytest.raises(LabelsError, match="no targets given"):
        read_labels(str(path), key_column="image_id", targets=["", ""])
    with pytest.raises(LabelsError, match="folder without _delta_log"):
        read_labels(str(tmp_path), key_column="image_id", targets=TARGETS)


@pytest.mark.slow
def test_s3_file_and_delta_table(tmp_path: Path, settings) -> None:  # type: ignore[no-untyped-def]
    from deltalake import write_deltalake

    from lakehouse import storage
    from tests.conftest import make_bucket

    bucket = make_bucket(settings, "labels-test")
    storage.write_bytes(f"{bucket}/gt/labels.csv", TIDY_CSV.encode(), settings)
    labels = read_labels(f"{bucket}/gt/labels.csv", key_column="image_id", targets=TARGETS, settings=settings)
    assert labels.format == "tidy" and len(labels.table) == 4
    assert labels.sha256 == hashlib.sha256(TIDY_CSV.encode()).hexdigest()
    assert labels.uri == f"{bucket}/gt/labels.csv"

    table_uri = f"{bucket}/gt/delta"
    frame = pd.DataFrame({"image_id": ["a", "b"], "pathology": ["Mass", "Mass"], "label": [1, 0]})
    write_deltalake(table_uri, frame, storage_options=storage.delta_storage_options(table_uri, settings))
    labels = read_labels(table_uri, key_column="image_id", targets=TARGETS, settings=settings)
    assert _rows(labels) == [("a", "Mass", 1), ("b", "Mass", 0)]
    with pytest.raises(LabelsError, match="no labels file or Delta table"):
        read_labels(f"{bucket}/gt/missing.csv", key_column="image_id", targets=TARGETS, settings=settings)
