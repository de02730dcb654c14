"""The pseudonym key: refused in the aws profile when it is the built-in one, and fingerprinted in the
``tensors`` table so that a run with another key (which would split every patient in two) is refused."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from lakehouse import delta_rs
from lakehouse.config import (
    DEV_PSEUDONYM_KEY,
    Settings,
    key_fingerprint,
    load_settings,
    require_production_key,
    warn_if_dev_key,
)
from lakehouse.errors import ConfigError
from lakehouse.tables import TENSORS
from tests.conftest import TEST_KEY, make_bucket

#: HMAC-SHA256(key, "cxr-pseudonym-key-fingerprint-v1"), first 16 hex digits (computed with openssl)
FINGERPRINTS = {TEST_KEY: "41cab575541be69e", DEV_PSEUDONYM_KEY: "8b0b0ce7641c78f5"}


@pytest.mark.parametrize(("key", "expected"), sorted(FINGERPRINTS.items()))
def test_key_fingerprint_is_a_keyed_hash_of_a_fixed_string(key: str, expected: str) -> None:
    assert key_fingerprint(key) == expected
    assert key not in expected


# --- the built-in key in the aws profile -----------------------------------------------------------------
def test_aws_profile_refuses_the_built_in_key(caplog: pytest.LogCaptureFixture) -> None:
    aws_dev = load_settings({"CXR_PROFILE": "aws"})
    assert aws_dev.uses_dev_key
    with pytest.raises(ConfigError, match="set CXR_PSEUDONYM_KEY to a secret"):
        require_production_key(aws_dev)
    with pytest.raises(ConfigError, match="built-in development pseudonym key"):
        warn_if_dev_key(aws_dev)  # the call every preprocessing run makes at its start
    require_production_key(load_settings({"CXR_PROFILE": "aws", "CXR_PSEUDONYM_KEY": "hospital-secret"}))

    local_dev = load_settings({})
    require_production_key(local_dev)  # the local profile only warns
    with caplog.at_level(logging.WARNING, logger="lakehouse.config"):
        warn_if_dev_key(local_dev)
    assert "DEVELOPMENT key" in caplog.text


# --- the key's fingerprint in the tensors table ------------------------------------------------------------
def _recorded(lake: str, settings: Settings) -> str | None:
    config = delta_rs.open_table(lake, TENSORS, settings).metadata().configuration
    return config.get(delta_rs.KEY_FINGERPRINT_PROPERTY)


def test_new_table_records_the_key_and_another_key_is_refused(tmp_path: Path, settings: Settings) -> None:
    lake = str(tmp_path / "lake")
    assert delta_rs.check_key_fingerprint(lake, TENSORS, settings) == FINGERPRINTS[TEST_KEY]  # creates the table
    assert _recorded(lake, settings) == FINGERPRINTS[TEST_KEY]
    assert delta_rs.open_table(lake, TENSORS, settings).version() == 0  # recorded in the creating commit
    assert delta_rs.check_key_fingerprint(lake, TENSORS, settings) == FINGERPRINTS[TEST_KEY]
    assert delta_rs.open_table(lake, TENSORS, settings).version() == 0  # the same key: no new commit

    other = replace(settings, pseudonym_key="another-key")
    with pytest.raises(ConfigError) as err:
        delta_rs.check_key_fingerprint(lake, TENSORS, other)
    message = str(err.value)
    assert f"made with another key (fingerprint {FINGERPRINTS[TEST_KEY]};" in message
    assert "split every patient in two: set CXR_PSEUDONYM_KEY to the original key or use a new lakehouse" in message
    assert "another-key" not in message and TEST_KEY not in message  # fingerprints only, never a key
    assert _recorded(lake, settings) == FINGERPRINTS[TEST_KEY]  # unchanged by the refused run

    dev = replace(settings, pseudonym_key=DEV_PSEUDONYM_KEY)
    with pytest.raises(ConfigError, match="another key"):  # the built-in key is a key like any other
        delta_rs.check_key_fingerprint(lake, TENSORS, dev)


def test_a_table_made_before_fingerprints_adopts_the_current_key(tmp_path: Path, settings: Settings) -> None:
    lake = str(tmp_path / "lake")
    delta_rs.ensure_table(lake, TENSORS, settings)
    assert _recorded(lake, settings) is None
    dev = replace(settings, pseudonym_key=DEV_PSEUDONYM_KEY)
    assert delta_rs.check_key_fingerprint(lake, TENSORS, dev) == FINGERPRINTS[DEV_PSEUDONYM_KEY]
    assert _recorded(lake, settings) == FINGERPRINTS[DEV_PSEUDONYM_KEY]
    with pytest.raises(ConfigError, match=f"fingerprint {FINGERPRINTS[DEV_PSEUDONYM_KEY]};"):
        delta_rs.check_key_fingerprint(lake, TENSORS, settings)


@pytest.mark.parametrize("made_before_fingerprints", [False, True])
def test_the_fingerprint_keeps_the_table_readable(
    tmp_path: Path, settings: Settings, made_before_fingerprints: bool
) -> None:
    """A custom property, recorded at creation or added later, changes no protocol and adds no table
    feature; the contract's properties stay (delta-rs and Athena engine v3 still read the table)."""
    lake = str(tmp_path / "lake")
    if made_before_fingerprints:
        delta_rs.ensure_table(lake, TENSORS, settings)
    delta_rs.check_key_fingerprint(lake, TENSORS, settings)
    dt = delta_rs.open_table(lake, TENSORS, settings)
    assert dt.version() == (1 if made_before_fingerprints else 0)
    proto = dt.protocol()
    assert (proto.min_reader_version, proto.min_writer_version) == (1, 2)
    assert not proto.reader_features and not proto.writer_features
    expected = {**dict(TENSORS.properties), "cxr.pseudonymKeyFingerprint": FINGERPRINTS[TEST_KEY]}
    assert dt.metadata().configuration == expected
    assert dt.to_pyarrow_table().num_rows == 0


@pytest.mark.slow
def test_fingerprint_on_s3(settings: Settings) -> None:
    """A new s3:// table gets the property in its creating commit (deltalake's alter, needed only for a
    table from before fingerprints, would hold the GIL against the in-process S3 server of the tests)."""
    lake = f"{make_bucket(settings, 'cxr-keys')}/lake"
    assert delta_rs.check_key_fingerprint(lake, TENSORS, settings) == FINGERPRINTS[TEST_KEY]
    assert _recorded(lake, settings) == FINGERPRINTS[TEST_KEY]
    with pytest.raises(ConfigError, match="another key"):
        delta_rs.check_key_fingerprint(lake, TENSORS, replace(settings, pseudonym_key="another-key"))
