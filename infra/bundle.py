"""The deployable code bundle: what the deploy workflow uploads to the code bucket for MWAA and EMR.

``python -m infra.bundle --out DIR`` (default ``infra/build``) writes::

    DIR/dags/xray_inference_pipeline.py  the DAG                      -> s3://<code>/dags/ (MWAA's DAGs folder)
    DIR/dags/cxr-constraints.txt         the constraints of requirements.txt (MWAA: /usr/local/airflow/dags/)
    DIR/requirements.txt                 -> s3://<code>/requirements.txt (the environment's RequirementsS3Path)
    DIR/plugins.zip                      the wheel at its root -> s3://<code>/plugins.zip (PluginsS3Path)
    DIR/startup.sh                       infra/mwaa/startup.sh -> s3://<code>/startup.sh (StartupScriptS3Path)
    DIR/code/cli.py                      cxr/cli.py: the Spark job's entry point  -> s3://<code>/code/
    DIR/code/cxr.zip                     the packages (spark-submit --py-files)      (the Variable cxr_code_uri)
    DIR/code/cxr_lakehouse-<v>-py3-none-any.whl    the package wheel
    DIR/code/cxr-env.tar.gz              the packed venv: infra/mwaa/build_spark_env.sh (Docker, deploy only)

``make deploy`` (``python -m infra deploy``, ``upload_bundle``) uploads DIR/dags to s3://<code>/dags/, DIR/code
to s3://<code>/code/ and the three MWAA files to the bucket's root, skipping files whose bytes the bucket
already holds, then passes the three files' S3 object versions as the stack's context
(``requirements_version``, ``plugins_version``, ``startup_version``: MWAA re-installs when they change).
Nothing is deleted from the bucket.

How MWAA installs the package (``safe-pip-install -r requirements.txt`` on every Airflow container at start):

- The DAGs folder is synced to ``/usr/local/airflow/dags`` before the requirements are installed, and a
  constraints file there may be named by the requirements (MWAA user guide, "Apache Airflow provider packages
  installed on Amazon MWAA environments", Constraints file:
  ``--constraint "/usr/local/airflow/dags/constraints-3.11-updated.txt"``). A requirements file without a
  ``-c``/``--constraint`` line gets Airflow's own constraints forced on it (images/airflow/3.3.1/python/mwaa/
  utils/user_requirements.py in github.com/aws/amazon-mwaa-docker-images), which pin pandas 3: ours needs
  pandas<3, so the bundle brings its own: MWAA's essential constraints (which MWAA enforces regardless) and
  every other pin of the repo lock, so MWAA's workers run the versions the tests ran.
- ``plugins.zip`` is unpacked to ``/usr/local/airflow/plugins/``; a wheel in it is installed by naming that path
  in requirements.txt (AWS re:Post knowledge center "mwaa-install-custom-packages"; MWAA user guide,
  best-practices-dependencies, "Python wheels (.whl)"). The wheel is named by a PEP 508 direct reference
  (``cxr-lakehouse[quality] @ file:///usr/local/airflow/plugins/<wheel>``), so pip can never take a package of
  the same name from PyPI instead. The ``quality`` extra is what the workers run (Great Expectations, DuckDB,
  delta-rs): Spark runs on EMR, torch in the inference container.
- The other requirements come from PyPI: the environment needs egress (NAT) or, without it, a plugins.zip
  holding every wheel (``--no-index --find-links /usr/local/airflow/plugins``), which this bundle does not make.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.versions import AIRFLOW_VERSION

log = logging.getLogger("infra.bundle")

ROOT = Path(__file__).resolve().parents[1]
MWAA_DIR = Path(__file__).resolve().parent / "mwaa"
#: The packages of the wheel and of cxr.zip (pyproject.toml [tool.setuptools.packages.find]).
PACKAGES = ("cxr", "lakehouse", "transforms", "inference", "expectations")
DAG_FILE = "xray_inference_pipeline.py"
#: Where MWAA puts the DAGs folder and the unpacked plugins.zip on its containers.
MWAA_DAGS_DIR = "/usr/local/airflow/dags"
MWAA_PLUGINS_DIR = "/usr/local/airflow/plugins"
CONSTRAINTS_NAME = "cxr-constraints.txt"
#: The package extra MWAA's workers install.
WORKER_EXTRA = "quality"
#: A fixed timestamp for zip members: the same sources give the same zip (and the same S3 object content).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the oldest date a zip can hold
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)$")


def essential_constraints_file(airflow_version: str = AIRFLOW_VERSION) -> Path:
    """MWAA's essential constraints for ``airflow_version`` (infra/mwaa/essential-constraints-<v>.txt)."""
    return MWAA_DIR / f"essential-constraints-{airflow_version}.txt"


def providers_file(airflow_version: str = AIRFLOW_VERSION) -> Path:
    """The provider pins MWAA installs for ``airflow_version`` (infra/mwaa/providers-<v>.txt)."""
    return MWAA_DIR / f"providers-{airflow_version}.txt"


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` as ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """The ``name==version`` lines of a constraints file, in order.

    Args:
        text: the file's content; blank lines and ``#`` comments are skipped.

    Returns:
        Canonical name -> the pin line as written (``Flask==3.1.3``).

    Raises:
        ValueError: a line that is not an exact pin (a range, a marker, an option), or a name pinned twice.
    """
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"line {number}: {raw!r} is not an exact pin (name==version)")
        key = canonical(match["name"])
        if key in pins:
            raise ValueError(f"line {number}: {match['name']} is pinned twice")
        pins[key] = line
    return pins


def merge_constraints(essential: str, lock: str, *, header: Iterable[str] = ()) -> str:
    """MWAA's constraints: the essential pins first, then every pin of the lock for another package.

    An essential package wins over the lock: MWAA refuses to change it, so a lock pin that differs is dropped
    (with a warning: the tests ran another version than MWAA will).

    Args:
        essential: MWAA's essential constraints file (text).
        lock: the repo lock (text).
        header: comment lines (without ``#``) put first.

    Returns:
        The constraints file's text.
    """
    ours = read_pins(essential)
    theirs = read_pins(lock)
    for key, line in theirs.items():
        if key in ours and line.split("==", 1)[1] != ours[key].split("==", 1)[1]:
            log.warning("the lock pins %s, MWAA's essential constraints %s: MWAA's wins", line, ours[key])
    rest = [line for key, line in theirs.items() if key not in ours]
    lines = [f"# {h}".rstrip() for h in header]
    lines += ["# MWAA's essential constraints (not overridable)", *ours.values()]
    lines += ["# the repo lock (constraints.txt), less the packages above", *rest]
    return "\n".join(lines) + "\n"


def requirements_text(wheel_name: str, *, extra: str = WORKER_EXTRA, constraints_sha256: str = "") -> str:
    """MWAA's requirements.txt: our constraints first, then the wheel shipped in plugins.zip with ``extra``;
    with ``constraints_sha256``, a last comment line naming the constraints' bytes, so that a change of the
    constraints alone changes requirements.txt too (and with it the object version MWAA installs from)."""
    text = f"-c {MWAA_DAGS_DIR}/{CONSTRAINTS_NAME}\ncxr-lakehouse[{extra}] @ file://{MWAA_PLUGINS_DIR}/{wheel_name}\n"
    return text + (f"# constraints sha256 {constraints_sha256}\n" if constraints_sha256 else "")


def build_wheel(out_dir: Path, *, root: Path = ROOT) -> Path:
    """Build the package wheel (``pip wheel --no-deps``) into ``out_dir``.

    The sources are copied to a temporary folder first, so the build writes no ``build/`` or ``*.egg-info``
    into the working tree. The build runs without isolation, with this interpreter's setuptools (the dev
    install has it): no index is needed.

    Args:
        out_dir: where the wheel goes (created).
        root: the repository root.

    Returns:
        The wheel's path.

    Raises:
        RuntimeError: pip failed, or did not leave exactly one cxr_lakehouse wheel.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    with tempfile.TemporaryDirectory(prefix="cxr-wheel-") as tmp:
        src, dist = Path(tmp, "src"), Path(tmp, "dist")
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        for package in PACKAGES:
            shutil.copytree(root / package, src / package, ignore=ignore)
        pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        cmd = [*pip, "-w", str(dist), str(src)]
        env = {**os.environ, "SOURCE_DATE_EPOCH": _SOURCE_DATE_EPOCH}  # the wheel's timestamps: reproducible
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"pip wheel failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        wheels = sorted(dist.glob("cxr_lakehouse-*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one cxr_lakehouse wheel, pip left {[w.name for w in wheels]}")
        target = out_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target


def _write_zip(target: Path, members: Iterable[tuple[Path, str]]) -> Path:
    """A deflated zip of (file, name in zip), sorted by name, with fixed timestamps."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, arcname in sorted(members, key=lambda m: m[1]):
            info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    return target


def zip_packages(target: Path, *, root: Path = ROOT) -> Path:
    """cxr.zip: every file of the packages (their data included), for ``spark-submit --py-files``."""
    members = [
        (path, path.relative_to(root).as_posix())
        for package in PACKAGES
        for path in (root / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    return _write_zip(target, members)


@dataclass(frozen=True)
class Bundle:
    """The files :func:`build_bundle` wrote."""

    root: Path
    wheel: Path
    requirements: Path
    constraints: Path
    plugins: Path
    startup: Path
    dag: Path
    cli: Path
    packages_zip: Path


def build_bundle(out: Path, *, root: Path = ROOT, airflow_version: str = AIRFLOW_VERSION) -> Bundle:
    """Write the bundle into ``out`` (the layout in the module docstring). Files of an earlier bundle that
    this one also writes are replaced; ``code/cxr-env.tar.gz`` (made by Docker) is left alone.

    Args:
        out: the bundle folder (created).
        root: the repository root.
        airflow_version: MWAA's Airflow version: picks infra/mwaa/essential-constraints-<v>.txt.

    Returns:
        The paths written.
    """
    dags, code = out / "dags", out / "code"
    dags.mkdir(parents=True, exist_ok=True)
    code.mkdir(parents=True, exist_ok=True)
    for stale in code.glob("cxr_lakehouse-*.whl"):
        stale.unlink()
    wheel = build_wheel(code, root=root)

    essential_file = essential_constraints_file(airflow_version)
    constraints = dags / CONSTRAINTS_NAME
    constraints.write_text(
        merge_constraints(
            essential_file.read_text(),
            (root / "constraints.txt").read_text(),
            header=[
                f"Constraints of MWAA's requirements.txt (Airflow {airflow_version}), written by `python -m infra.bundle`:",
                f"infra/mwaa/{essential_file.name} + the repo lock. MWAA reads it at {MWAA_DAGS_DIR}/{CONSTRAINTS_NAME}.",
            ],
        )
    )
    requirements = out / "requirements.txt"
    digest = hashlib.sha256(constraints.read_bytes()).hexdigest()
    requirements.write_text(requirements_text(wheel.name, constraints_sha256=digest))
    plugins = _write_zip(out / "plugins.zip", [(wheel, wheel.name)])
    startup = out / "startup.sh"
    shutil.copyfile(MWAA_DIR / "startup.sh", startup)
    startup.chmod(0o755)
    dag = dags / DAG_FILE
    shutil.copyfile(root / "dags" / DAG_FILE, dag)
    cli = code / "cli.py"
    shutil.copyfile(root / "cxr" / "cli.py", cli)
    packages_zip = zip_packages(code / "cxr.zip", root=root)
    return Bundle(out, wheel, requirements, constraints, plugins, startup, dag, cli, packages_zip)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m infra.bundle [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m infra.bundle", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "infra" / "build", help="bundle folder (default infra/build)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bundle = build_bundle(args.out)
    for path in sorted(p for p in bundle.root.rglob("*") if p.is_file()):
        log.info("%10d  %s", path.stat().st_size, path.relative_to(bundle.root))
    log.info("code/cxr-env.tar.gz: infra/mwaa/build_spark_env.sh %s (Docker)", bundle.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
