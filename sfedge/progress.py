"""Progress reporting for long work: one callback type every stage accepts, and how to nest it.

A stage reports ``(message, fraction)`` (fraction in [0, 1], or None to keep
the bar where it is); the CLI draws it as a rich progress bar
(:func:`sfedge.console.progress_bar`).  Stages call :func:`tell`, which is a
no-op without a callback, and hand a sub-stage :func:`scaled`, which maps its
0..1 onto a slice of their own bar.

Both also deliver a Ctrl-C that a library swallowed: the CLI's signal handler
records the signal (:func:`note_interrupt`) as well as raising
KeyboardInterrupt, and the next report raises it again if it never arrived
(some native code catches the KeyboardInterrupt raised inside it and carries
on: a build interrupted in ONNX export then ran to the end).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Progress", "tell", "scaled", "note_interrupt", "check_interrupt", "clear_interrupt"]

Progress = Callable[[str, "float | None"], None]
_PENDING: list[int] = []  # signals received and not yet raised at a report


def note_interrupt(signum: int) -> None:
    """Record a Ctrl-C / SIGTERM (called by the CLI's signal handler)."""
    _PENDING.append(signum)


def check_interrupt() -> None:
    """Raise KeyboardInterrupt once for a recorded signal (every report calls this).

    Only in the main thread: a report from a worker thread must not consume
    the signal the main thread has to see.
    """
    if _PENDING and threading.current_thread() is threading.main_thread():
        _PENDING.clear()
        raise KeyboardInterrupt


def clear_interrupt() -> None:
    """Forget recorded signals: the interrupt was handled (nothing may raise it again while the CLI exits)."""
    _PENDING.clear()


def tell(progress: Progress | None, message: str, fraction: float | None = None) -> None:
    """Report ``message`` (and ``fraction``) if there is anyone to tell."""
    check_interrupt()
    if progress is not None:
        progress(message, fraction)


def scaled(progress: Progress | None, start: float, span: float, label: str | None = None) -> Progress | None:
    """A callback for a sub-stage whose 0..1 covers ``start``..``start + span`` of ``progress``.

    ``label`` prefixes the sub-stage's messages ("tflite: converting ...").
    """
    if progress is None:
        return None

    def sub(message: str, fraction: float | None = None) -> None:
        check_interrupt()
        text = f"{label}: {message}" if label else message
        progress(text, None if fraction is None else start + span * max(0.0, min(1.0, fraction)))

    return sub
