"""``cxr run``: the whole DAG once on a local Airflow (``dag.test()``, SQLite in ``.airflow/``).

The terminal gets one line per task as it starts and ends (state, seconds, the stage's own counts) and
the caller prints a summary; everything else goes to log files under the Airflow home's ``logs/``:

- ``logs/cxr_run/<UTC time>.log``: Airflow's own output outside the tasks (DagBag, database, the loop);
- ``logs/dag_id=<dag>/run_id=<run>/task_id=<task>/attempt=<n>.log``: one file per task attempt (Airflow's
  default layout), holding the task's log and what its child processes print (spark-submit and Spark's
  JVM at WARN, ``cxr infer``).

The split happens at the file-descriptor level: while the DAG runs, this process's stdout and stderr
(which every child process inherits) point at the current log file, so nothing reaches the terminal
except the lines written here.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cxr.operators import REPO_ROOT
from cxr.tasks import DAG_ID, DEFAULT_MODELS, INFER_RUN_PREFIX, PREPROCESS_RUN_PREFIX, stage_run_id
from lakehouse.config import load_settings
from lakehouse.errors import CxrError
from lakehouse.storage import is_s3
from lakehouse.tables import TABLE_NAMES

if TYPE_CHECKING:
    from lakehouse.runs import InferRun

#: log lines of a failed task shown on the terminal
TAIL_LINES = 20
#: lines of a task log left out of those shown: Airflow's bookkeeping (state updates, log groups) and a
#: traceback's ^^^ markers
_BOOKKEEPING = re.compile(r"::(end)?group::|\[DAG TEST\]|\[airflow\.api_fastapi\.|^\s*[\^~]+\s*$")


def airflow_env(home: Path | None = None) -> dict[str, str]:
    """Environment for a self-contained local Airflow: home inside the repo, SQLite, our dags folder,
    task logs under ``<home>/logs`` (uncoloured: they are files)."""
    home = (home or Path(os.environ.get("AIRFLOW_HOME", REPO_ROOT / ".airflow"))).resolve()
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": os.environ.get("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(home / "logs")),
        "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@dataclass
class TaskOutcome:
    """One task of the run: its last state, seconds from its first start to its last end, what it did."""

    task_id: str
    state: str = "none"
    seconds: float | None = None
    detail: str = ""
    #: the log file of its last attempt (None: it never ran); of a mapped task, its last failed instance's
    #: when one failed
    log: Path | None = None
    tries: int = 0
    #: a mapped task's instances (inference: one per shard); 0 for a task that is not mapped
    mapped: int = 0


@dataclass
class RunResult:
    """What ``cxr run`` did: the Airflow run id and state, every task in DAG order, where the logs are."""

    run_id: str
    state: str
    seconds: float
    tasks: list[TaskOutcome]
    #: Airflow's output outside the tasks
    log: Path
    #: the folder of this run's task logs
    task_logs: Path

    @property
    def succeeded(self) -> bool:
        """True when the DAG run ended ``success`` (a run skipped for want of new images included)."""
        return self.state == "success"

    @property
    def failed(self) -> list[TaskOutcome]:
        """The tasks that failed themselves (not those skipped because an upstream task failed)."""
        return [t for t in self.tasks if t.state == "failed"]


def run_local(
    *,
    input_uri: str,
    lakehouse_uri: str,
    models: Sequence[str] = DEFAULT_MODELS,
    allow_untrained: bool = False,
    weights_dir: str | None = None,
    labels_uri: str | None = None,
    labels_key: str = "file_name",
    thresholds: str | None = None,
    infer_shards: int = 1,
    airflow_home: Path | None = None,
    terminal: TextIO | None = None,
    capture: bool = True,
) -> RunResult:
    """Run the DAG once with ``dag.test()`` (no scheduler), migrating the SQLite database first.

    Args:
        input_uri: images, a folder or s3://.
        lakehouse_uri: the Delta tables, a folder or s3://.
        models: xrv weights names.
        allow_untrained: a random-init stand-in when no weights are found.
        weights_dir: a folder in xrv's cache layout.
        labels_uri: a labels file: the run is evaluated against it before it is published.
        labels_key: what the labels' key holds (``file_name``, ``image_id``, ``sop_instance_uid``).
        thresholds: ``latest`` or a thresholds version: inference adds the decision columns.
        infer_shards: inference tasks (shards), one mapped task instance each; 0 = auto (one per
            ``CXR_INFER_IMAGES_PER_TASK`` predictions to write, capped by the cores). Default 1:
            ``dag.test()`` runs one task at a time, so shards would run one after another, each on its
            share of the cores (the fan-out pays off under a scheduler with a parallel executor).
        airflow_home: the Airflow home (default ``AIRFLOW_HOME`` or ``.airflow/`` in the repository).
        terminal: where the per-task lines go (default: this process's stdout as it was on entry).
        capture: False leaves Airflow's and the tasks' output on stdout/stderr (``cxr -v run``).

    Returns:
        The run, failed or not: the caller decides what a failed run means for its exit status.

    Raises:
        CxrError: when the DAG could not be run at all (database, DAG import).
    """
    env = airflow_env(airflow_home)
    # one interactive run: with nothing new under the input, give up waiting after a minute (the run is
    # then skipped), not after the scheduled DAG's hours
    settings = load_settings()
    if settings.source("airflow.wait_timeout_s") != "env":
        env["CXR_WAIT_TIMEOUT_S"] = "60"
    if settings.source("airflow.poke_interval_s") != "env":
        env["CXR_POKE_INTERVAL_S"] = "5"
    log_folder = Path(env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"])
    run_log = log_folder / "cxr_run" / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.log"
    run_log.parent.mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    # tasks run in other working directories (Bash, spark-submit): folders travel as absolute paths
    input_uri, lakehouse_uri = (u if is_s3(u) else str(Path(u).resolve()) for u in (input_uri, lakehouse_uri))
    conf = {
        "input_uri": input_uri,
        "lakehouse_uri": lakehouse_uri,
        "models": list(models),
        "allow_untrained": allow_untrained,
        "weights_dir": weights_dir or "",
        "labels_uri": "" if not labels_uri else labels_uri if is_s3(labels_uri) else str(Path(labels_uri).resolve()),
        "labels_key": labels_key,
        "thresholds": thresholds or "",
        "infer_shards": int(infer_shards),
    }
    started = time.monotonic()
    with _output_to(run_log if capture else None, terminal) as (term, switch):
        term.write(f"cxr run: {DAG_ID}, {_shown(input_uri)} -> {_shown(lakehouse_uri)}\n")
        term.write(f"logs: {_shown(log_folder)} (this run outside its tasks: {_shown(run_log)})\n")
        _migrate_db(env)
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
        if bag.import_errors:
            raise CxrError(f"the DAG does not import: {bag.import_errors} (see {_shown(run_log)})")
        dag = bag.get_dag(DAG_ID)
        reporter = _TaskReporter(term, switch, run_log, log_folder, conf)
        with reporter.watching():
            dr = dag.test(run_conf=conf)
    states: dict[str, list[str]] = {}
    for ti in dr.get_task_instances():  # a mapped task has one per map index
        states.setdefault(ti.task_id, []).append(_state(ti.state))
    tasks = []
    for task_id in _dag_order(dag):
        outcome = reporter.outcomes.get(task_id) or TaskOutcome(task_id)
        if task_id in states:
            outcome.state = _combined_state(states[task_id])
        tasks.append(outcome)
    return RunResult(
        run_id=str(dr.run_id),
        state=_state(dr.state),
        seconds=time.monotonic() - started,
        tasks=tasks,
        log=run_log,
        task_logs=_task_log_folder(log_folder, str(dr.dag_id), str(dr.run_id)),
    )


def summary_lines(result: RunResult, *, lakehouse_uri: str) -> list[str]:
    """The run's summary for the terminal: one line per task in DAG order, then where things are.

    Args:
        result: what :func:`run_local` returned.
        lakehouse_uri: the lakehouse as the user gave it.

    Returns:
        Lines without newlines; on failure they end with each failed task's last log lines.
    """
    from lakehouse import storage

    lines = [f"pipeline run {result.run_id}: {result.state} ({result.seconds:.0f}s)"]
    lines += [_task_line(t) for t in result.tasks]
    from lakehouse.publish import current_versions

    present = current_versions(lakehouse_uri, load_settings(), TABLE_NAMES)  # the tables this lakehouse has
    tables = ", ".join(storage.table_uri(lakehouse_uri, t) for t in TABLE_NAMES if t in present) or "none yet"
    lines += [
        f"tables:    {tables}",
        f"data docs: {storage.data_docs_index_uri(lakehouse_uri)}",
        f"report:    {storage.report_uri(lakehouse_uri)}",
        f"task logs: {_shown(result.task_logs)}",
    ]
    for task in result.failed:
        lines.append(f"{task.task_id} failed; the last lines of {_shown(task.log) if task.log else 'its log'}:")
        lines += [f"  | {line}" for line in _tail(task.log, TAIL_LINES)] if task.log else []
    if not result.succeeded and not result.failed:
        lines.append(f"the run ended {result.state}; see {_shown(result.log)}")
    return lines


# --- the terminal and the log files --------------------------------------------------------------------


@contextmanager
def _output_to(path: Path | None, terminal: TextIO | None) -> Iterator[tuple[TextIO, Callable[[Path], None]]]:
    """Point fds 1 and 2 at ``path`` (appending) for the duration; yield a stream to the original stdout
    and a function that re-points them at another file. ``path`` None: nothing is redirected."""
    if path is None:
        yield terminal or sys.stdout, lambda _path: None
        return
    _flush()
    saved = os.dup(1), os.dup(2)
    term = terminal or open(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115

    def switch(target: Path) -> None:
        _flush()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)

    try:
        switch(path)
        yield term, switch
    finally:
        _flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        if term is not terminal:
            term.close()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # closed or gone: nothing buffered to keep
            stream.flush()


class _TaskReporter:
    """Around each task attempt ``dag.test()`` makes: the log file switched to the attempt's, a line on
    the terminal when a task starts (its first attempt) and when an attempt ends."""

    def __init__(
        self, term: TextIO, switch: Callable[[Path], None], run_log: Path, log_folder: Path, conf: Mapping[str, Any]
    ) -> None:
        self.term, self.switch, self.run_log, self.log_folder, self.conf = term, switch, run_log, log_folder, conf
        #: by task id (a mapped task's instances together)
        self.outcomes: dict[str, TaskOutcome] = {}
        # by label: the task id, or `task[i]` for map index i
        self._first_start: dict[str, float] = {}
        self._tries: dict[str, int] = {}
        self._waiting: set[str] = set()  # tasks whose first reschedule was shown (a sensor pokes again)
        #: a mapped task's instances' last states, by map index
        self._instances: dict[str, dict[int, str]] = {}

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Wrap ``dag.test()``'s one-attempt function (``_run_task`` of the Task SDK's DAG module, the
        only seam between its loop and a task attempt) while the run lasts; without that seam (another
        Airflow version) the run goes on with no per-task lines and the summary still comes."""
        from airflow.sdk.definitions import dag as dag_module

        original = getattr(dag_module, "_run_task", None)
        if original is None:
            self.term.write("(no per-task lines with this Airflow version: the summary follows the run)\n")
            yield
            return

        def run_task(*, ti: Any, task: Any, **kwargs: Any) -> Any:
            return self._attempt(original, ti=ti, task=task, **kwargs)

        dag_module._run_task = run_task  # type: ignore[attr-defined]
        try:
            yield
        finally:
            dag_module._run_task = original  # type: ignore[attr-defined]

    def _attempt(self, original: Callable[..., Any], *, ti: Any, task: Any, **kwargs: Any) -> Any:
        task_id, tries = str(ti.task_id), int(ti.max_tries) + 1
        index = -1 if ti.map_index is None else int(ti.map_index)
        # a mapped task's instances are told apart (`infer[1]`) when there are several
        label = f"{task_id}[{index}]" if index >= 0 and _mapped_instances(ti) > 1 else task_id
        log = _task_log_folder(self.log_folder, str(ti.dag_id), str(ti.run_id)) / f"task_id={task_id}"
        log = log / (f"map_index={index}/" if index >= 0 else "") / f"attempt={ti.try_number}.log"
        outcome = self.outcomes.setdefault(task_id, TaskOutcome(task_id))
        now = time.monotonic()
        if self._tries.get(label) != ti.try_number:
            self._first_start.setdefault(label, now)
            self._first_start.setdefault(task_id, now)
            retry = f" (try {ti.try_number} of {tries})" if ti.try_number > 1 else ""
            self._line(label, f"started{retry}")
        self._tries[label] = int(ti.try_number)
        outcome.tries, outcome.state = max(outcome.tries, int(ti.try_number)), "running"
        self.switch(log)
        try:
            result = original(ti=ti, task=task, **kwargs)
        finally:
            self.switch(self.run_log)
        state = _state(ti.state)
        end = time.monotonic()
        error = getattr(result, "error", None)
        detail = self._detail(ti, task, state, error, map_index=index)
        outcome.seconds = end - self._first_start[task_id]
        if index < 0:
            outcome.state, outcome.detail, outcome.log = state, detail, log
        else:  # the task's line says what its instances did together; a failed one names itself
            instances = self._instances.setdefault(task_id, {})
            instances[index] = state
            outcome.mapped, outcome.state = len(instances), _combined_state(list(instances.values()))
            if state in ("failed", "up_for_retry") or outcome.log is None or outcome.state == "success":
                outcome.log = log
            if state in ("failed", "up_for_retry"):
                outcome.detail = f"{label}: {detail}"
            elif outcome.state not in ("failed", "up_for_retry"):
                outcome.detail = self._detail(ti, task, outcome.state, None, map_index=-1)
        if state != "up_for_reschedule":
            seconds = end - self._first_start[label]
            self._line(label, f"{state:<8} {seconds:6.1f}s  {detail}".rstrip())
        elif label not in self._waiting:  # a sensor pokes again and again: said once
            self._line(label, f"waiting {detail}")
            self._waiting.add(label)
        return result

    def _line(self, task_id: str, text: str) -> None:
        self.term.write(f"{datetime.now():%H:%M:%S} {task_id:<22} {text}\n")
        self.term.flush()

    def _detail(self, ti: Any, task: Any, state: str, error: BaseException | None, *, map_index: int = -1) -> str:
        """The stage's own counts (success) or the error's first line; '' when they cannot be read.
        ``map_index`` -1: a mapped task's instances together."""
        try:
            counts = _stage_detail(str(ti.task_id), state, ti, task, self.conf, map_index=map_index)
        except Exception as exc:  # the counts are a display nicety: never fail the run over them
            counts = f"(counts not readable: {type(exc).__name__})"
        if state not in ("failed", "up_for_retry"):
            return counts
        first = (str(error).strip().splitlines() or [""])[0][:200] if error else ""
        text = f"{type(error).__name__}: {first}" if error else "see its log"
        if state == "up_for_retry":
            text = f"try {ti.try_number} of {int(ti.max_tries) + 1}: {text}"
        return f"{counts}; {text}" if counts else text


def _stage_detail(task_id: str, state: str, ti: Any, task: Any, conf: Mapping[str, Any], *, map_index: int = -1) -> str:
    """What the stage did, from its run summary, validation results or return value (XCom); of a mapped
    task, what instance ``map_index`` did, or (-1) what its instances did together."""
    lake = str(conf["lakehouse_uri"])
    pre_id, inf_id = (stage_run_id(p, str(ti.run_id)) for p in (PREPROCESS_RUN_PREFIX, INFER_RUN_PREFIX))
    if task_id == "wait_for_images":
        return {
            "success": "new images found",
            "skipped": "nothing new under the input: the run is skipped",
            "up_for_reschedule": "for new images under the input",
        }.get(state, "")
    from lakehouse import storage
    from lakehouse.runs import InferRun, PreprocessRun, read_summaries

    settings = load_settings()
    if task_id.startswith("validate") and state in ("success", "failed", "up_for_retry"):
        import json

        parts = []
        for table in getattr(task, "op_kwargs", {}).get("tables", []):
            body = json.loads(storage.read_text(storage.validation_uri(lake, table), settings))
            if body.get("run_id") not in (pre_id, inf_id):
                continue  # an earlier run's result: this attempt wrote none
            parts.append(f"{table} {body['passed']}/{body['evaluated']}")
        return f"{', '.join(parts)} expectations passed" if parts else ""
    if state != "success":
        return ""
    if task_id == "preprocess":
        pre = read_summaries(lake, settings, kind=PreprocessRun, run_id=pre_id)
        if not pre:
            return ""
        r = pre[-1]
        text = f"{r.discovered} files: {r.new} new, {r.quarantined} quarantined"
        text += f", {r.skipped} skipped" if r.skipped else ""
        text += f", {r.duplicates} duplicates" if r.duplicates else ""
        text += f", {r.already_present} already present" if r.already_present else ""
        text += f", {r.retryable} retryable" if r.retryable else ""
        return text + ("; CXR_PSEUDONYM_KEY unset: development key" if r.dev_pseudonym_key else "")
    if task_id == "infer":
        return infer_detail(read_summaries(lake, settings, kind=InferRun, run_id=inf_id), map_index=map_index)
    if task_id == "plan_infer":
        plan = _return_value(ti, key="plan")
        if not isinstance(plan, dict):
            return ""
        asked = f", {plan['requested']} asked for" if plan.get("requested") else ""
        return f"{plan.get('to_score', 0)} predictions to write: {plan.get('shards', 1)} shard(s){asked}"
    value = _return_value(ti)
    if task_id == "publish" and isinstance(value, dict):
        return ", ".join(f"{t} v{v}" for t, v in sorted(value.get("versions", {}).items(), reverse=True))
    if task_id == "drift" and isinstance(value, dict):
        if value.get("failed"):
            return f"DRIFT: {', '.join(value['failed'][:3])}"
        if not value.get("reference_run_id"):
            return "no reference run yet (this run becomes it once published)"
        return "insufficient images: reported, not gated" if value.get("insufficient") else "within limits"
    if task_id == "evaluate" and isinstance(value, dict):
        if not value.get("evaluated"):
            return "no labels_uri: skipped"
        return f"{value.get('rows_written', 0)} rows, {value.get('matched_keys', 0)}/{value.get('label_keys', 0)} labels matched"
    if task_id == "report" and value:
        return str(value)
    if task_id == "maintain" and isinstance(value, dict):
        return f"{value.get('files_deleted', 0)} data files deleted ({value.get('bytes_freed', 0)} bytes freed)"
    return ""


def infer_detail(summaries: Sequence[InferRun], *, map_index: int = -1) -> str:
    """What an inference run did, per model, from its summaries: one per model and shard (a run of N
    shards writes ``<run_id>-shard-i-of-N-<model>.json``), added up over the shards.

    Args:
        summaries: the run's inference summaries (``read_summaries(..., kind=InferRun, run_id=...)``).
        map_index: only shard ``map_index`` (one mapped task instance); -1: every shard.

    Returns:
        ``"<predicted> predicted (<before> before), <model>, <device>[, N shards]"`` per model, joined
        by "; ".
    """
    from lakehouse.runs import newest_fanout, shard_of

    # a cleared and rerun run may have left an earlier fan-out's files: the newest N counts
    shards = [(r, *shard_of(r)) for r in newest_fanout(summaries)]
    shards = [s for s in shards if map_index < 0 or s[1] == map_index]
    by_model: dict[str, list[InferRun]] = {}
    for r, _, _ in shards:
        by_model.setdefault(r.model_id, []).append(r)
    parts = []
    for model, runs in by_model.items():
        predicted, before = sum(r.predicted for r in runs), sum(r.already_predicted for r in runs)
        devices = ", ".join(sorted({r.device for r in runs}))
        text = f"{predicted} predicted ({before} before), {model}, {devices}"
        parts.append(text + (f", {len(runs)} shards" if len(runs) > 1 else ""))
    return "; ".join(parts)


def _mapped_instances(ti: Any) -> int:
    """How many instances the mapped task of ``ti`` has in its run (0 when they cannot be counted)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    query = select(func.count()).where(
        TaskInstance.dag_id == ti.dag_id,
        TaskInstance.run_id == ti.run_id,
        TaskInstance.task_id == ti.task_id,
        TaskInstance.map_index >= 0,
    )
    try:
        with create_session(scoped=False) as session:  # not dag.test()'s own session
            return int(session.scalar(query) or 0)
    except Exception as exc:  # a display nicety: never fail the run over it
        log_line = f"mapped instances of {ti.task_id} not counted: {type(exc).__name__}"
        sys.stderr.write(log_line + "\n")
        return 0


def _combined_state(states: Sequence[str]) -> str:
    """The state of a task from its instances' (a mapped task has one per map index): the first of
    failed, upstream_failed, up_for_retry, ... that any instance is in; success when all succeeded."""
    order = ["failed", "upstream_failed", "up_for_retry", "running", "up_for_reschedule", "deferred", "queued"]
    order += ["scheduled", "restarting", "none", "removed", "success", "skipped"]
    unknown = [s for s in states if s not in order]
    if unknown:
        return unknown[0]
    return next((s for s in order if s in states), "none")


def _return_value(ti: Any, *, key: str = "return_value") -> Any:
    """The task's return value (its ``return_value`` XCom; another ``key`` when given), or None."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    query = XComModel.get_many(key=key, run_id=ti.run_id, dag_ids=ti.dag_id, task_ids=ti.task_id)
    with create_session(scoped=False) as session:  # not dag.test()'s own session
        row = session.execute(query.with_only_columns(XComModel.value).limit(1)).first()
        return XComModel.deserialize_value(row) if row is not None else None


def _state(state: Any) -> str:
    """A task instance's or run's state as its plain name (``success``, ``up_for_retry``, ``none``)."""
    return str(getattr(state, "value", state)).lower()


def _task_line(t: TaskOutcome) -> str:
    seconds = f"{t.seconds:6.1f}s" if t.seconds is not None else "      -"
    return f"  {t.task_id:<22} {t.state:<8} {seconds}  {t.detail}".rstrip()


def _task_log_folder(log_folder: Path, dag_id: str, run_id: str) -> Path:
    """Airflow's default task log layout: ``dag_id=<dag>/run_id=<run>/`` under the base log folder."""
    return log_folder / f"dag_id={dag_id}" / f"run_id={run_id}"


def _dag_order(dag: Any) -> list[str]:
    """Task ids upstream first (ties in the order the DAG file made them)."""
    order: list[str] = []
    remaining = list(dag.task_ids)
    while remaining:
        ready = [t for t in remaining if set(dag.get_task(t).upstream_task_ids) <= set(order)] or remaining[:1]
        order.append(ready[0])
        remaining.remove(ready[0])
    return order


def _tail(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a task log that say something about the task (Airflow's bookkeeping after
    the failure, such as state updates and log groups, left out)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            said = (line.rstrip("\n") for line in f if not _BOOKKEEPING.search(line))
            return [line[:240] for line in deque(said, maxlen=n)]
    except OSError:
        return []


def _shown(path: Path | str) -> str:
    """A folder relative to the working directory when it lies under it (shorter on the terminal);
    s3:// as it is."""
    if isinstance(path, str) and is_s3(path):
        return path
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _migrate_db(env: Mapping[str, str]) -> None:
    """``airflow db migrate`` in a child process (idempotent; creates the SQLite file on first use)."""
    import subprocess

    airflow_bin = Path(sys.executable).parent / "airflow"
    cmd = [str(airflow_bin) if airflow_bin.exists() else (shutil.which("airflow") or "airflow"), "db", "migrate"]
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise CxrError("airflow db migrate failed: " + " | ".join(tail))
