"""The Great Expectations (1.x) suites, as Python objects.

Each table has a row suite over its validated frame (see :mod:`expectations.frames`) and cross-row
suites:

- ``tensors`` (one row per tensor of the audited runs), ``tensors_keys`` (the rows of the whole table whose
  ``image_id`` is not unique) and ``tensors_columns`` (one row per column of the table);
- ``quarantine`` (one row per quarantined input) and ``quarantine_runs`` (one row per preprocessing run);
- ``files`` (one row per path judged by the audited runs) and ``files_keys`` (paths with several rows);
- ``predictions`` (one row per prediction of the audited runs), ``predictions_keys`` (predictions of the
  whole table with a repeated key or an image_id absent from ``tensors``) and ``predictions_coverage``
  (one row per tensor x model without a prediction).

The ``*_keys`` and coverage frames hold only the rows that break their rule (Arrow finds them over id
projections of the whole table), so a clean table gives an empty frame and every expectation passes;
each broken rule is reported with the same unexpected rows as over the whole table.

The value range of a tensor is checked on ``tensor_min`` / ``tensor_max``, which preprocessing computes
from the stored values of each tensor; validation does not decode the tensors again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lakehouse.tables import PATHOLOGY_COLUMNS, TENSOR_DTYPES

if TYPE_CHECKING:
    import great_expectations as gx

#: tensor storage dtypes preprocessing may write
ALLOWED_DTYPES = TENSOR_DTYPES
#: source formats preprocessing decodes
KNOWN_FORMATS = ("png", "jpeg", "dicom")
#: TorchXRayVision's value scale
VALUE_MIN, VALUE_MAX = -1024.0, 1024.0


def allowed_shapes(sizes: Sequence[int]) -> list[str]:
    """Shapes (as ``CxHxW`` text) of one-channel square tensors of the given sizes."""
    return [f"1x{s}x{s}" for s in sorted(set(sizes))]


def tensors_suite(*, sizes: Sequence[int] = (224,)) -> gx.ExpectationSuite:
    """Row checks of ``tensors``.

    Args:
        sizes: allowed output sizes (tensor shape ``[1, size, size]``).

    Returns:
        The suite ``tensors``.
    """
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(
        name="tensors",
        meta={"notes": "Tensor bytes are reduced to their length while scanning; value range from tensor_min/max."},
    )
    for col in ("image_id", "tensor_dtype", "tensor_shape", "tensor_nbytes", "source_format", "width", "height"):
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=col))
    for col in ("tensor_min", "tensor_max"):
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=col))
    suite.add_expectation(E.ExpectColumnValuesToMatchRegex(column="image_id", regex=r"^[0-9a-f]{64}$"))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="tensor_dtype", value_set=list(ALLOWED_DTYPES)))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="tensor_shape", value_set=allowed_shapes(sizes)))
    suite.add_expectation(
        E.ExpectColumnPairValuesToBeEqual(
            column_A="tensor_nbytes",
            column_B="expected_nbytes",
            meta={"notes": "byte length of the tensor = product(tensor_shape) x dtype size"},
        )
    )
    for col in ("tensor_min", "tensor_max"):
        suite.add_expectation(E.ExpectColumnValuesToBeBetween(column=col, min_value=VALUE_MIN, max_value=VALUE_MAX))
    suite.add_expectation(
        E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="tensor_max", column_B="tensor_min", or_equal=True)
    )
    for col in ("width", "height"):
        suite.add_expectation(E.ExpectColumnValuesToBeBetween(column=col, min_value=0, strict_min=True))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="source_format", value_set=list(KNOWN_FORMATS)))
    suite.add_expectation(
        E.ExpectColumnValuesToBeInSet(
            column="patient_pseudonym_form",
            value_set=["hmac-sha256-hex"],
            meta={"notes": "a pseudonym is a 64-hex HMAC, never a name or a raw ID (the value is not kept)"},
        )
    )
    return suite


def tensors_keys_suite() -> gx.ExpectationSuite:
    """``image_id`` is unique over the whole ``tensors`` table (the frame: the rows whose id repeats)."""
    import great_expectations as gx

    suite = gx.ExpectationSuite(name="tensors_keys")
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeUnique(
            column="image_id",
            meta={"notes": "over every run: the frame holds the rows whose image_id occurs more than once"},
        )
    )
    return suite


def tensors_columns_suite(*, identifier_keys: Sequence[str]) -> gx.ExpectationSuite:
    """No column of ``tensors`` is named like a direct patient identifier.

    Args:
        identifier_keys: normalized names (lowercase alphanumerics) of the direct identifiers.

    Returns:
        The suite ``tensors_columns`` over one row per column name.
    """
    import great_expectations as gx

    suite = gx.ExpectationSuite(name="tensors_columns")
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToNotBeInSet(
            column="normalized_name",
            value_set=list(identifier_keys),
            meta={"notes": "lakehouse.tables.DIRECT_IDENTIFIERS, compared case- and separator-insensitively"},
        )
    )
    return suite


def quarantine_suite() -> gx.ExpectationSuite:
    """Row checks of ``quarantine``: every row carries a reason and a run."""
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name="quarantine")
    for col in ("error_class", "error_message", "run_id", "stage"):
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=col))
    for col in ("error_class", "error_message"):
        suite.add_expectation(E.ExpectColumnValueLengthsToBeBetween(column=col, min_value=1))
    suite.add_expectation(E.ExpectColumnValuesToMatchRegex(column="error_class", regex=r"^[A-Za-z_][A-Za-z0-9_]*$"))
    return suite


def files_suite() -> gx.ExpectationSuite:
    """Row checks of the ``files`` ledger: one judgement per path, a known outcome, a reason for every
    file that did not become a tensor, a content hash for every file that did."""
    import great_expectations as gx

    from lakehouse.tables import FILE_OUTCOMES

    E = gx.expectations
    suite = gx.ExpectationSuite(name="files")
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="outcome", value_set=list(FILE_OUTCOMES)))
    for col in ("outcome", "run_id"):
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=col))
    suite.add_expectation(
        E.ExpectColumnValuesToBeInSet(
            column="has_reason", value_set=[True], meta={"notes": "skipped, quarantined and retryable files say why"}
        )
    )
    suite.add_expectation(
        E.ExpectColumnValuesToBeInSet(
            column="has_image_id", value_set=[True], meta={"notes": "new, present and duplicate files were hashed"}
        )
    )
    return suite


def files_keys_suite() -> gx.ExpectationSuite:
    """One judgement per path over the whole ledger (the frame: the rows of paths judged more than once)."""
    import great_expectations as gx

    suite = gx.ExpectationSuite(name="files_keys")
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeUnique(
            column="path_key", meta={"notes": "over every run: path_key is the sha256 of the path"}
        )
    )
    return suite


def quarantine_runs_suite(*, max_share: float) -> gx.ExpectationSuite:
    """Per preprocessing run: the share of its inputs that were quarantined stays under ``max_share``.

    Args:
        max_share: the largest acceptable quarantined / discovered share of one run.

    Returns:
        The suite ``quarantine_runs``.
    """
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name="quarantine_runs", meta={"max_quarantine_share": max_share})
    suite.add_expectation(
        E.ExpectColumnValuesToNotBeNull(
            column="discovered", meta={"notes": "every run that quarantined inputs wrote runs/<run_id>.json"}
        )
    )
    suite.add_expectation(E.ExpectColumnValuesToBeUnique(column="run_id"))
    suite.add_expectation(
        E.ExpectColumnValuesToBeBetween(column="quarantine_share", min_value=0.0, max_value=max_share)
    )
    return suite


def predictions_suite() -> gx.ExpectationSuite:
    """Row checks of ``predictions`` (the audited runs' rows): ids present, probabilities in [0, 1] or null."""
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name="predictions")
    for col in ("image_id", "model_id"):
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=col))
    for col in PATHOLOGY_COLUMNS.values():
        suite.add_expectation(E.ExpectColumnValuesToBeBetween(column=col, min_value=0.0, max_value=1.0))
    suite.add_expectation(
        E.ExpectColumnValuesToBeInSet(
            column="nan_probability", value_set=[False], meta={"notes": "no probability is NaN (null is allowed)"}
        )
    )
    return suite


def predictions_keys_suite() -> gx.ExpectationSuite:
    """Over the whole ``predictions`` table: (``image_id``, ``model_id``) unique, every ``image_id`` a key
    of ``tensors`` (the frame: the predictions that break either rule)."""
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name="predictions_keys")
    suite.add_expectation(E.ExpectCompoundColumnsToBeUnique(column_list=["image_id", "model_id"]))
    suite.add_expectation(
        E.ExpectColumnValuesToBeInSet(
            column="in_tensors", value_set=[True], meta={"notes": "every image_id is a key of tensors"}
        )
    )
    return suite


def predictions_coverage_suite() -> gx.ExpectationSuite:
    """No tensor lacks a prediction for the models of the run (the frame: one row per missing pair)."""
    import great_expectations as gx

    suite = gx.ExpectationSuite(name="predictions_coverage")
    suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column="has_prediction"))
    suite.add_expectation(gx.expectations.ExpectColumnValuesToBeInSet(column="has_prediction", value_set=[True]))
    return suite


def drift_suite(*, max_psi: float) -> gx.ExpectationSuite:
    """The drift gate over one inference run's ``drift`` rows: every gated PSI within its threshold
    (``max_psi`` or more, see :mod:`cxr.drift`).

    The frame (``expectations.frames.drift_frame``) holds the run's rows; ``gated`` marks the PSI rows
    with a reference and enough images (the others are reported, not gated).

    Args:
        max_psi: the largest acceptable population stability index.

    Returns:
        The suite ``drift``.
    """
    import great_expectations as gx

    from lakehouse.tables import DRIFT_STATUSES

    E = gx.expectations
    suite = gx.ExpectationSuite(name="drift", meta={"max_psi": max_psi})
    suite.add_expectation(
        E.ExpectColumnValuesToBeInSet(
            column="checked",
            value_set=[True],
            meta={"notes": "every inference run about to be published was checked for drift (cxr drift)"},
        )
    )
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="status", value_set=[*DRIFT_STATUSES, "missing"]))
    suite.add_expectation(
        E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="threshold",
            column_B="gated_psi",
            or_equal=True,
            ignore_row_if="either_value_is_missing",
            meta={
                "notes": "PSI against the reference run within its threshold (max of the configured limit and "
                "the sampling-noise PSI); rows without a reference or with too few images are not gated"
            },
        )
    )
    return suite


def evaluation_suite() -> gx.ExpectationSuite:
    """Row checks of ``evaluation``: metrics in range, counts consistent, unique key."""
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name="evaluation")
    suite.add_expectation(
        E.ExpectCompoundColumnsToBeUnique(
            column_list=["evaluation_id", "model_id", "pathology", "slice", "slice_value"]
        )
    )
    for col in ("auroc", "auroc_ci_low", "auroc_ci_high", "auprc", "ece", "sensitivity", "specificity", "ppv", "npv"):
        suite.add_expectation(E.ExpectColumnValuesToBeBetween(column=col, min_value=0.0, max_value=1.0))
    for col in ("n_pos", "n_neg", "n_unlabeled"):
        suite.add_expectation(E.ExpectColumnValuesToBeBetween(column=col, min_value=0))
    suite.add_expectation(
        E.ExpectColumnValuesToBeInSet(
            column="null_explained", value_set=[True], meta={"notes": "a null AUROC carries its reason"}
        )
    )
    return suite


def thresholds_suite() -> gx.ExpectationSuite:
    """Row checks of ``thresholds``: one per model and pathology, a probability, a stated rule."""
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name="thresholds")
    suite.add_expectation(E.ExpectCompoundColumnsToBeUnique(column_list=["model_id", "pathology"]))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="threshold", min_value=0.0, max_value=1.0))
    suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column="threshold"))
    suite.add_expectation(E.ExpectColumnValuesToMatchRegex(column="rule", regex=r"^(youden|sensitivity=(0?\.\d+|1))$"))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="n_pos", min_value=1))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="n_neg", min_value=1))
    return suite
