"""Progress reporting for long work: one callback type every stage accepts, and how to nest it.

A stage reports ``(message, fraction)`` (fraction in [0, 1], or None to keep
the bar where it is); the CLI draws it as a rich progress bar
(:func:`sfedge.console.progress_bar`).  Stages call :func:`tell`, which is a
no-op without a callback, and hand a sub-stage :func:`scaled`, which maps its
0..1 onto a slice of their own bar.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "tell", "scaled"]

Progress = Callable[[str, "float | None"], None]


def tell(progress: Progress | None, message: str, fraction: float | None = None) -> None:
    """Report ``message`` (and ``fraction``) if there is anyone to tell."""
    if progress is not None:
        progress(message, fraction)


def scaled(progress: Progress | None, start: float, span: float, label: str | None = None) -> Progress | None:
    """A callback for a sub-stage whose 0..1 covers ``start``..``start + span`` of ``progress``.

    ``label`` prefixes the sub-stage's messages ("tflite: converting ...").
    """
    if progress is None:
        return None

    def sub(message: str, fraction: float | None = None) -> None:
        text = f"{label}: {message}" if label else message
        progress(text, None if fraction is None else start + span * max(0.0, min(1.0, fraction)))

    return sub
