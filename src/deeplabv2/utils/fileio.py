"""Atomic file writes: a crash or a full disk never leaves half a checkpoint or report.

Every file goes to a temporary ``.{name}.*.tmp`` beside its final name and is renamed over it
only once complete, so the final name holds either the old file or the new one, never a part.
A temporary file left by a ``kill -9`` is removed by :func:`remove_stale_tmp` at the next start.
A write the file system refuses (a full disk, a file-size limit, a read-only folder) is a
:class:`WriteError` naming the file, the reason and the free space, whatever the writing library
raised (:func:`write_failure`). Files get the permissions the user's umask gives (``mkstemp``
alone would make them 0600).
"""

from __future__ import annotations

import errno
import io
import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


class WriteError(OSError):
    """A file could not be written (read-only folder, full disk...); the message names the file,
    the reason and the free space, and says that the previous version of the file (if any) is
    unchanged."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[str], None], *, fsync: bool = True) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path``. On any error the temporary file is removed and ``path`` is left as it was; a failed
    write (no space, a file-size limit, permission, read-only file system) becomes a
    :class:`WriteError` naming ``path`` (see :func:`write_failure`)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after the write: some writers recreate the file
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        err = write_failure(path, e, tmp)  # probes the partial file, then removes it
        if tmp is not None and os.path.exists(tmp):  # (an interrupt: not given to it)
            os.unlink(tmp)
        if err is e:
            raise
        raise err from None


_PROBE_BYTES = 1 << 20


def write_failure(path, error: BaseException, partial=None) -> BaseException:
    """What to raise for ``error``, raised while ``path`` was written (through the temporary
    file ``partial``): a :class:`WriteError` naming ``path``, the reason and the free space when
    the file system refused the write, else ``error`` itself.

    An ``OSError`` with an errno says so itself. Writers in C++ do not: ``torch.save``'s zip
    writer raises ``RuntimeError: ... unexpected pos``, OpenVINO's ``basic_ios::clear: iostream
    error``, Pillow's encoder ``encoder error -2``. For those, up to 1 MiB is appended to
    ``partial``: when the file system refuses that too (a full disk, a file-size limit), its
    ``OSError`` is the reason. ``partial`` is removed (then the free space is measured: what
    the user has, not the part that filled the disk)."""
    if isinstance(error, WriteError) or not isinstance(error, Exception):
        return error
    cause = error if isinstance(error, OSError) and error.errno else None
    if cause is None and partial is not None:
        cause = _probe(Path(partial))
    if partial is not None:
        try:
            os.unlink(partial)
        except OSError:
            pass
    if cause is None and isinstance(error, OSError):
        cause = error
    if cause is None:
        return error
    path = Path(path)
    reason = cause.strerror or str(cause) or type(cause).__name__
    old = " (the previous file is unchanged)" if path.exists() else ""
    space = _free_space(path.parent)
    limit = _size_limit() if cause.errno == errno.EFBIG else None
    if limit is not None:
        space += f", files limited to {_size(limit)} (ulimit -f)"
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free space or choose another output folder"
    elif cause.errno == errno.EFBIG:
        advice = ("raise the file-size limit or choose another output folder" if limit
                  is not None else "choose another output folder")
    else:
        advice = "free space, fix the permissions or choose another output folder"
    err = WriteError(f"{path}: cannot write: {reason}{old}; {space}: {advice}")
    err.errno = cause.errno
    return err


def _probe(partial: Path) -> OSError | None:
    """The ``OSError`` appending to ``partial`` gives (with a flush and an fsync: some file
    systems report a full disk only then), or None when the file system takes the bytes."""
    try:
        with open(partial, "ab") as f:
            f.write(bytes(_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    return None


def _free_space(folder: Path) -> str:
    """``"1.2 MiB free in FOLDER"`` (the nearest folder that exists), or ``"free space
    unknown"``."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{_size(shutil.disk_usage(folder).free)} free in {folder}"
    except OSError:
        return "free space unknown"


def _size_limit() -> int | None:
    """This process's file-size limit (``ulimit -f``) in bytes, or None when there is none."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_buffered(path, write: Callable[[BinaryIO], None], *,
                          fsync: bool = True) -> None:
    """``write(buffer)`` into memory, then its bytes to ``path`` as :func:`atomic_write` does.
    For Pillow (and Matplotlib's PNGs, which Pillow writes): given a file, it writes with
    ``write(2)`` and takes a short write for success, so a full disk or a file-size limit
    leaves a truncated image and no error. Python's own writes retry a short write and raise
    on a refused one."""
    buffer = io.BytesIO()  # no fileno(): Pillow hands its bytes to buffer.write
    write(buffer)
    data = buffer.getbuffer()

    def write_data(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write_data, fsync=fsync)


def remove_stale_tmp(folder) -> list[Path]:
    """Delete the ``.{name}.*.tmp`` files :func:`atomic_write` leaves when a process is killed
    mid-write (never a final name); return what was removed. Call it only while holding the
    folder (e.g. under :class:`RunLock`), so that no live writer's file goes."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*.tmp"):
        if p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


class RunLock:
    """``folder/.lock`` held by one writer: created exclusively, holding ``pid host``.

    A second process that finds the lock held by a live process is refused with a
    :class:`LockError` naming the holder. A lock left by a process that no longer runs (a
    ``kill -9``, a crash) on this host is taken over; a lock from another host cannot be checked
    and is refused, with the file named so that the user can remove it.
    """

    NAME = ".lock"

    def __init__(self, folder):
        self.path = Path(folder) / self.NAME
        self.held = self.created = False

    def acquire(self) -> "RunLock":
        import socket
        host = socket.gethostname()
        try:
            self.created = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(f"{self.path.parent}: cannot create the output folder: "
                             f"{e.strerror or e}; choose another output folder") from None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                             0o666 & ~_umask())
            except FileExistsError:
                pid, owner = self._holder()
                if owner == host and pid is not None and not _alive(pid):
                    try:  # the holder is gone: a crash or kill -9 left the lock behind
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                who = f"process {pid} on {owner}" if pid is not None else "another process"
                raise LockError(f"{self.path.parent}: another run is writing here ({who}, lock "
                                f"file {self.path}); wait for it, choose another train.out_dir, "
                                f"or delete the lock file if that process is gone") from None
            except OSError as e:
                raise WriteError(f"{self.path.parent}: cannot write in the output folder: "
                                 f"{e.strerror or e}; choose another output folder") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {host}\n")
            self.held = True
            return self
        raise LockError(f"{self.path}: could not take the lock (it keeps reappearing)")

    def _holder(self) -> tuple[int | None, str | None]:
        try:
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None, None

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            if self.created:  # a run that failed before writing anything leaves no folder
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class LockError(RuntimeError):
    """The output folder is held by another live process."""


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
