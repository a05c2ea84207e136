"""The run folder's writer lock: one command writes into a run at a time.

An advisory `fcntl.flock` on RUN/.lock, held for the whole command by everything that writes
into a run (train, evaluate, export, explain into the run). The file records the holder's pid,
host and command, so a second writer is refused with one line naming it. The kernel drops a
flock when its process dies (kill -9 included), so a lock file left by a dead process is
simply taken over; the file's record then names the dead holder and we say so. The lock is
re-entrant within a thread (export inside predict, ensure_onnx inside export), since one
command may reach it through several library functions; another thread of the same process
is a second writer and is refused as one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from ._io import os_error
from .errors import XferlearnError

LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # resolved lock path -> [fd, depth, thread], for re-entry in this thread
_guard = threading.Lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(text: str) -> tuple[int | None, str, str]:
    """(pid, host, command) from a lock file's text."""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    pid = fields.get("pid", "")
    return (int(pid) if pid.isdigit() else None), fields.get("host", "?"), fields.get("command", "?")


@contextmanager
def run_lock(root: str | Path, command: str | None = None, notify=None):
    """Hold RUN/.lock for the block; a second writer gets one XferlearnError line naming the holder."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = (root / LOCK_FILE).resolve()
    except OSError as error:
        raise os_error(root, error, "create") from None
    key = str(path)
    with _guard:
        reentered = key in _held
        if reentered and _held[key][2] != threading.get_ident():
            raise XferlearnError(f"{root} is in use by another thread of this process; wait for it to finish, or "
                                 "use another folder.")
        if reentered:
            _held[key][1] += 1
    if reentered:
        try:
            yield path
        finally:
            with _guard:
                _held[key][1] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise os_error(path, error, "create the lock file") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise os_error(path, error, "lock") from None
            pid, host, what = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            raise XferlearnError(f"{root} is in use by another command ({what}, pid {pid} on {host}); wait for it "
                                 f"to finish, or use another folder. (Lock file: {path}.)") from None
        pid, host, what = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        here = socket.gethostname()
        if pid is not None and pid != os.getpid() and (host != here or not _alive(pid)):
            message = (f"took over a stale lock on {root} left by pid {pid} on {host} ({what}), "
                       "which is no longer running")
            (notify or (lambda text: print(f"xferlearn: {text}", file=sys.stderr)))(message)
        record = f"pid={os.getpid()}\nhost={here}\ncommand={command or ' '.join(sys.argv[:3])}\n".encode()
        try:  # the lock file is the lock itself: rewritten in place, not by rename
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError as error:
            raise os_error(path, error) from None
        with _guard:
            _held[key] = [fd, 1, threading.get_ident()]
        try:
            yield path
        finally:
            with _guard:
                del _held[key]
            try:
                os.ftruncate(fd, 0)  # released cleanly: no holder to report
            except OSError:
                pass
    finally:
        os.close(fd)  # closing the descriptor releases the flock
