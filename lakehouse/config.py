"""Settings: one switch (``CXR_PROFILE=local|aws``) picks the whole set of defaults.

Every ``CXR_*`` variable the project reads is read here, once per process, and nowhere else: the table
:data:`VARIABLES` names each one, the setting it fills and its default. Defaults are committed here;
secrets (the pseudonym key, AWS credentials) come only from the environment. CLI flags override
environment variables, which override the profile defaults. ``cxr config`` prints the effective settings
and where each value came from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

from lakehouse.errors import ConfigError
from lakehouse.tables import RESIZE_ENGINES, TENSOR_DTYPES, ResizeEngine, TensorDtype

log = logging.getLogger(__name__)

Profile = Literal["local", "aws"]
InferRunner = Literal["auto", "docker", "process"]
EmrMode = Literal["serverless", "cluster"]
SparkLogLevel = Literal["ALL", "TRACE", "DEBUG", "INFO", "WARN", "ERROR", "OFF"]
EcsLaunchType = Literal["FARGATE", "EC2", "EXTERNAL"]
InferBackend = Literal["ecs", "batch"]
Source = Literal["flag", "env", "profile", "default"]

#: Built-in pseudonym key for demos and tests only. Pseudonyms made with it are not secret.
DEV_PSEUDONYM_KEY = "cxr-dev-key-not-secret"

#: the CloudWatch namespace of the pipeline's metrics on AWS (the monitoring stack alarms on it)
METRICS_NAMESPACE = "CXR/Pipeline"
#: ``CXR_METRICS_NAMESPACE`` values that turn publishing off (an empty variable means "not set")
_METRICS_OFF = ("off", "none")

_PROFILE_DEFAULTS: dict[str, dict[str, str]] = {
    "local": {
        "input_uri": "data/samples",
        "lakehouse_uri": "data/lakehouse",
        "spark_master": "local[*]",
        "metrics_namespace": "",
    },
    "aws": {
        # On AWS the URIs must be given (CLI flag or CXR_INPUT_URI / CXR_LAKEHOUSE_URI);
        # the Spark master comes from spark-submit on EMR.
        "input_uri": "",
        "lakehouse_uri": "",
        "spark_master": "",
        # the CloudWatch namespace the monitoring stack's alarms watch (infra/)
        "metrics_namespace": METRICS_NAMESPACE,
    },
}


@dataclass(frozen=True)
class SparkSettings:
    """The local Spark session (under spark-submit on EMR, spark-submit's own options win)."""

    driver_memory: str = "4g"
    ui: bool = False
    shuffle_partitions: int = 8
    #: Delta rebuilds table state after each commit with this many partitions (default 50 costs seconds).
    delta_snapshot_partitions: int = 2
    #: log4j2 level of the Spark JVM (WARN keeps the terminal readable; logs of `cxr run` go to files).
    log_level: SparkLogLevel = "WARN"
    #: driver JVM options replacing the defaults (C1 JIT, the class-data-sharing archive); empty = defaults.
    java_opts: str = ""
    #: the file listing the resolved Delta/S3A jars; empty = jvm/classpath.txt (written by `make setup`).
    classpath_file: str = ""


@dataclass(frozen=True)
class AirflowSettings:
    """What the DAG and its operators read at parse time."""

    retry_delay_s: int = 60
    poke_interval_s: int = 60
    #: the new-images sensor gives up (the run is skipped) after this long.
    wait_timeout_s: int = 6 * 3600
    #: how the local profile runs inference: in its container (docker), as a process, or docker when a
    #: Docker daemon socket is present (auto).
    infer_runner: InferRunner = "auto"
    infer_image: str = "cxr-infer:latest"
    #: host folder bind-mounted at the same path into the inference container (a folder lakehouse).
    docker_mount: str = ""
    #: the ``cxr`` executable tasks call; empty = the one beside this Python.
    cli: str = ""
    #: the fan-out of inference when the ``infer_shards`` Param is 0 (auto): one shard task per this many
    #: predictions to write (images lacking a prediction, summed over the run's models).
    infer_images_per_task: int = 20_000
    #: the most shard tasks one run fans inference out to (auto, and the Param's maximum).
    infer_max_shards: int = 32
    #: local profile: the cores one inference process is given; shards are capped at cores // this, and
    #: each of N > 1 local shard processes runs with cores // N threads.
    infer_threads_per_task: int = 4


@dataclass(frozen=True)
class AwsSettings:
    """The aws profile's services."""

    emr_mode: EmrMode = "serverless"
    ecs_launch_type: EcsLaunchType = "FARGATE"
    #: where the inference shards run: ECS tasks (CPU, Fargate by default) or AWS Batch jobs (a GPU queue).
    infer_backend: InferBackend = "ecs"


@dataclass(frozen=True)
class InferenceSettings:
    """The inference job."""

    #: glibc allocator tuning in the inference process (see docs/benchmarks.md); False to disable.
    malloc_tuning: bool = True
    #: mixed precision on CUDA when ``cxr infer`` is not given ``--amp`` (e.g. set in a GPU job definition's
    #: environment); ignored on the CPU. It changes the numbers: float16 activations.
    amp: bool = False
    #: where `--graph onnx` keeps its exported models; empty = ~/.cache/cxr/onnx.
    onnx_cache: str = ""
    #: a mirror of xrv's weights release (air-gapped download); empty = GitHub.
    weights_base_url: str = ""
    #: pinned sha256 per model id (``CXR_WEIGHTS_SHA256_<MODEL>``), checked after a download.
    weights_sha256: tuple[tuple[str, str], ...] = ()


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
    #: attempts of each S3 request (botocore's standard retry mode: exponential backoff between them)
    s3_max_attempts: int = 5
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
    #: DICOM modalities that are decoded; any other modality is ``skipped`` (from the header, pixels unread).
    #: A missing Modality is taken from the SOP class (CR, DX, MG, IO); name ``NONE`` to take files whose
    #: SOP class implies none (e.g. secondary captures); name ``OT``/``SC``... for those modalities.
    modalities: tuple[str, ...] = ("CR", "DX", "RG")
    #: tensors are committed every this many new images (a kill loses at most one batch; a remainder
    #: under a quarter batch joins the last one) ...
    commit_every_images: int = 2000
    #: ... or every this many seconds of decoding, whichever comes first.
    commit_every_s: float = 300.0
    #: one file's decode is stopped (and the file quarantined as DecodeTimeout) after this long.
    decode_timeout_s: float = 60.0
    #: the drift gate: publishing fails when a PSI (a probability, or an input statistic) exceeds this.
    drift_max_psi: float = 0.25
    #: runs scoring fewer images are not gated on drift (status ``insufficient``); above it, the gate also
    #: allows for sampling noise at the run's size (``cxr.drift``).
    drift_min_images: int = 20
    #: the inference run drift is measured against; empty: the first published inference run.
    drift_reference_run: str = ""
    #: the CloudWatch namespace the DAG's tasks publish the run's metrics to (QuarantineShare,
    #: ValidationFailures, ImagesPreprocessed, ImagesQuarantined, PredictionsWritten); empty = not published
    #: (the local profile's default; ``off`` turns the aws profile's ``CXR/Pipeline`` off).
    metrics_namespace: str = ""
    spark: SparkSettings = field(default_factory=SparkSettings)
    airflow: AirflowSettings = field(default_factory=AirflowSettings)
    aws: AwsSettings = field(default_factory=AwsSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    #: where each value came from, by dotted setting name ("flag", "env", "profile", "default").
    sources: Mapping[str, Source] = field(default_factory=dict, repr=False, compare=False)

    @property
    def uses_dev_key(self) -> bool:
        """True when pseudonyms are made with the built-in, non-secret key."""
        return self.pseudonym_key == DEV_PSEUDONYM_KEY

    def source(self, name: str) -> Source:
        """Where the setting ``name`` (dotted for sub-settings, e.g. ``spark.log_level``) came from."""
        return self.sources.get(name, "default")

    def weights_sha256_for(self, model_id: str) -> str | None:
        """The sha256 pinned for ``model_id`` through the environment, or None."""
        return dict(self.inference.weights_sha256).get(_pin_key(model_id))

    def with_overrides(self, **overrides: object) -> Settings:
        """Return a validated copy with the non-None overrides applied (CLI flags; top-level settings)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        sources = {**self.sources, **dict.fromkeys(given, "flag")}
        return replace(self, **given, sources=sources).validate()  # type: ignore[arg-type]

    def validate(self) -> Settings:
        """Check value ranges; return self.

        Raises:
            ConfigError: on a value no run could use.
        """
        if self.resize_size < 8:
            raise ConfigError(f"resize size {self.resize_size} is too small (minimum 8)")
        if self.max_pixels < 1 or self.max_file_bytes < 1:
            raise ConfigError("max pixels and max file bytes must be positive")
        if self.s3_max_attempts < 1:
            raise ConfigError(f"S3 max attempts must be at least 1 (got {self.s3_max_attempts})")
        if self.files_per_task < 1:
            raise ConfigError(f"files per task must be at least 1 (got {self.files_per_task})")
        if self.commit_every_images < 1 or self.commit_every_s <= 0:
            raise ConfigError("commit every images/seconds must be positive")
        if self.decode_timeout_s <= 0:
            raise ConfigError(f"decode timeout must be positive (got {self.decode_timeout_s})")
        if not self.modalities:
            raise ConfigError("the modality allowlist is empty: name at least one (e.g. CR,DX,RG)")
        if not 0.0 <= self.max_quarantine_share <= 1.0:
            raise ConfigError(f"max quarantine share must be within [0, 1] (got {self.max_quarantine_share})")
        if not self.drift_max_psi > 0 or self.drift_min_images < 1:
            raise ConfigError("the drift PSI limit must be positive and the minimum images at least 1")
        ns = self.metrics_namespace
        if ns and (len(ns) > 255 or ns.startswith("AWS/") or not all(c.isalnum() or c in "._-/#: " for c in ns)):
            raise ConfigError(
                f"metrics namespace {ns!r} is not a CloudWatch custom namespace (at most 255 letters, digits and "
                "'.-_/#: ', not starting with 'AWS/'); 'off' publishes no metrics"
            )
        for name in ("retry_delay_s", "poke_interval_s", "wait_timeout_s"):
            if getattr(self.airflow, name) < 0:
                raise ConfigError(f"airflow {name} must be 0 or more (got {getattr(self.airflow, name)})")
        for name in ("infer_images_per_task", "infer_max_shards", "infer_threads_per_task"):
            if getattr(self.airflow, name) < 1:
                raise ConfigError(f"airflow {name} must be at least 1 (got {getattr(self.airflow, name)})")
        if self.spark.shuffle_partitions < 1 or self.spark.delta_snapshot_partitions < 1:
            raise ConfigError("Spark shuffle and Delta snapshot partitions must be at least 1")
        return self


# --- the variables ------------------------------------------------------------------------------------
def _int(name: str, raw: str) -> int:
    try:
        return int(raw.replace("_", ""))
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not an integer") from exc


def _float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: expected true/false (or 1/0)")


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw not in allowed:
            raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(repr(a) for a in allowed)}")
        return raw

    return parse


def _text(name: str, raw: str) -> str:
    return raw


def _namespace(name: str, raw: str) -> str:
    return "" if raw.strip().lower() in _METRICS_OFF else raw.strip()


def _upper_list(name: str, raw: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(p.strip().upper() for p in raw.split(",") if p.strip()))
    if not items:
        raise ConfigError(f"{name}={raw!r}: expected a comma-separated list (e.g. CR,DX,RG)")
    return items


@dataclass(frozen=True)
class Variable:
    """One environment variable: the setting it fills (dotted for sub-settings) and how it is parsed."""

    env: str
    setting: str
    parse: Callable[[str, str], Any] = _text
    #: other variables read when ``env`` is absent (e.g. AWS's own names), in order.
    fallbacks: tuple[str, ...] = ()
    secret: bool = False


VARIABLES: tuple[Variable, ...] = (
    Variable("CXR_INPUT_URI", "input_uri"),
    Variable("CXR_LAKEHOUSE_URI", "lakehouse_uri"),
    Variable("CXR_SPARK_MASTER", "spark_master"),
    Variable("CXR_S3_ENDPOINT_URL", "s3_endpoint_url", fallbacks=("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
    Variable("AWS_REGION", "s3_region", fallbacks=("AWS_DEFAULT_REGION",)),
    Variable("CXR_S3_MAX_ATTEMPTS", "s3_max_attempts", _int),
    Variable("CXR_PSEUDONYM_KEY", "pseudonym_key", secret=True),
    Variable("CXR_RESIZE_SIZE", "resize_size", _int),
    Variable("CXR_RESIZE_ENGINE", "resize_engine", _choice(*RESIZE_ENGINES)),
    Variable("CXR_TENSOR_DTYPE", "tensor_dtype", _choice(*TENSOR_DTYPES)),
    Variable("CXR_MAX_PIXELS", "max_pixels", _int),
    Variable("CXR_MAX_FILE_BYTES", "max_file_bytes", _int),
    Variable("CXR_FILES_PER_TASK", "files_per_task", _int),
    Variable("CXR_MAX_QUARANTINE_SHARE", "max_quarantine_share", _float),
    Variable("CXR_MODALITIES", "modalities", _upper_list),
    Variable("CXR_COMMIT_EVERY_IMAGES", "commit_every_images", _int),
    Variable("CXR_COMMIT_EVERY_S", "commit_every_s", _float),
    Variable("CXR_DECODE_TIMEOUT_S", "decode_timeout_s", _float),
    Variable("CXR_DRIFT_MAX_PSI", "drift_max_psi", _float),
    Variable("CXR_DRIFT_MIN_IMAGES", "drift_min_images", _int),
    Variable("CXR_DRIFT_REFERENCE_RUN", "drift_reference_run"),
    Variable("CXR_METRICS_NAMESPACE", "metrics_namespace", _namespace),
    Variable("CXR_SPARK_DRIVER_MEMORY", "spark.driver_memory"),
    Variable("CXR_SPARK_UI", "spark.ui", _bool),
    Variable("CXR_SHUFFLE_PARTITIONS", "spark.shuffle_partitions", _int),
    Variable("CXR_DELTA_SNAPSHOT_PARTITIONS", "spark.delta_snapshot_partitions", _int),
    Variable("CXR_SPARK_LOG_LEVEL", "spark.log_level", _choice(*get_args(SparkLogLevel))),
    Variable("CXR_SPARK_JAVA_OPTS", "spark.java_opts"),
    Variable("CXR_SPARK_CLASSPATH_FILE", "spark.classpath_file"),
    Variable("CXR_RETRY_DELAY_S", "airflow.retry_delay_s", _int),
    Variable("CXR_POKE_INTERVAL_S", "airflow.poke_interval_s", _int),
    Variable("CXR_WAIT_TIMEOUT_S", "airflow.wait_timeout_s", _int),
    Variable("CXR_INFER_RUNNER", "airflow.infer_runner", _choice(*get_args(InferRunner))),
    Variable("CXR_INFER_IMAGE", "airflow.infer_image"),
    Variable("CXR_DOCKER_MOUNT", "airflow.docker_mount"),
    Variable("CXR_CLI", "airflow.cli"),
    Variable("CXR_INFER_IMAGES_PER_TASK", "airflow.infer_images_per_task", _int),
    Variable("CXR_INFER_MAX_SHARDS", "airflow.infer_max_shards", _int),
    Variable("CXR_INFER_THREADS_PER_TASK", "airflow.infer_threads_per_task", _int),
    Variable("CXR_EMR_MODE", "aws.emr_mode", _choice(*get_args(EmrMode))),
    Variable("CXR_ECS_LAUNCH_TYPE", "aws.ecs_launch_type", _choice(*get_args(EcsLaunchType))),
    Variable("CXR_INFER_BACKEND", "aws.infer_backend", _choice(*get_args(InferBackend))),
    Variable("CXR_MALLOC_TUNING", "inference.malloc_tuning", _bool),
    Variable("CXR_INFER_AMP", "inference.amp", _bool),
    Variable("CXR_ONNX_CACHE", "inference.onnx_cache"),
    Variable("CXR_WEIGHTS_BASE_URL", "inference.weights_base_url"),
)
#: ``CXR_WEIGHTS_SHA256_<MODEL>`` (model id upper-cased, non-alphanumerics as ``_``) pins a weights hash.
WEIGHTS_SHA_PREFIX = "CXR_WEIGHTS_SHA256_"
_SUB = {"spark": SparkSettings, "airflow": AirflowSettings, "aws": AwsSettings, "inference": InferenceSettings}


def _pin_key(model_id: str) -> str:
    """A model id as its weights pin is keyed: non-alphanumerics as ``_``, lower case."""
    return "".join(ch if ch.isalnum() else "_" for ch in model_id).lower()


def weights_sha_variable(model_id: str) -> str:
    """The environment variable that pins ``model_id``'s weights sha256."""
    return WEIGHTS_SHA_PREFIX + _pin_key(model_id).upper()


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment.

    Args:
        env: the environment to read; ``os.environ`` when None.

    Returns:
        The resolved settings, each value's source in ``Settings.sources``.

    Raises:
        ConfigError: on an unknown profile or a malformed value.
    """
    e = dict(os.environ if env is None else env)
    profile = e.get("CXR_PROFILE") or "local"
    if profile not in _PROFILE_DEFAULTS:
        raise ConfigError(f"CXR_PROFILE={profile!r}: expected one of {sorted(_PROFILE_DEFAULTS)}")
    top: dict[str, Any] = dict(_PROFILE_DEFAULTS[profile])
    sources: dict[str, Source] = {"profile": "env" if e.get("CXR_PROFILE") else "default"}
    sources.update(dict.fromkeys(top, "profile"))
    sub: dict[str, dict[str, Any]] = {name: {} for name in _SUB}
    for var in VARIABLES:
        name, raw = next(((n, e[n]) for n in (var.env, *var.fallbacks) if e.get(n)), (var.env, None))
        if raw is None:
            continue
        group, _, attr = var.setting.rpartition(".")
        (sub[group] if group else top)[attr] = var.parse(name, raw)
        sources[var.setting] = "env"
    pins = tuple(
        sorted(
            (k[len(WEIGHTS_SHA_PREFIX) :].lower(), v.strip().lower())
            for k, v in e.items()
            if k.startswith(WEIGHTS_SHA_PREFIX) and v.strip()
        )
    )
    if pins:
        sub["inference"]["weights_sha256"] = pins
        sources["inference.weights_sha256"] = "env"
    parts = {name: cls(**sub[name]) for name, cls in _SUB.items()}
    return Settings(profile=profile, **top, **parts, sources=sources).validate()  # type: ignore[arg-type]


@dataclass(frozen=True)
class SettingRow:
    """One line of ``cxr config``."""

    name: str
    value: str
    source: Source
    env: str


def describe(settings: Settings) -> list[SettingRow]:
    """Every setting with its effective value (secrets masked), its source and its variable.

    Args:
        settings: resolved settings (``load_settings()``, with any flags applied).

    Returns:
        One row per setting, top-level first, then the Spark, Airflow, AWS and inference groups.
    """
    by_setting = {v.setting: v for v in VARIABLES}
    rows = [SettingRow("profile", settings.profile, settings.source("profile"), "CXR_PROFILE")]

    def add(prefix: str, obj: object) -> None:
        for f in fields(obj):  # type: ignore[arg-type]
            if f.name in ("profile", "sources") or f.name in _SUB and not prefix:
                continue
            dotted = f"{prefix}{f.name}"
            var = by_setting.get(dotted)
            value = getattr(obj, f.name)
            if dotted == "pseudonym_key" and settings.uses_dev_key:
                shown = "(built-in development key: NOT secret)"
            elif var is not None and var.secret:
                shown = "****** (set)" if value else "(empty)"
            elif dotted == "modalities":
                shown = ",".join(value)
            elif dotted == "inference.weights_sha256":
                shown = ", ".join(f"{m}={h[:12]}…" for m, h in value) or "(none)"
            else:
                shown = str(value) if value != "" else "(empty)"
            env = var.env if var else (f"{WEIGHTS_SHA_PREFIX}<MODEL>" if dotted == "inference.weights_sha256" else "")
            rows.append(SettingRow(dotted, shown, settings.source(dotted), env))

    add("", settings)
    for group in _SUB:
        add(f"{group}.", getattr(settings, group))
    return rows


#: variables handed on to the inference container (S3 endpoint and region, weights mirror and pins, AWS)
_CONTAINER_PREFIXES = ("CXR_S3_", "CXR_WEIGHTS_", "AWS_")


def container_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables the inference container needs from this environment: the S3 endpoint, the weights
    mirror and pins, and AWS's own (region, credentials; without them the host's instance role applies).

    Args:
        env: the environment to read; ``os.environ`` when None.
    """
    e = os.environ if env is None else env
    return {k: v for k, v in e.items() if k.startswith(_CONTAINER_PREFIXES)}


#: the message whose HMAC under the pseudonym key is the key's fingerprint (a new version: a new message)
_FINGERPRINT_MESSAGE = b"cxr-pseudonym-key-fingerprint-v1"


def key_fingerprint(key: str) -> str:
    """A short fingerprint of a pseudonym key: the first 16 hex digits of HMAC-SHA256(key, a fixed message).

    It tells two keys apart (a lakehouse records the fingerprint of the key its pseudonyms were made with)
    and, being a keyed hash, tells no more about the key than the pseudonyms themselves do. The built-in
    development key has one too.

    Args:
        key: the pseudonym key (``Settings.pseudonym_key``).

    Returns:
        16 lower-case hex digits.
    """
    import hashlib
    import hmac

    return hmac.new(key.encode("utf-8"), _FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()[:16]


def require_production_key(settings: Settings) -> None:
    """Refuse the built-in development pseudonym key in the aws profile.

    Raises:
        ConfigError: when ``CXR_PROFILE=aws`` and ``CXR_PSEUDONYM_KEY`` is unset (or is the built-in key).
    """
    if settings.profile == "aws" and settings.uses_dev_key:
        raise ConfigError(
            "the aws profile refuses the built-in development pseudonym key (anyone with this source code can "
            "reverse its pseudonyms): set CXR_PSEUDONYM_KEY to a secret (e.g. from AWS Secrets Manager)"
        )


def warn_if_dev_key(settings: Settings) -> None:
    """Log a loud warning when pseudonyms are made with the built-in development key; in the aws profile,
    refuse it (:func:`require_production_key`).

    Raises:
        ConfigError: the built-in key in the aws profile.
    """
    require_production_key(settings)
    if settings.uses_dev_key:
        log.warning(
            "!!! CXR_PSEUDONYM_KEY is not set: patient pseudonyms use the built-in DEVELOPMENT key and "
            "can be reversed by anyone with this source code. Set CXR_PSEUDONYM_KEY to a secret "
            "(e.g. from AWS Secrets Manager) before ingesting real patient data. !!!"
        )
