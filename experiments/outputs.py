"""The output-folder contract every command shares: one run per folder, never replaced or mixed with another's.

* A folder that already holds a run's files (``results.json``, its figures, the chunk files of an interrupted
  run) is refused (exit 2, naming it) unless ``--overwrite`` (the old run's files are removed, then the run
  starts) or ``--resume`` (an interrupted run's finished chunks are reused).
* A lock file (``.lock``, ``flock``-ed, recording the pid and host) makes a second run into the same folder fail
  at once; the kernel releases the lock when its process dies, however it dies (``kill -9`` included), so a lock
  file left behind never blocks a later run.
* A folder is created only once JAX has started (``claim``, after ``runtime.start``): a run that dies before that
  (a garbage ``XLA_FLAGS`` ends the process from C++) leaves nothing behind. Folders created and still empty at
  the end are removed again (``release_all``).

Nothing here imports JAX.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path
from typing import Iterable

__all__ = ["LOCK", "CHUNKS", "RESULTS", "OutputError", "run_files", "check_folder", "lock_holder", "claim",
           "release", "release_all", "remove_run_files", "note_created", "remove_empty_created"]

LOCK = ".lock"
CHUNKS = "chunks"
RESULTS = "results.json"


class OutputError(Exception):
    """An output folder cannot be used as asked; the message is one line naming it and what to do."""


def run_files(folder: Path, figures: Iterable[str] = ()) -> list[str]:
    """The files of a run found in ``folder``.

    Args:
      folder: the output folder.
      figures: the experiment's figure file names.

    Returns:
      The names present among ``results.json``, ``figures`` and the ``chunks`` folder of an interrupted run.
    """
    return [name for name in (RESULTS, *figures, CHUNKS) if (folder / name).exists()]


def check_folder(folder: Path, *, overwrite: bool, resume: bool, figures: Iterable[str] = (),
                 locked: bool = False) -> None:
    """Whether a run may use ``folder`` as asked; creates nothing.

    Args:
      folder: the output folder (need not exist).
      overwrite: ``--overwrite`` was given.
      resume: ``--resume`` was given.
      figures: the experiment's figure file names.
      locked: this process holds the folder's lock already (``claim``).

    Raises:
      OutputError: another run is writing there; or it holds a run's files and neither flag was given; or
        ``--resume`` names a finished run (``results.json`` present).
    """
    holder = None if locked else lock_holder(folder)
    if holder:
        raise OutputError(f"--out {folder} is in use by another run ({holder}); wait for it to end or choose "
                          "another --out")
    found = run_files(folder, figures) if folder.is_dir() else []
    if not found or overwrite:
        return
    if resume:
        if RESULTS in found:
            raise OutputError(f"--resume: {folder} holds a finished run ({RESULTS}); nothing to resume (--overwrite "
                              "runs it again)")
        return
    if found == [CHUNKS]:
        raise OutputError(f"--out {folder} holds an interrupted run (its finished chunks); use --resume to continue "
                          "it, --overwrite to start again, or choose another --out")
    raise OutputError(f"--out {folder} already holds a run's files ({', '.join(found)}); use --overwrite to replace "
                      "that run, or choose another --out")


def lock_holder(folder: Path) -> str | None:
    """Who holds ``folder``'s lock, without taking it.

    Args:
      folder: the output folder.

    Returns:
      ``'pid N on HOST'`` when a live run holds it, else ``None``.
    """
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd, path):
            _unlock(fd)
            return None
        return _holder_text(path)
    finally:
        os.close(fd)


# Locks this process holds: folder -> file descriptor.
_HELD: dict[Path, int] = {}
# Folders this process created: removed at the end while still empty, deepest first.
_CREATED: list[Path] = []


def claim(folder: Path, *, overwrite: bool, resume: bool, figures: Iterable[str] = (), fresh: bool = False) -> Path:
    """Create ``folder`` if needed, lock it, check it again under the lock and, with ``overwrite``, remove the
    old run's files.

    Args:
      folder: the output folder.
      overwrite: ``--overwrite``: remove the old run's files (``results.json``, the figures, the chunks).
      resume: ``--resume``: keep an interrupted run's chunks.
      figures: the experiment's figure file names.
      fresh: the folder is a default one (``runs/<name>-<date>-<time>``): if another run created it first, take
        the next free name (``-2``, ``-3``, ...) instead of failing.

    Returns:
      The folder, locked until ``release``.

    Raises:
      OutputError: as ``check_folder``, or the folder is in use; OSError: it cannot be created.
    """
    folder = Path(folder)
    if fresh:
        folder = _new_folder(folder)
    else:
        note_created(folder)
        folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder)
    try:
        check_folder(folder, overwrite=overwrite, resume=resume, figures=figures, locked=True)
        if overwrite:
            remove_run_files(folder, figures)
    except BaseException:
        _release_fd(folder, fd)
        raise
    _HELD[folder] = fd
    return folder


def release(folder: Path) -> None:
    """Remove ``folder``'s lock file and release the lock (nothing if this process does not hold it).

    Args:
      folder: a folder ``claim`` returned.
    """
    fd = _HELD.pop(Path(folder), None)
    if fd is not None:
        _release_fd(Path(folder), fd)


def release_all() -> None:
    """Release every lock this process holds, then remove the folders it created that are still empty."""
    for folder in list(_HELD):
        release(folder)
    remove_empty_created()


def remove_run_files(folder: Path, figures: Iterable[str] = ()) -> None:
    """Remove a run's files from ``folder``: ``results.json``, ``figures``, the ``chunks`` folder. Other files stay.

    Args:
      folder: the output folder.
      figures: the experiment's figure file names.
    """
    for name in (RESULTS, *figures):
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass
    shutil.rmtree(folder / CHUNKS, ignore_errors=True)


def note_created(folder: Path) -> None:
    """Remember the folders among ``folder`` and its parents that do not exist yet (about to be created), so that
    ``remove_empty_created`` removes them again while empty.

    Args:
      folder: a folder about to be created.
    """
    _CREATED.extend(d for d in (folder, *folder.parents) if not d.exists() and d not in _CREATED)


def remove_empty_created() -> None:
    """Remove the folders ``note_created`` recorded that are still empty, deepest first."""
    _CREATED.sort(key=lambda d: len(Path(d).absolute().parts), reverse=True)
    while _CREATED:
        try:
            _CREATED.pop(0).rmdir()  # only succeeds when empty
        except OSError:
            pass


def _new_folder(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... whichever this process creates first (``mkdir`` is atomic)."""
    for i in range(1, 1000):
        candidate = base if i == 1 else base.with_name(f"{base.name}-{i}")
        note_created(candidate.parent)
        candidate.parent.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        _CREATED.append(candidate)
        return candidate
    raise OutputError(f"--out: no free folder name beside {base}")


def _lock(folder: Path) -> int:
    """Take ``folder``'s lock (its ``.lock`` file then records this pid and host); fail at once if held."""
    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd, path):
            holder = _holder_text(path)
            os.close(fd)
            raise OutputError(f"--out {folder} is in use by another run ({holder}); wait for it to end or choose "
                              "another --out")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        # Its previous holder removed the file between our open and our lock: lock the file now at the path.
        _unlock(fd)
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError:  # a full disk: no lock file may stay behind (nor, then, the folder made for this run)
        _release_fd(folder, fd)
        raise
    return fd


def _try_lock(fd: int, path: Path) -> bool:
    """Lock ``fd`` exclusively without waiting: ``False`` when another process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # A file system without flock (some network mounts): fall back on the pid the file records.
        return not _recorded_process_alive(path)


def _unlock(fd: int) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass


def _release_fd(folder: Path, fd: int) -> None:
    try:
        (folder / LOCK).unlink()  # removed while still locked, so no other run locks a file about to vanish
    except OSError:
        pass
    _unlock(fd)
    os.close(fd)


def _recorded(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _recorded_process_alive(path: Path) -> bool:
    """Whether the pid a lock file records is a live process of this host (another host's: assumed alive)."""
    recorded = _recorded(path)
    if recorded is None:
        return False
    pid, host = recorded
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_text(path: Path) -> str:
    recorded = _recorded(path)
    return f"pid {recorded[0]} on {recorded[1]}" if recorded else "a process that has not written its pid yet"
