"""One way to write a file: atomically, with the permissions the umask gives, never half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_file", "atomic_write_text"]


def _umask_mode() -> int:
    # os.umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; when the block ends normally, rename it onto ``path``.

    On any exception (an interrupt included) the temporary file is removed and ``path`` is untouched, so a
    reader sees the old file or the whole new one. The file gets the umask's mode (``mkstemp`` alone would
    leave it 0600, unreadable to others).

    Args:
      path: the file to write.
      mode: ``'w'`` (text) or ``'wb'`` (bytes).

    Returns:
      a context manager yielding the open temporary file.

    Raises:
      ValueError: another mode.
      OSError: the folder cannot be written, or the disk is full (nothing is left behind); its ``filename`` is
        ``path``, never the temporary name.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode) as f:  # opened by name, so ``f.name`` is the temporary path
            yield f
            f.flush()
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None or err.filename not in (None, tmp):
            raise
        # A write that fails (a full disk) names no file, or the temporary one: name the file being written.
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_file``).

    Args:
      path: the file to write.
      text: its whole content.

    Returns:
      ``path`` as a ``Path``.

    Raises:
      OSError: the folder cannot be written (``path`` is then untouched).
    """
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)
