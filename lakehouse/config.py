"""Settings: one switch (``CXR_PROFILE=local|aws``) picks the whole set of defaults.

Defaults are committed here; secrets (the pseudonym key, AWS credentials) come only from the
environment. CLI flags override environment variables, which override the profile defaults.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Literal

from lakehouse.errors import ConfigError

log = logging.getLogger(__name__)

Profile = Literal["local", "aws"]
ResizeEngine = Literal["cv2", "skimage"]
TensorDtype = Literal["float16", "float32"]

#: Built-in pseudonym key for demos and tests only. Pseudonyms made with it are not secret.
DEV_PSEUDONYM_KEY = "cxr-dev-key-not-secret"

_PROFILE_DEFAULTS: dict[str, dict[str, str]] = {
    "local": {
        "input_uri": "data/samples",
        "lakehouse_uri": "data/lakehouse",
        "spark_master": "local[*]",
    },
    "aws": {
        # On AWS the URIs must be given (CLI flag or CXR_INPUT_URI / CXR_LAKEHOUSE_URI);
        # the Spark master comes from spark-submit on EMR.
        "input_uri": "",
        "lakehouse_uri": "",
        "spark_master": "",
    },
}


@dataclass(frozen=True)
class Settings:
    """Every tunable of the pipeline, resolved once per process."""

    profile: Profile = "local"
    input_uri: str = ""
    lakehouse_uri: str = ""
    spark_master: str = "local[*]"
    #: endpoint of an S3-compatible server (moto, MinIO); empty = AWS itself.
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    pseudonym_key: str = field(default=DEV_PSEUDONYM_KEY, repr=False)
    resize_size: int = 224
    resize_engine: ResizeEngine = "cv2"
    tensor_dtype: TensorDtype = "float16"
    #: refuse images whose header declares more pixels than this (before decoding).
    max_pixels: int = 64_000_000
    #: refuse (quarantine) files larger than this before reading them: a stray archive or video must not
    #: exhaust a worker's memory.
    max_file_bytes: int = 1 << 30
    #: files handed to one Spark task (bounds worker memory and sets the progress granularity).
    files_per_task: int = 256
    #: validation fails when a preprocessing run quarantined more than this share of its inputs.
    max_quarantine_share: float = 0.05

    @property
    def uses_dev_key(self) -> bool:
        """True when pseudonyms are made with the built-in, non-secret key."""
        return self.pseudonym_key == DEV_PSEUDONYM_KEY

    def with_overrides(self, **overrides: object) -> Settings:
        """Return a validated copy with the non-None overrides applied (CLI flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()  # type: ignore[arg-type]

    def validate(self) -> Settings:
        """Check value ranges; return self.

        Raises:
            ConfigError: on a value no run could use.
        """
        if self.resize_size < 8:
            raise ConfigError(f"resize size {self.resize_size} is too small (minimum 8)")
        if self.max_pixels < 1 or self.max_file_bytes < 1:
            raise ConfigError("max pixels and max file bytes must be positive")
        if self.files_per_task < 1:
            raise ConfigError(f"files per task must be at least 1 (got {self.files_per_task})")
        if not 0.0 <= self.max_quarantine_share <= 1.0:
            raise ConfigError(f"max quarantine share must be within [0, 1] (got {self.max_quarantine_share})")
        return self


def _int_env(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw.replace("_", ""))
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not an integer") from exc


def _float_env(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build the settings from the environment.

    Args:
        env: the environment to read; ``os.environ`` when None.

    Returns:
        The resolved settings.

    Raises:
        ConfigError: on an unknown profile or a malformed value.
    """
    e = dict(os.environ if env is None else env)
    profile = e.get("CXR_PROFILE", "local")
    if profile not in _PROFILE_DEFAULTS:
        raise ConfigError(f"CXR_PROFILE={profile!r}: expected one of {sorted(_PROFILE_DEFAULTS)}")
    d = _PROFILE_DEFAULTS[profile]
    engine = e.get("CXR_RESIZE_ENGINE", "cv2")
    if engine not in ("cv2", "skimage"):
        raise ConfigError(f"CXR_RESIZE_ENGINE={engine!r}: expected 'cv2' or 'skimage'")
    dtype = e.get("CXR_TENSOR_DTYPE", "float16")
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"CXR_TENSOR_DTYPE={dtype!r}: expected 'float16' or 'float32'")
    settings = Settings(
        profile=profile,  # type: ignore[arg-type]
        input_uri=e.get("CXR_INPUT_URI", d["input_uri"]),
        lakehouse_uri=e.get("CXR_LAKEHOUSE_URI", d["lakehouse_uri"]),
        spark_master=e.get("CXR_SPARK_MASTER", d["spark_master"]),
        s3_endpoint_url=e.get("CXR_S3_ENDPOINT_URL", e.get("AWS_ENDPOINT_URL_S3", e.get("AWS_ENDPOINT_URL", ""))),
        s3_region=e.get("AWS_REGION", e.get("AWS_DEFAULT_REGION", "us-east-1")),
        pseudonym_key=e.get("CXR_PSEUDONYM_KEY") or DEV_PSEUDONYM_KEY,
        resize_size=_int_env(e, "CXR_RESIZE_SIZE", 224),
        resize_engine=engine,  # type: ignore[arg-type]
        tensor_dtype=dtype,  # type: ignore[arg-type]
        max_pixels=_int_env(e, "CXR_MAX_PIXELS", 64_000_000),
        files_per_task=_int_env(e, "CXR_FILES_PER_TASK", 256),
        max_file_bytes=_int_env(e, "CXR_MAX_FILE_BYTES", 1 << 30),
        max_quarantine_share=_float_env(e, "CXR_MAX_QUARANTINE_SHARE", 0.05),
    )
    return settings.validate()


def warn_if_dev_key(settings: Settings) -> None:
    """Log a loud warning when pseudonyms are made with the built-in development key."""
    if settings.uses_dev_key:
        log.warning(
            "!!! CXR_PSEUDONYM_KEY is not set: patient pseudonyms use the built-in DEVELOPMENT key and "
            "can be reversed by anyone with this source code. Set CXR_PSEUDONYM_KEY to a secret "
            "(e.g. from AWS Secrets Manager) before ingesting real patient data. !!!"
        )
