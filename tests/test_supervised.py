"""The supervised decoder: real native-style faults (abort, exit, hang) cost one file, never the caller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from lakehouse.errors import ConfigError, DecodeError, DecoderCrash, DecodeTimeout, InputError
from tests import faulty_decoder as faulty
from transforms.sample import VALID_KINDS, png_bytes, synthetic_cxr, to_uint
from transforms.supervised import DecoderStartError, SupervisedDecoder, shared_decoder
from transforms.tensor import PreprocessParams, preprocess_bytes

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-pseudonym-key"
PARAMS = PreprocessParams()
FAULTY = "tests.faulty_decoder:decode"
GOOD = png_bytes(to_uint(synthetic_cxr(300, 260, seed=3), 8))


def _direct(data: bytes, name: str = "good.png") -> dict[str, object]:
    return preprocess_bytes(data, name=name, params=PARAMS, pseudonym_key=KEY)


def _decode(decoder: SupervisedDecoder, data: bytes, name: str = "good.png") -> dict[str, object]:
    return decoder.decode(data, name=name, params=PARAMS, pseudonym_key=KEY)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count as running, but see :func:`_our_children`)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _our_children() -> set[int]:
    """Every descendant of this test process, zombies included."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _wait_gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


def test_results_equal_preprocess_bytes_exactly_for_every_sample_kind() -> None:
    files = [(f"{kind}{ext}", make(i)) for i, (kind, (ext, make)) in enumerate(VALID_KINDS.items())]
    with SupervisedDecoder(timeout_s=30) as decoder:
        for name, data in files:
            assert _decode(decoder, data, name) == _direct(data, name), name
        assert decoder.starts == 1  # one child for every file


def test_abort_is_a_decoder_crash_naming_the_signal_and_the_next_file_gets_a_fresh_child() -> None:
    with SupervisedDecoder(timeout_s=30, decoder=FAULTY) as decoder:
        assert _decode(decoder, GOOD) == _direct(GOOD)
        first = decoder.pid
        assert first is not None
        with pytest.raises(DecoderCrash) as caught:
            _decode(decoder, b"\x89PNG" + faulty.ABORT, "poisoned.png")
        assert str(caught.value) == (
            "the decoder process died with signal SIGABRT while decoding this file: it is quarantined and not "
            "retried automatically (requeue it with `cxr requeue --error-class DecoderCrash` after a decoder upgrade)"
        )
        assert decoder.pid is None
        assert first not in _our_children()  # reaped: no zombie
        assert _decode(decoder, GOOD) == _direct(GOOD)
        assert decoder.pid not in (None, first)
        assert decoder.starts == 2


def test_an_exit_without_a_signal_is_a_decoder_crash_with_its_status() -> None:
    with SupervisedDecoder(timeout_s=30, decoder=FAULTY) as decoder:
        with pytest.raises(DecoderCrash, match=r"^the decoder process exited with status 3 while decoding this file"):
            _decode(decoder, faulty.EXIT)
        assert _decode(decoder, GOOD) == _direct(GOOD)


def test_a_hang_is_a_decode_timeout_after_the_limit_and_the_next_file_decodes() -> None:
    with SupervisedDecoder(timeout_s=1, decoder=FAULTY) as decoder:
        assert _decode(decoder, GOOD) == _direct(GOOD)
        hung = decoder.pid
        assert hung is not None
        started = time.monotonic()
        with pytest.raises(DecodeTimeout) as caught:
            _decode(decoder, faulty.HANG, "stuck.dcm")
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 3.0
        assert str(caught.value).startswith(
            "decoding took longer than 1 s (CXR_DECODE_TIMEOUT_S) and the decoder process was killed: "
            "it is quarantined and not retried automatically (requeue it with `cxr requeue --error-class DecodeTimeout`"
        )
        assert hung not in _our_children()
        assert _decode(decoder, GOOD) == _direct(GOOD)
        assert decoder.pid not in (None, hung)


def test_a_timeout_kills_what_the_hung_decoder_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    with SupervisedDecoder(timeout_s=1, decoder=FAULTY) as decoder, pytest.raises(DecodeTimeout):
        _decode(decoder, faulty.HANG_WITH_CHILD + str(pid_file).encode())
    grandchild = int(pid_file.read_text())
    assert _wait_gone(grandchild), "the decoder's own child survived the timeout"


def test_input_errors_keep_their_class_and_message_and_the_child() -> None:
    with SupervisedDecoder(timeout_s=30, decoder=FAULTY) as decoder:
        assert _decode(decoder, GOOD) == _direct(GOOD)
        pid = decoder.pid
        with pytest.raises(DecodeError) as caught:
            _decode(decoder, faulty.BAD_INPUT)
        assert type(caught.value) is DecodeError
        assert str(caught.value) == faulty.BAD_INPUT_MESSAGE
        # a real decoder's InputError too (UnsupportedFormatError from sniffing)
        with pytest.raises(InputError) as real:
            _decode(decoder, b"not an image at all", "x.png")
        try:
            _direct(b"not an image at all", "x.png")
        except InputError as exc:
            assert (type(real.value), str(real.value)) == (type(exc), str(exc))
        assert decoder.pid == pid and decoder.starts == 1


def test_an_unexpected_exception_keeps_its_class_and_message_with_the_child_traceback() -> None:
    with SupervisedDecoder(timeout_s=30, decoder=FAULTY) as decoder:
        with pytest.raises(ValueError) as caught:
            _decode(decoder, faulty.UNEXPECTED)
        assert str(caught.value) == faulty.UNEXPECTED_MESSAGE
        notes = "\n".join(getattr(caught.value, "__notes__", []))
        assert "raised in the decoder process" in notes and "faulty_decoder.py" in notes
        assert _decode(decoder, GOOD) == _direct(GOOD)
        assert decoder.starts == 1


def test_output_of_the_decoder_on_stdout_does_not_corrupt_the_protocol() -> None:
    with SupervisedDecoder(timeout_s=30, decoder=FAULTY) as decoder:
        assert _decode(decoder, GOOD + faulty.NOISY) == _direct(GOOD)
        assert _decode(decoder, GOOD) == _direct(GOOD)
        assert decoder.starts == 1


def test_shared_decoder_is_one_per_process_and_settings() -> None:
    a = shared_decoder(30.0)
    assert shared_decoder(30) is a
    assert shared_decoder(31) is not a
    assert shared_decoder(30, decoder=FAULTY) is not a
    assert a.pid is None  # nothing started until a file comes


def test_a_child_killed_between_files_is_restarted_transparently() -> None:
    """Our choice: a child that died before it held the whole file is not the file's fault; it is resent."""
    with SupervisedDecoder(timeout_s=30) as decoder:
        assert _decode(decoder, GOOD) == _direct(GOOD)
        first = decoder.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # no wait: the next call races the kill
        assert _decode(decoder, GOOD) == _direct(GOOD)
        assert decoder.pid not in (None, first)
        assert first not in _our_children()
        assert decoder.starts == 2


def test_a_call_interrupted_mid_file_never_leaves_a_stale_answer_for_the_next_file() -> None:
    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with SupervisedDecoder(timeout_s=30, decoder=FAULTY) as decoder:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with pytest.raises(Interrupted):
                _decode(decoder, faulty.HANG)
            stuck = decoder.pid
            assert _decode(decoder, GOOD) == _direct(GOOD)
            assert decoder.pid != stuck and decoder.starts == 2
            assert stuck not in _our_children()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_child_ignores_sigint_and_has_one_thread_per_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with SupervisedDecoder(timeout_s=30) as decoder:
        assert _decode(decoder, GOOD) == _direct(GOOD)
        pid = decoder.pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        assert _decode(decoder, GOOD) == _direct(GOOD)
        assert decoder.pid == pid
        env = psutil.Process(pid).environ()
        assert env["OMP_NUM_THREADS"] == "1" and env["OPENBLAS_NUM_THREADS"] == "1"


def test_close_leaves_no_process_and_is_idempotent() -> None:
    before = _our_children()
    decoder = SupervisedDecoder(timeout_s=30)
    assert decoder.pid is None  # started lazily
    assert _decode(decoder, GOOD) == _direct(GOOD)
    pid = decoder.pid
    assert pid is not None and pid in _our_children()
    decoder.close()
    decoder.close()
    assert decoder.pid is None
    assert not _alive(pid)
    assert _our_children() == before  # reaped: no zombie either


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from transforms.supervised import SupervisedDecoder
        from transforms.tensor import PreprocessParams
        decoder = SupervisedDecoder(timeout_s=30)
        decoder.decode(sys.stdin.buffer.read(), name="good.png", params=PreprocessParams(), pseudonym_key="k")
        print(decoder.pid, flush=True)
        time.sleep(3600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert parent.stdin is not None and parent.stdout is not None
    parent.stdin.write(GOOD)
    parent.stdin.close()
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    assert _wait_gone(child), "the decoder process outlived its parent"


def test_a_decoder_that_cannot_load_is_a_stage_error_not_a_verdict_on_the_file() -> None:
    with pytest.raises(ConfigError, match="'module:function'"):
        SupervisedDecoder(timeout_s=30, decoder="tests.faulty_decoder")
    with pytest.raises(ConfigError, match="positive"):
        SupervisedDecoder(timeout_s=0)
    before = _our_children()
    with SupervisedDecoder(timeout_s=30, decoder="tests.no_such_module:decode") as decoder:
        with pytest.raises(DecoderStartError, match=r"cannot load tests.no_such_module:decode: ModuleNotFoundError"):
            _decode(decoder, GOOD)
        assert not issubclass(DecoderStartError, InputError)
    assert _our_children() == before
