"""jvm/setup_jvm.py: finding a Java runtime Spark 4 can use, and writing jvm/classpath.txt from Ivy's jars.

The Java checks run on fake Java homes made here: a ``bin/java`` shell script that answers
``--list-modules`` the way a real runtime does.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("setup_jvm", ROOT / "jvm" / "setup_jvm.py")
assert _spec and _spec.loader
setup_jvm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_jvm)

VECTOR = "jdk.incubator.vector"


def fake_java_home(home: Path, major: int | None, *, vector: bool = True) -> Path:
    """A Java home whose bin/java lists java.base@<major> (and the vector module); None: Java 8's answer."""
    (home / "bin").mkdir(parents=True)
    if major is None:
        body = 'echo "Unrecognized option: $1" >&2\nexit 1\n'
    else:
        modules = [f"java.base@{major}.0.9", f"java.logging@{major}.0.9"] + (
            [f"{VECTOR}@{major}.0.9"] if vector else []
        )
        body = f'[ "$1" = --list-modules ] || exit 2\nprintf "%s\\n" {" ".join(modules)}\n'
    java = home / "bin" / "java"
    java.write_text("#!/bin/sh\n" + body)
    java.chmod(0o755)
    return home


@pytest.mark.parametrize(
    ("major", "vector", "expected"),
    [
        (17, True, None),
        (21, True, None),
        (11, True, "Java 11"),
        (25, True, "Java 25"),
        (17, False, f"Java 17 without the module {VECTOR} (a jlink-trimmed runtime)"),
        (21, False, f"Java 21 without the module {VECTOR} (a jlink-trimmed runtime)"),
        (None, True, "`java --list-modules` failed (Java 8 or older?)"),
    ],
)
def test_refusal(tmp_path: Path, major: int | None, vector: bool, expected: str | None) -> None:
    assert setup_jvm.refusal(fake_java_home(tmp_path / "jdk", major, vector=vector)) == expected


def test_refusal_without_bin_java(tmp_path: Path) -> None:
    assert setup_jvm.refusal(tmp_path) == "no bin/java"


def test_find_java_home_takes_the_first_usable_and_says_why_the_others_were_refused(tmp_path: Path) -> None:
    old = fake_java_home(tmp_path / "java-11", 11)
    jvms = tmp_path / "jvm"
    fake_java_home(jvms / "a-jdk-17-trimmed", 17, vector=False)
    fake_java_home(jvms / "b-jdk-21", 21)
    fake_java_home(jvms / "c-jdk-17", 17)
    environ = {"JAVA_HOME": str(old), "PATH": str(tmp_path / "empty"), "JVM_SEARCH_DIRS": f"{jvms}/*"}

    home, refused = setup_jvm.find_java_home(environ)

    assert home == jvms / "b-jdk-21"
    assert refused == [
        f"{old}: Java 11",
        f"{jvms / 'a-jdk-17-trimmed'}: Java 17 without the module {VECTOR} (a jlink-trimmed runtime)",
    ]


def test_java_on_path_is_followed_to_its_home(tmp_path: Path) -> None:
    jdk = fake_java_home(tmp_path / "lib" / "jvm" / "jdk-17", 17)
    usr_bin = tmp_path / "usr-bin"
    usr_bin.mkdir()
    (usr_bin / "java").symlink_to(jdk / "bin" / "java")  # as /usr/bin/java -> /etc/alternatives -> the JDK
    environ = {"PATH": str(usr_bin), "JVM_SEARCH_DIRS": f"{jdk}{os.pathsep}{tmp_path}/lib/jvm/*"}

    assert setup_jvm.candidates(environ) == [jdk.resolve()]  # found twice, tried once
    assert setup_jvm.find_java_home(environ) == (jdk.resolve(), [])


def test_no_java_anywhere_prints_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_java_home(tmp_path / "jvm" / "jdk-25", 25)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("JVM_SEARCH_DIRS", f"{tmp_path}/jvm/*")
    out = tmp_path / "java.mk"

    assert setup_jvm.main(["java", "--no-install", "--out", str(out)]) == 1

    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"need a Java 17-21 runtime for Spark (with the module {VECTOR}): ")
    assert err.endswith(f"then run `make setup` again (refused: {tmp_path}/jvm/jdk-25: Java 25)\n")
    assert not out.exists()


def test_found_java_is_written_for_make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jdk = fake_java_home(tmp_path / "jvm" / "jdk-21", 21)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no java on PATH, whatever the machine has
    monkeypatch.setenv("JVM_SEARCH_DIRS", str(jdk))
    out = tmp_path / "java.mk"

    assert setup_jvm.main(["java", "--no-install", "--out", str(out)]) == 0

    assert out.read_text().splitlines()[1:] == [f"export JAVA_HOME := {jdk}", "export PATH := $(JAVA_HOME)/bin:$(PATH)"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_exports_the_java_mk(tmp_path: Path) -> None:
    """What the Makefile includes: every command then has JAVA_HOME and that JDK's java first on PATH."""
    jdk = fake_java_home(tmp_path / "my jdk$1", 17)  # a space and a dollar survive make's quoting
    setup_jvm.write_java_mk(jdk, tmp_path / "java.mk")
    (tmp_path / "Makefile").write_text('include java.mk\nshow:\n\t@echo "$$JAVA_HOME" && command -v java\n')

    shown = subprocess.run(["make", "-s", "-C", str(tmp_path), "show"], capture_output=True, text=True, check=True)

    assert shown.stdout.splitlines() == [str(jdk), str(jdk / "bin" / "java")]


def test_write_classpath_from_ivy_jars(tmp_path: Path) -> None:
    cache = tmp_path / "ivy"
    jars = [cache / "io.delta" / "delta-spark_2.13" / "jars" / "delta-spark_2.13-4.0.0.jar"]
    jars.append(cache / "org.apache.hadoop" / "hadoop-aws" / "jars" / "hadoop-aws-3.4.1.jar")
    for jar in jars:
        jar.parent.mkdir(parents=True)
        jar.write_bytes(b"PK")
    pom = cache / "io.delta" / "delta-spark_2.13" / "poms" / "delta-spark_2.13-4.0.0.pom"
    out = tmp_path / "classpath.txt"

    assert setup_jvm.write_classpath([*jars, pom], out) == jars  # only jars are kept
    assert out.read_text() == f"{jars[0]}{os.pathsep}{jars[1]}\n"


def test_write_classpath_refuses_a_missing_jar(tmp_path: Path) -> None:
    out = tmp_path / "classpath.txt"
    with pytest.raises(SystemExit, match="missing jars .*gone-1.0.jar"):
        setup_jvm.write_classpath([tmp_path / "gone-1.0.jar"], out)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("JAVA_HOME"), reason="needs Java (make setup)")
def test_ivy_resolves_the_pom_from_maven_central(tmp_path: Path) -> None:
    """The real thing: pyspark's Ivy reads jvm/pom.xml (cache jvm/ivy/, ~700 MB the first time)."""
    out = tmp_path / "classpath.txt"

    jars = setup_jvm.resolve_with_ivy(setup_jvm.POM, out)

    names = {j.name for j in jars}
    assert {
        "delta-spark_2.13-4.0.0.jar",
        "delta-storage-4.0.0.jar",
        "hadoop-aws-3.4.1.jar",
        "bundle-2.29.52.jar",
    } <= names
    assert out.read_text().strip().split(os.pathsep) == [str(j) for j in jars]
    assert all(j.is_file() for j in jars)


def test_script_runs_on_the_system_python(tmp_path: Path) -> None:
    """The java step runs before .venv exists: the script must not import anything outside the stdlib."""
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(ROOT / "jvm" / "setup_jvm.py"), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "{java,classpath}" in proc.stdout
