"""How a command ends when it does not end normally: Ctrl-C and SIGTERM (one line, status 130/143), a full
disk (one line, status 1), out of memory, a closed pipe; locks released and empty output folders removed on
every path. ``runtime.main_wrapper`` is this module's ``main_wrapper``.

Nothing here imports JAX.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Callable

from experiments import chunks
from experiments.cli import remove_empty_outputs

__all__ = ["main_wrapper", "raise_if_interrupted"]

# Signals received and not yet seen to end the run: an interrupt raised where it is swallowed (a library's
# ``except BaseException``, a gc callback) would otherwise be lost. ``raise_if_interrupted`` raises it again.
_PENDING: list[int] = []


def raise_if_interrupted() -> None:
    """Raise the interrupt a signal asked for if it has not ended the run yet; called at each progress step, each
    finished chunk and before any result is written, so a swallowed interrupt still ends the run there.

    Raises:
      KeyboardInterrupt: after a SIGINT; ``_Terminated`` (a BaseException) after a SIGTERM.
    """
    if _PENDING:
        if _PENDING[0] == signal.SIGTERM:
            raise _Terminated()
        raise KeyboardInterrupt


def main_wrapper(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main`` as a command: Ctrl-C or SIGTERM end in one line and status 130/143 (never 0), a full disk in
    one line and status 1.

    Temporary files are removed by the ``atomic_file`` blocks the interrupt unwinds through; then the process
    ends at once (``os._exit``), because a normal interpreter exit with device work still in flight can crash.

    Args:
      main: the command's ``main(argv) -> status``.
      argv: its arguments (``None``: ``sys.argv[1:]``).

    Returns:
      ``main``'s status; 130 (Ctrl-C), 143 (SIGTERM) or 1 (out of memory, a full disk, a closed pipe) end the
      process directly instead, after one line (which names the chunk files an interrupted run keeps for
      ``--resume``), with every output-folder lock released.
    """

    def on_term(signum, frame):
        _PENDING.append(signum)
        raise _Terminated()

    def on_int(signum, frame):
        _PENDING.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    previous_int = signal.signal(signal.SIGINT, on_int) if _main_thread() else None
    previous_hook = sys.unraisablehook

    def redeliver(unraisable):
        # An interrupt that lands inside a garbage-collection callback or a __del__ (JAX runs one on every
        # collection) is swallowed there ("Exception ignored in ..."), and the run would go on. Send the signal
        # again, from a thread a moment later (sent from here, it would be handled inside this callback again).
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, (KeyboardInterrupt, _Terminated)):
            import threading

            signum = signal.SIGINT if issubclass(unraisable.exc_type, KeyboardInterrupt) else signal.SIGTERM
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        previous_hook(unraisable)

    sys.unraisablehook = redeliver
    try:
        status = main(argv)
        raise_if_interrupted()  # an interrupt swallowed on the way never ends as a success
        return status
    except KeyboardInterrupt:
        _hard_exit(f"\ninterrupted; no partial file was written{chunks.kept_note()}", 130)
    except _Terminated:
        _hard_exit(f"terminated; no partial file was written{chunks.kept_note()}", 143)
    except MemoryError:
        _hard_exit("error: out of host memory; use fewer models (--num-seeds, scales) or "
                   "--max-models-per-chunk, or a smaller --batch-size", 1)
    except BrokenPipeError:
        # The reader of our output went away (``| head``): nothing more to say, and nowhere to say it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _hard_exit("", 1)
    except OSError as err:
        if err.errno not in _WRITE_ERRORS:
            raise
        # A full disk (or quota, or a file-size limit) while writing an output: atomic_file left no partial file.
        _hard_exit(f"error: cannot write {err.filename or 'an output file'}: {err.strerror}; no partial file was "
                   f"written{chunks.kept_note()}", 1)
    except Exception as err:
        if "RESOURCE_EXHAUSTED" in str(err):  # XLA's out-of-memory has no class of its own
            _hard_exit(f"error: out of memory ({str(err).strip().splitlines()[0][:120]}); use smaller sizes or "
                       "--max-models-per-chunk", 1)
        raise
    finally:
        sys.unraisablehook = previous_hook
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
        remove_empty_outputs()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 1  # not reached


# What a full disk, a quota, a file-size limit or a read-only remount raise while an output is written.
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _hard_exit(message: str, status: int) -> None:
    remove_empty_outputs()
    if message:
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class _Terminated(BaseException):
    pass


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
