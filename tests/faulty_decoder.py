"""A decoder that fails like a native decoder on marked inputs: for fault-injection tests.

Point :class:`transforms.supervised.SupervisedDecoder` at it with ``decoder="tests.faulty_decoder:decode"``
(importable with the repository root on the path, e.g. ``PYTHONPATH=.``; the supervisor passes its
own ``sys.path`` to the child). A file whose bytes contain a marker misbehaves; any other file is
decoded by :func:`transforms.tensor.preprocess_bytes`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from lakehouse.errors import DecodeError
from transforms.tensor import PreprocessParams, preprocess_bytes

ABORT = b"CXR-FAULT-ABORT"  # os.abort(): the process dies with SIGABRT, as a native assertion would
HANG = b"CXR-FAULT-HANG"  # sleeps for an hour, as a decoder stuck in a loop would
HANG_WITH_CHILD = (
    b"CXR-FAULT-SPAWN-HANG"  # starts a grandchild that sleeps, writes its pid to the path after the marker, hangs
)
BAD_INPUT = b"CXR-FAULT-BADINPUT"  # raises DecodeError (an InputError) with BAD_INPUT_MESSAGE
UNEXPECTED = b"CXR-FAULT-UNEXPECTED"  # raises ValueError with UNEXPECTED_MESSAGE (a bug, not an input error)
EXIT = b"CXR-FAULT-EXIT"  # os._exit(3): the process ends without a signal
NOISY = b"CXR-FAULT-NOISY"  # writes to fds 1 and 2 (as native libraries do), then decodes the rest normally

BAD_INPUT_MESSAGE = "corrupt test file: the marker CXR-FAULT-BADINPUT says so"
UNEXPECTED_MESSAGE = "a bug in the decoder: the marker CXR-FAULT-UNEXPECTED says so"


def decode(data: bytes, *, name: str, params: PreprocessParams, pseudonym_key: str) -> dict[str, Any]:
    """Misbehave on a marked input; else exactly :func:`transforms.tensor.preprocess_bytes`."""
    if ABORT in data:
        os.abort()
    if HANG_WITH_CHILD in data:
        pid_file = data.split(HANG_WITH_CHILD, 1)[1].decode().strip()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        with open(pid_file, "w") as f:
            f.write(str(child.pid))
        time.sleep(3600)
    if HANG in data:
        time.sleep(3600)
    if EXIT in data:
        os._exit(3)
    if BAD_INPUT in data:
        raise DecodeError(BAD_INPUT_MESSAGE)
    if UNEXPECTED in data:
        raise ValueError(UNEXPECTED_MESSAGE)
    if NOISY in data:
        os.write(1, b"noise on stdout from a native library\n")
        os.write(2, b"noise on stderr from a native library\n")
        print("noise from print()")
        data = data.replace(NOISY, b"")
    return preprocess_bytes(data, name=name, params=params, pseudonym_key=pseudonym_key)
