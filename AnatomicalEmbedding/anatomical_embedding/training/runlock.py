"""One training process per run folder: an OS file lock on ``RUN_DIR/train.lock``, held for the whole run.

Two processes training the same run folder (Slicer crashed while its child still trains, or ``python train.py``
in a shell beside the Trainer module) would both write checkpoints and ``progress.jsonl``. The training process
(rank 0 under torchrun) holds an exclusive lock on ``RUN_DIR/train.lock`` from its set-up to its end; another
process that tries to lock it is refused with :class:`RunFolderBusy`, whose message names the owner.

An OS lock (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows) rather than a PID file: the operating system
releases it when the holder ends, however it ends (SIGKILL, crash, power loss of a client), so it never goes
stale, and a reused PID cannot fake an owner. The PID, start time and host written into the file are only for
the message. The file itself stays (deleting a lock file races with a process that has just opened it).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE_NAME = "train.lock"
#: Windows locks are mandatory: lock one byte far past the owner text, so that other processes can still read it.
_WINDOWS_LOCK_OFFSET = 2**30


class RunFolderBusy(RuntimeError):
    """The run folder is being trained by another live process."""


def lock_file(run_dir) -> Path:
    return Path(run_dir) / LOCK_FILE_NAME


def _try_lock(fh) -> bool:
    if os.name == "nt":  # pragma: no cover - Windows
        import msvcrt

        fh.seek(_WINDOWS_LOCK_OFFSET)
        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            fh.seek(0)
        return True
    import fcntl

    try:
        # flock (not lockf): it belongs to this open file, so a second open in the same process conflicts too,
        # and closing another descriptor of the file does not drop it.
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fh) -> None:
    if os.name == "nt":  # pragma: no cover - Windows
        import msvcrt

        fh.seek(_WINDOWS_LOCK_OFFSET)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        fh.seek(0)
        return
    import fcntl

    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _owner() -> dict:
    info = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname()}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        info["launcher_pid"] = os.getppid()  # the torchrun agent: stopping it stops every rank
    return info


def busy_message(run_dir, owner: dict | None) -> str:
    """The one line the user sees: who trains the folder, and what to do."""
    if not owner or "pid" not in owner:  # the holder has the lock but has not written its details yet
        who = "another process"
    else:
        who = f"process {owner['pid']}"
        if owner.get("launcher_pid"):
            who += f" (rank 0 of torchrun process {owner['launcher_pid']})"
        if owner.get("host") and owner["host"] != socket.gethostname():
            who += f" on {owner['host']}"
        who += f" (started {owner.get('started', '?')})"
    return f"{run_dir} is being trained by {who}; stop it or choose another run folder"


def read_owner(run_dir) -> dict | None:
    try:
        text = lock_file(run_dir).read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


class RunLock:
    """The exclusive lock of one run folder (see the module doc); a context manager.

    ``acquire()`` raises :class:`RunFolderBusy` at once (never waits) when another process holds it.
    """

    def __init__(self, run_dir) -> None:
        self.run_dir = Path(run_dir)
        self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self) -> RunLock:
        if self._fh is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # "a+": open without truncating, so a refused attempt does not erase the holder's details.
        fh = open(lock_file(self.run_dir), "a+", encoding="utf-8")
        try:
            if not _try_lock(fh):
                raise RunFolderBusy(busy_message(self.run_dir, read_owner(self.run_dir)))
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(_owner()) + "\n")
            fh.flush()
        except BaseException:
            fh.close()
            raise
        self._fh = fh
        log.debug("locked %s", lock_file(self.run_dir))
        return self

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            fh.seek(0)
            fh.truncate()  # no details of a process that has finished
            _unlock(fh)
        except OSError as exc:  # closing the file releases the lock anyway
            log.debug("unlocking %s: %s", lock_file(self.run_dir), exc)
        finally:
            fh.close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_run_folder_free(run_dir) -> None:
    """Raise :class:`RunFolderBusy` if a live process trains ``run_dir`` (the Trainer module asks before launching).

    Tries the lock and gives it back at once, writing nothing: the launcher itself must not hold it (if Slicer
    crashed, its child would go on training unprotected).
    """
    path = lock_file(run_dir)
    if not path.is_file():
        return
    with open(path, "a+", encoding="utf-8") as fh:
        if not _try_lock(fh):
            raise RunFolderBusy(busy_message(run_dir, read_owner(run_dir)))
        _unlock(fh)
