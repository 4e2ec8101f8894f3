"""One server per SQLite file, enforced.

Two `bridge serve` processes on one SQLite file would each lease and deliver its jobs and
keep their own in-memory dedupe keys, and a dedupe merge in one deletes waiting keys the
other has not merged: duplicates would be taken and delivered. So the server's store holds
an exclusive lock on ``<file>.server-lock`` for as long as it is open, and a second server
fails at start with a message saying why. The CLI, which may work on the file while the
server runs (pause, replay, prune), does not take it.

``flock`` rather than SQLite's own locks: the kernel drops it when the process ends, however
it ends, so a crash never leaves the file locked; and it is independent of the POSIX locks
SQLite takes on the database file itself.
"""

from __future__ import annotations

import os

from bridge.store.base import StoreError, StoreInUse

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: the rule stays documented only
    fcntl = None  # type: ignore[assignment]

SUFFIX = ".server-lock"


class ServerLock:
    def __init__(self, db_path: str) -> None:
        self.path = db_path + SUFFIX
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None or self._fd is not None:
            return
        try:
            # Read-only is enough for flock: a server restarted as another user can still lock it.
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the server lock {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreInUse(
                f"another bridge server is using {self.path.removesuffix(SUFFIX)} (it holds {self.path}): "
                "two servers on one SQLite file would both deliver its events; stop the other one, "
                "or use a PostgreSQL store to run several"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc}") from exc
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock
