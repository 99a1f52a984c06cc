"""A Python child process whose files may not grow past a size: a full disk without root or a
mount. With SIGXFSZ ignored, a write past ``ulimit -f`` fails with EFBIG as one on a full disk
fails with ENOSPC; the C++ writers (torch.save's zip writer, OpenVINO's) turn either into a
``RuntimeError`` that hides the reason."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

#: Child code that defines ``limit_file_size(n)`` (bytes; ``None`` lifts the limit).
PRELUDE = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_HARD = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
def limit_file_size(n):
    resource.setrlimit(resource.RLIMIT_FSIZE, (_HARD if n is None else n, _HARD))
"""

#: Child code that runs ``deeplabv2`` with the child's arguments, as ``python -m deeplabv2``.
CLI = """
import runpy, sys
sys.argv = ["deeplabv2", *sys.argv[1:]]
runpy.run_module("deeplabv2", run_name="__main__", alter_sys=True)
"""


def run_python(code: str, *args, timeout: float) -> tuple[int | None, str, str]:
    """``python -c PRELUDE + code args...``: ``(exit code, stdout, stderr)``; the exit code is
    None when the child had not ended after ``timeout`` seconds (it is then killed with its
    process group: loader workers included)."""
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "PYTHONDONTWRITEBYTECODE": "1"},
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def refused(path, limit: str, old: bool = False, *, name: str | None = None) -> str:
    """The pattern of the one-line error of a write of ``path`` (or of the file pattern
    ``name`` in its folder) that a file-size limit of ``limit`` (as the message writes it)
    refused; ``old``: a previous version of the file was kept."""
    path = Path(path)
    file = re.escape(str(path)) if name is None else re.escape(f"{path.parent}/") + name
    return (rf"{file}: cannot write: File too large"
            rf"{re.escape(' (the previous file is unchanged)') if old else ''}; "
            rf"[\d.]+ (bytes|[KMGT]iB) free in {re.escape(str(path.parent))}, files "
            rf"limited to {re.escape(limit)} \(ulimit -f\): raise the file-size limit or choose "
            rf"another output folder")
