"""Ground-truth label files read into one tidy form, their label names mapped to TorchXRayVision's targets.

Three layouts are read (:func:`detect_format` tells them apart from the column names):

- ``tidy``: one row per (key, finding): a key column named by the caller, ``pathology`` and ``label``
  (1, 0, or -1 for uncertain).
- ``nih``: ChestX-ray14's ``Data_Entry_2017``: ``Image Index`` and ``Finding Labels`` (``|``-separated).
  Each image is labelled 1 or 0 for each of the 14 NIH findings (``No Finding`` images are 0 for all 14).
- ``chexpert``: one column per finding (CheXpert, MIMIC-CXR's CheXpert-labeler file, RSNA's ``Target``):
  1, 0, -1 (uncertain) or blank (unlabeled: never a negative).

Files are CSV (gzip- or zip-compressed too) or Parquet, told apart by their first bytes, or a Delta table
folder; local or ``s3://``. Label names of the NIH, CheXpert, MIMIC-CXR, PadChest, RSNA Pneumonia,
SIIM-ACR Pneumothorax and VinDr-CXR vocabularies are mapped with :data:`LABEL_SYNONYMS`, which follows
``torchxrayvision.datasets`` (its dataset classes' renames and PadChest/VinDr synonym lists). Nothing is
dropped silently: labels without a target, uncertain and blank cells are counted in :class:`Labels`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from lakehouse import storage
from lakehouse.errors import CxrError, SourceReadError
from lakehouse.tables import PATHOLOGY_COLUMNS

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from lakehouse.config import Settings

log = logging.getLogger(__name__)

LabelFormat = Literal["tidy", "nih", "chexpert"]
Uncertain = Literal["ignore", "positive", "negative"]
LABEL_FORMATS: tuple[str, ...] = get_args(LabelFormat)
UNCERTAIN_RULES: tuple[str, ...] = get_args(Uncertain)

#: the columns of :attr:`Labels.table`
TABLE_COLUMNS = ("key", "pathology", "label")
#: NIH ChestX-ray14's columns: the key (a file name) and the ``|``-separated findings
NIH_KEY, NIH_FINDINGS = "Image Index", "Finding Labels"
#: the key column of a CheXpert-style file when the caller's key column is not in it
CHEXPERT_KEY = "Path"
#: the tidy layout's columns besides the key
TIDY_PATHOLOGY, TIDY_LABEL = "pathology", "label"
#: the 14 findings of ``Finding Labels`` read as 1/0 columns (``torchxrayvision.datasets.NIH_Dataset``)
NIH_LABELS: tuple[str, ...] = (
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
#: cell text read as blank (unlabeled) besides an empty cell: R, pandas and SQL exports write these
_BLANK_TEXT = frozenset({"", "na", "nan", "null", "none"})


class LabelsError(CxrError):
    """A labels file cannot be read: missing, empty, of an unknown layout, or with bad or conflicting labels."""


def normalize_name(name: str) -> str:
    """A label name compared without case, whitespace, underscores or hyphens (``Pleural_Thickening`` ->
    ``pleuralthickening``)."""
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


# --- the mapping table ----------------------------------------------------------------------------------
#: Each vocabulary's label names, spelled as its files spell them, -> the TorchXRayVision target name
#: (a key of ``lakehouse.tables.PATHOLOGY_COLUMNS``), or None for a finding that is no model target (read,
#: then counted as unmapped). A name is mapped only where ``torchxrayvision.datasets`` maps it (or it is
#: a target's own name); where xrv maps one name to two targets, the choice is commented.
VOCABULARIES: dict[str, dict[str, str | None]] = {
    # NIH_Dataset: the 14 findings are xrv's own names. BBox_List_2017 spells Infiltration "Infiltrate".
    "nih": {
        **{name: name for name in NIH_LABELS},
        "Infiltrate": "Infiltration",
        "No Finding": None,
    },
    # NIH_Google_Dataset (the 2019 expert labels of 4,376 NIH images)
    "nih_google": {
        "Fracture": "Fracture",
        "Pneumothorax": "Pneumothorax",
        "Airspace opacity": "Lung Opacity",
        "Nodule or mass": None,  # xrv keeps it as "Nodule/Mass": neither Nodule nor Mass
    },
    # CheX_Dataset; MIMIC_Dataset reads the same CheXpert-labeler columns and renames them the same way
    "chexpert": {
        "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
        "Cardiomegaly": "Cardiomegaly",
        "Lung Opacity": "Lung Opacity",
        "Airspace Opacity": "Lung Opacity",  # the CheXpert paper's name of Lung Opacity
        "Lung Lesion": "Lung Lesion",
        "Edema": "Edema",
        "Consolidation": "Consolidation",
        "Pneumonia": "Pneumonia",
        "Atelectasis": "Atelectasis",
        "Pneumothorax": "Pneumothorax",
        "Pleural Effusion": "Effusion",
        "Fracture": "Fracture",
        "Pleural Other": None,
        "Support Devices": None,
        "No Finding": None,
    },
    # PC_Dataset matches substrings of each image's label list: xrv's pathology name lower-cased, plus its
    # synonym lists. Listed: every label of the PadChest file that this matches to a target.
    "padchest": {
        "atelectasis": "Atelectasis",
        "laminar atelectasis": "Atelectasis",
        "lobar atelectasis": "Atelectasis",
        "segmental atelectasis": "Atelectasis",
        "atelectasis basal": "Atelectasis",
        "total atelectasis": "Atelectasis",
        "round atelectasis": "Atelectasis",
        "cardiomegaly": "Cardiomegaly",
        # xrv counts "consolidation" and "air bronchogram" for both Consolidation and Infiltration; one
        # name has one target here: Consolidation (the name itself; the air bronchogram is its sign)
        "consolidation": "Consolidation",
        "air bronchogram": "Consolidation",
        "infiltrates": "Infiltration",
        "interstitial pattern": "Infiltration",
        "ground glass pattern": "Infiltration",
        "reticular interstitial pattern": "Infiltration",
        "reticulonodular interstitial pattern": "Infiltration",
        "alveolar pattern": "Infiltration",
        "pneumothorax": "Pneumothorax",
        "hydropneumothorax": "Pneumothorax",
        "pulmonary edema": "Edema",
        "emphysema": "Emphysema",
        "pulmonary fibrosis": "Fibrosis",  # also VinDr's "Pulmonary fibrosis": one name, one target
        "pleural effusion": "Effusion",
        "loculated pleural effusion": "Effusion",
        "loculated fissural effusion": "Effusion",
        "pneumonia": "Pneumonia",
        "atypical pneumonia": "Pneumonia",
        "pleural thickening": "Pleural_Thickening",
        "apical pleural thickening": "Pleural_Thickening",
        "calcified pleural thickening": "Pleural_Thickening",
        "nodule": "Nodule",
        "multiple nodules": "Nodule",
        "mass": "Mass",
        "pulmonary mass": "Mass",
        "mediastinal mass": "Mass",
        "pleural mass": "Mass",
        "soft tissue mass": "Mass",
        "breast mass": "Mass",
        "hiatal hernia": "Hernia",
        "fracture": "Fracture",
        "rib fracture": "Fracture",
        "callus rib fracture": "Fracture",
        "clavicle fracture": "Fracture",
        "humeral fracture": "Fracture",
        "vertebral fracture": "Fracture",
        # substring hits of xrv that name another finding: not a nodule, not pleural, not lung emphysema
        "pseudonodule": None,
        "pericardial effusion": None,
        "subcutaneous emphysema": None,
        "normal": None,
        # PC_Dataset's pathologies that are no target
        **dict.fromkeys(
            (
                "Granuloma",
                "Flattened Diaphragm",
                "Bronchiectasis",
                "Aortic Elongation",
                "Scoliosis",
                "Hilar Enlargement",
                "Tuberculosis",
                "Air Trapping",
                "Costophrenic Angle Blunting",
                "Aortic Atheromatosis",
                "Hemidiaphragm Elevation",
                "Support Devices",
                "Tube",
            )
        ),
    },
    # RSNA_Pneumonia_Dataset labels both Pneumonia and Lung Opacity with the column "Target"; one name has
    # one target here: Lung Opacity, the challenge's name of the class Target=1 marks
    "rsna": {
        "Target": "Lung Opacity",
        "Lung Opacity": "Lung Opacity",
        "Pneumonia": "Pneumonia",
        "No Lung Opacity / Not Normal": None,
        "Normal": None,
    },
    # SIIM_Pneumothorax_Dataset: Pneumothorax where EncodedPixels is not "-1" (convert the RLE file to tidy)
    "siim": {"Pneumothorax": "Pneumothorax"},
    # VinDr_Dataset (VinBrain_Dataset): its 14 classes; "Pleural effusion" and "Pleural thickening" are
    # its synonyms. xrv keeps ILD, Nodule/Mass and the others as labels of their own: no target.
    "vindr": {
        "Atelectasis": "Atelectasis",
        "Cardiomegaly": "Cardiomegaly",
        "Consolidation": "Consolidation",
        "Infiltration": "Infiltration",
        "Lung Opacity": "Lung Opacity",
        "Pleural effusion": "Effusion",
        "Pleural thickening": "Pleural_Thickening",
        "Pneumothorax": "Pneumothorax",
        "Pulmonary fibrosis": "Fibrosis",  # xrv: its own label for VinDr, Fibrosis for PadChest (above)
        "Aortic enlargement": None,
        "Calcification": None,
        "ILD": None,
        "Nodule/Mass": None,
        "Other lesion": None,
        "No finding": None,
        # the image-level labels of the PhysioNet release that xrv does not read (Edema, Emphysema,
        # Pneumonia and the fractures map by their names, above)
        **dict.fromkeys(
            (
                "Enlarged PA",
                "Lung cavity",
                "Lung cyst",
                "Mediastinal shift",
                "COPD",
                "Lung tumor",
                "Other disease",
                "Other diseases",
            )
        ),
    },
}


def _build_tables(vocabularies: Mapping[str, Mapping[str, str | None]]) -> tuple[dict[str, str], frozenset[str]]:
    """LABEL_SYNONYMS and NON_TARGET_LABELS from the vocabularies; a name with two meanings is a bug."""
    meaning: dict[str, str | None] = {}
    for vocabulary, names in vocabularies.items():
        for name, target in names.items():
            key = normalize_name(name)
            if key in meaning and meaning[key] != target:
                raise ValueError(f"label {name!r} ({vocabulary}) means {target!r} here but {meaning[key]!r} elsewhere")
            meaning[key] = target
    synonyms = {k: t for k, t in meaning.items() if t is not None}
    return synonyms, frozenset(k for k, t in meaning.items() if t is None)


#: normalize_name(label) -> TorchXRayVision target name, for every vocabulary above
LABEL_SYNONYMS: dict[str, str]
#: normalized names of known findings that are no target ("No Finding", "Support Devices", ...)
NON_TARGET_LABELS: frozenset[str]
LABEL_SYNONYMS, NON_TARGET_LABELS = _build_tables(VOCABULARIES)
_KNOWN_LABELS = frozenset(LABEL_SYNONYMS) | NON_TARGET_LABELS | {normalize_name(p) for p in PATHOLOGY_COLUMNS}


def _canonical(name: str) -> str:
    """The normalized target name a label means (its own normalized name when the table lacks it)."""
    key = normalize_name(name)
    return normalize_name(LABEL_SYNONYMS[key]) if key in LABEL_SYNONYMS else key


def map_label(name: str, targets: Sequence[str]) -> str | None:
    """The target a label name maps to.

    Args:
        name: a label name of any vocabulary (``Pleural Effusion``, ``pleural thickening``, ...).
        targets: the target names (a model's ``targets``; empty names are skipped).

    Returns:
        The element of ``targets`` whose normalized name equals the label's, or that the label and the
        target both mean through :data:`LABEL_SYNONYMS`; None when the label maps to none of them.
    """
    key = normalize_name(name)
    if not key:
        return None
    live = [t for t in targets if normalize_name(t)]
    for t in live:
        if normalize_name(t) == key:
            return t
    canonical = _canonical(name)
    for t in live:
        if _canonical(t) == canonical:
            return t
    return None


def detect_format(columns: Sequence[str]) -> LabelFormat:
    """The layout of a labels file from its column names.

    Args:
        columns: the file's column names.

    Returns:
        ``nih`` with ``Image Index`` and ``Finding Labels``; ``tidy`` with ``pathology`` and ``label``;
        ``chexpert`` when a column is a known finding name (one column per finding).

    Raises:
        LabelsError: none of the three layouts, naming what each needs.
    """
    names = [str(c) for c in columns]
    if {NIH_KEY, NIH_FINDINGS} <= set(names):
        return "nih"
    if {TIDY_PATHOLOGY, TIDY_LABEL} <= set(names):
        return "tidy"
    if any(normalize_name(c) in _KNOWN_LABELS for c in names):
        return "chexpert"
    raise LabelsError(
        f"cannot tell the labels' layout from the columns {names}: expected tidy (a key column, "
        f"'{TIDY_PATHOLOGY}', '{TIDY_LABEL}'), nih ('{NIH_KEY}', '{NIH_FINDINGS}') or chexpert (a key column "
        "and one column per finding, e.g. 'Cardiomegaly', 'Pleural Effusion')"
    )


@dataclass(frozen=True, eq=False)
class Labels:
    """Labels read from one file, in tidy form, with what could not become a row counted."""

    #: columns ``key`` (str), ``pathology`` (a target name), ``label`` (int8 0/1): one row per (key, pathology)
    table: pd.DataFrame
    format: LabelFormat
    #: sha256 of the file's bytes; of a Delta table: of its data file paths (sorted) and version
    sha256: str
    #: the normalized URI read
    uri: str
    #: data rows in the file (images for nih, rows for chexpert and tidy)
    rows_read: int
    #: source label name -> labels (positive or negative) that map to no target
    unmapped: dict[str, int] = field(default_factory=dict)
    #: uncertain (-1) labels seen, and how many of them were dropped (``uncertain="ignore"``)
    uncertain: int = 0
    uncertain_dropped: int = 0
    #: blank label cells (chexpert; tidy rows with an empty label; nih images with empty findings): unlabeled
    blank: int = 0
    #: columns of a one-column-per-finding file read as no label at all (Sex, Age, AP/PA, an unknown name)
    ignored_columns: tuple[str, ...] = ()


@dataclass
class _Tally:
    """What did not become a row, counted while reading."""

    unmapped: Counter[str] = field(default_factory=Counter)
    uncertain: int = 0
    uncertain_dropped: int = 0
    blank: int = 0
    ignored_columns: list[str] = field(default_factory=list)


def read_labels(
    uri: str,
    *,
    key_column: str | None = None,
    targets: Sequence[str],
    uncertain: Uncertain = "ignore",
    settings: Settings | None = None,
) -> Labels:
    """Read a labels file into one row per (key, target pathology).

    Args:
        uri: a CSV (``.csv.gz``, ``.csv.zip`` too) or Parquet file, or a Delta table folder; local or s3://.
        key_column: the column holding the key (e.g. ``image_id``, ``file_name``, ``sop_instance_uid``);
            required for tidy files. NIH and CheXpert files without it are keyed by their own ``Image Index``
            and ``Path`` (kept as given: the caller decides how to join).
        targets: the target names to keep (e.g. a model's ``targets``); other labels count as unmapped.
        uncertain: what a -1 label becomes: dropped (``ignore``, counted), 1 (``positive``) or 0 (``negative``).
        settings: for s3:// (loaded from the environment when None).

    Returns:
        The labels, with the counts of unmapped, uncertain and blank labels.

    Raises:
        LabelsError: a missing, unreadable or empty file, an unknown layout, a missing key column, labels
            other than 0/1/-1/blank, or one (key, pathology) labelled both 0 and 1.
        StorageError: when an s3:// location cannot be asked.
    """
    if uncertain not in UNCERTAIN_RULES:
        raise LabelsError(f"uncertain={uncertain!r}: use one of {', '.join(UNCERTAIN_RULES)}")
    live_targets = [t for t in targets if normalize_name(t)]
    if not live_targets:
        raise LabelsError("no targets given: pass the target names labels are mapped to (e.g. a model's targets)")
    frame, sha256, where = _load(uri, settings)
    if frame.empty:
        raise LabelsError(f"{where}: no label rows (columns {list(frame.columns)})")
    try:
        fmt = detect_format(list(frame.columns))
    except LabelsError as exc:
        raise LabelsError(f"{where}: {exc}") from None
    key = _key_column(frame, fmt, key_column, where)
    keys = frame[key]
    if keys.isna().any():
        raise LabelsError(
            f"{where}: {int(keys.isna().sum())} rows have no {key!r} (e.g. row {int(keys.isna().to_numpy().argmax()) + 1})"
        )
    keys = keys.astype(str)
    tally = _Tally()
    if fmt == "nih":
        parts = _from_nih(frame, keys, live_targets, tally)
    elif fmt == "tidy":
        parts = _from_tidy(frame, keys, live_targets, uncertain, tally, where)
    else:
        parts = _from_wide(frame, keys, key, live_targets, uncertain, tally, where)
    table = _one_row_each(parts, where)
    labels = Labels(
        table=table,
        format=fmt,
        sha256=sha256,
        uri=where,
        rows_read=len(frame),
        unmapped=dict(sorted(tally.unmapped.items())),
        uncertain=tally.uncertain,
        uncertain_dropped=tally.uncertain_dropped,
        blank=tally.blank,
        ignored_columns=tuple(tally.ignored_columns),
    )
    if labels.ignored_columns:
        log.info("%s: columns read as no label: %s", where, ", ".join(labels.ignored_columns))
    log.info(
        "%s (%s): %d rows read -> %d labels of %d keys; unmapped %s, uncertain %d (%d dropped), blank %d",
        where,
        fmt,
        labels.rows_read,
        len(table),
        table["key"].nunique() if len(table) else 0,
        labels.unmapped,
        labels.uncertain,
        labels.uncertain_dropped,
        labels.blank,
    )
    return labels


# --- reading the bytes ---------------------------------------------------------------------------------
def _load(uri: str, settings: Settings | None) -> tuple[pd.DataFrame, str, str]:
    """The rows of a file or Delta table (index 0..n-1), its sha256 and its normalized URI."""
    from lakehouse.config import Settings, load_settings

    where = storage.normalize_uri(uri)
    if settings is None:
        settings = load_settings() if storage.is_s3(where) else Settings()
    if storage.is_s3(where):
        is_file = storage.exists(where, settings)
    else:
        path = Path(where)
        if path.is_dir() and not (path / "_delta_log").is_dir():
            raise LabelsError(
                f"{where} is a folder without _delta_log: give a CSV or Parquet file or a Delta table folder"
            )
        if not path.exists():
            raise LabelsError(f"labels file not found: {where}")
        is_file = not path.is_dir()
    if not is_file:
        frame, sha256 = _read_delta(where, settings)
    else:
        try:
            data = storage.read_bytes(where, settings)
        except SourceReadError as exc:  # an input error elsewhere; here the stage cannot run
            raise LabelsError(f"cannot read the labels: {exc}") from exc
        frame, sha256 = _parse(data, where), _sha256(data)
    return frame.reset_index(drop=True), sha256, where


def _sha256(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def _parse(data: bytes, where: str) -> pd.DataFrame:
    """CSV (plain, gzip or zip) or Parquet bytes -> a frame; CSV cells are read as text."""
    import gzip
    import zipfile
    import zlib

    import pandas as pd

    if not data:
        raise LabelsError(f"{where} is empty (0 bytes): expected a CSV or Parquet labels file")
    try:
        if data[:4] == b"PAR1":
            import pyarrow as pa
            import pyarrow.parquet as pq

            return pq.read_table(pa.BufferReader(data)).to_pandas()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)  # here, not in pandas: a truncated file raises instead of reading short
        compression = "zip" if data[:4] == b"PK\x03\x04" else None
        return pd.read_csv(
            io.BytesIO(data),
            compression=compression,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise LabelsError(f"{where} has no header and no rows: expected a CSV or Parquet labels file") from None
    except (
        pd.errors.ParserError,
        UnicodeDecodeError,
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
    ) as exc:
        raise LabelsError(f"{where}: cannot read it as CSV or Parquet: {exc}") from exc


def _read_delta(where: str, settings: Settings) -> tuple[pd.DataFrame, str]:
    """A Delta table's rows, and the sha256 of its data file paths and version."""
    import pyarrow as pa
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    options = storage.delta_storage_options(where, settings)
    try:
        dt = DeltaTable(where, storage_options=options)
        paths = sorted(str(p) for p in pa.table(dt.get_add_actions(flatten=True)).column("path").to_pylist())
        frame = dt.to_pyarrow_table().to_pandas()
    except TableNotFoundError:
        raise LabelsError(f"no labels file or Delta table at {where}") from None
    except (DeltaError, OSError) as exc:
        raise LabelsError(f"{where}: cannot read the Delta table: {exc}") from exc
    text = "".join(f"{p}\n" for p in paths) + f"version={dt.version()}\n"
    return frame, _sha256(text.encode())


def _key_column(frame: pd.DataFrame, fmt: LabelFormat, key_column: str | None, where: str) -> str:
    """The caller's key column; for nih and chexpert files without it, their own (Image Index, Path)."""
    columns = [str(c) for c in frame.columns]
    if key_column and key_column in columns:
        return key_column
    own = {"nih": NIH_KEY, "chexpert": CHEXPERT_KEY}.get(fmt)
    if own and own in columns:
        return own
    if not key_column:
        raise LabelsError(f"{where}: give the key column of these {fmt} labels (columns seen: {columns})")
    raise LabelsError(f"{where}: no key column {key_column!r} in the {fmt} labels (columns seen: {columns})")


# --- one layout each -------------------------------------------------------------------------------
def _values(column: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(numbers, NaN where blank; blank mask) of a label column of text, numbers or booleans."""
    import numpy as np
    import pandas as pd

    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        numbers = pd.Series(column.astype("Float64").to_numpy(dtype="float64", na_value=np.nan), index=column.index)
        return numbers, numbers.isna()
    numbers = pd.to_numeric(column, errors="coerce").astype("float64")
    blank = column.isna().to_numpy(dtype=bool)
    odd = numbers.isna().to_numpy(dtype=bool) & ~blank  # text that is no plain number: " 1 ", "NA", "yes"
    if odd.any():
        text = column[odd].astype(str).str.strip()
        blank[odd] = text.str.lower().isin(_BLANK_TEXT).to_numpy(dtype=bool)
        numbers[odd] = pd.to_numeric(text, errors="coerce").astype("float64").to_numpy()
    return numbers, pd.Series(blank, index=column.index)


def _check_values(numbers: pd.Series, blank: pd.Series, raw: pd.Series, keys: pd.Series, what: str, where: str) -> None:
    """Raise for cells that are neither blank nor 0, 1 or -1."""
    bad = ~blank & ~numbers.isin((0.0, 1.0, -1.0))
    if bad.any():
        first = bad.to_numpy().argmax()
        raise LabelsError(
            f"{where}: {int(bad.sum())} {what} are not 0, 1, -1 or blank, e.g. {raw.iloc[first]!r} "
            f"for key {keys.iloc[first]!r}"
        )


def _apply_uncertain(numbers: pd.Series, blank: pd.Series, rule: Uncertain, tally: _Tally) -> pd.Series:
    """The labels that become rows (NaN: no row) after the uncertain rule; blanks and -1s counted."""
    unsure = numbers == -1
    n_unsure = int(unsure.sum())
    tally.blank += int(blank.sum())
    tally.uncertain += n_unsure
    if rule == "ignore":
        tally.uncertain_dropped += n_unsure
        return numbers.mask(unsure)
    return numbers.mask(unsure, 1.0 if rule == "positive" else 0.0)


def _part(keys: pd.Series, pathology: str, labels: pd.Series | np.ndarray) -> pd.DataFrame:
    """Rows of one target: the keys and their 0/1 labels."""
    import pandas as pd

    return pd.DataFrame(
        {"key": keys.to_numpy(), "pathology": pathology, "label": pd.Series(labels).to_numpy().astype("int8")}
    )


def _from_nih(frame: pd.DataFrame, keys: pd.Series, targets: Sequence[str], tally: _Tally) -> list[pd.DataFrame]:
    """Each image 1/0 for each of the 14 NIH findings; other tokens (``No Finding``) counted as unmapped."""
    import numpy as np

    findings = frame[NIH_FINDINGS].astype("string").str.strip()
    labelled = (findings.fillna("") != "").to_numpy(dtype=bool)
    tally.blank += int((~labelled).sum())
    tokens = findings[labelled].str.split("|").explode().str.strip()
    tokens = tokens[tokens.fillna("") != ""]
    token_rows = tokens.index.to_numpy()  # the frame's index is 0..n-1: row positions
    normalized = tokens.str.lower().str.replace(r"[\s_\-]+", "", regex=True).to_numpy(dtype=object)
    nih = {normalize_name(n): n for n in NIH_LABELS}
    for token, n in tokens[~np.isin(normalized, list(nih))].value_counts(sort=False).items():
        tally.unmapped[str(token)] += int(n)
    parts = []
    n_labelled = int(labelled.sum())
    for norm, name in nih.items():
        target = map_label(name, targets)
        if target is None:
            tally.unmapped[name] += n_labelled
            continue
        present = np.zeros(len(frame), dtype=bool)
        present[token_rows[normalized == norm]] = True
        parts.append(_part(keys[labelled], target, present[labelled]))
    return parts


def _from_wide(
    frame: pd.DataFrame,
    keys: pd.Series,
    key: str,
    targets: Sequence[str],
    rule: Uncertain,
    tally: _Tally,
    where: str,
) -> list[pd.DataFrame]:
    """One column per finding: the columns that are known finding names or targets; the others are not labels."""
    parts = []
    for column in frame.columns:
        name = str(column)
        if name == key:
            continue
        target = map_label(name, targets)
        if target is None and normalize_name(name) not in _KNOWN_LABELS:
            tally.ignored_columns.append(name)  # Path, Sex, Age, AP/PA, ViewPosition, x, y, ...: not a label
            continue
        numbers, blank = _values(frame[column])
        _check_values(numbers, blank, frame[column], keys, f"labels in column {name!r}", where)
        labels = _apply_uncertain(numbers, blank, rule, tally)
        rows = labels.notna()
        if target is None:
            if int(rows.sum()):
                tally.unmapped[name] += int(rows.sum())
            continue
        parts.append(_part(keys[rows], target, labels[rows]))
    return parts


def _from_tidy(
    frame: pd.DataFrame, keys: pd.Series, targets: Sequence[str], rule: Uncertain, tally: _Tally, where: str
) -> list[pd.DataFrame]:
    """One row per (key, finding): names mapped with map_label; unmapped ones counted by name."""
    import pandas as pd

    names = frame[TIDY_PATHOLOGY]
    if names.isna().any():
        raise LabelsError(
            f"{where}: {int(names.isna().sum())} rows have no {TIDY_PATHOLOGY!r} "
            f"(e.g. key {keys[names.isna()].iloc[0]!r})"
        )
    names = names.astype(str)
    numbers, blank = _values(frame[TIDY_LABEL])
    _check_values(numbers, blank, frame[TIDY_LABEL], keys, f"'{TIDY_LABEL}' values", where)
    labels = _apply_uncertain(numbers, blank, rule, tally)
    mapped = names.map({name: map_label(name, targets) for name in names.unique()})
    rows = labels.notna()
    for name, n in names[rows & mapped.isna()].value_counts(sort=False).items():
        tally.unmapped[str(name)] += int(n)
    kept = rows & mapped.notna()
    return [
        pd.DataFrame(
            {
                "key": keys[kept].to_numpy(),
                "pathology": mapped[kept].astype(str).to_numpy(),
                "label": labels[kept].to_numpy().astype("int8"),
            }
        )
    ]


def _one_row_each(parts: list[pd.DataFrame], where: str) -> pd.DataFrame:
    """The parts as one table: identical duplicates dropped; a (key, pathology) labelled 0 and 1 raises."""
    import pandas as pd

    if not parts:
        return pd.DataFrame(
            {"key": pd.Series(dtype=object), "pathology": pd.Series(dtype=object), "label": pd.Series(dtype="int8")}
        )
    table = pd.concat(parts, ignore_index=True)
    table = table.drop_duplicates(list(TABLE_COLUMNS), ignore_index=True)
    clash = table.duplicated(["key", "pathology"], keep=False)
    if clash.any():
        first = table[clash].iloc[0]
        n = int(table.loc[clash, ["key", "pathology"]].drop_duplicates().shape[0])
        raise LabelsError(
            f"{where}: {n} (key, pathology) pairs are labelled both 0 and 1, e.g. key {first['key']!r} "
            f"{first['pathology']!r}: resolve them (one label per image and finding) before evaluating"
        )
    return table
