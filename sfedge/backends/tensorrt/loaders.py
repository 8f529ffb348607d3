"""TensorRT and Polygraphy's TensorRT loaders, imported lazily, with Polygraphy's log and errors in sfedge's terms.

sfedge builds and runs engines through ``polygraphy.backend.trt`` (NVIDIA's own
loaders and runner, tested against each TensorRT release; :mod:`.builder`,
:mod:`.runner`).  This module is the seam: it says precisely what is missing
when TensorRT or Polygraphy is (:func:`require_tensorrt`), keeps Polygraphy's
log off stdout so ``--json`` output stays parseable (:func:`polygraphy_session`),
and turns a ``PolygraphyException`` into sfedge's one-line error.

Nothing here creates TensorRT objects: callers do that only after the
subprocess probe (:func:`sfedge.backends.tensorrt.gpu.detect_gpu`) found a
usable GPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from sfedge.errors import BackendUnavailable, SfedgeError

__all__ = ["require_tensorrt", "polygraphy_session", "TENSORRT_HINT", "POLYGRAPHY_HINT"]

TENSORRT_HINT = ("on a Jetson install JetPack's python3-libnvinfer (TensorRT's Python bindings); on an x86 host "
                 "with a GPU: pip install 'sfedge[tensorrt]'; or build with build_engine.sh (trtexec)")
POLYGRAPHY_HINT = "pip install 'sfedge[runtime]' (Polygraphy: sfedge builds and runs engines through it)"


def require_tensorrt() -> str:
    """The installed TensorRT's version; BackendUnavailable saying what is missing (TensorRT or Polygraphy).

    Why not just ``import tensorrt``: a folder named ``tensorrt`` without
    TensorRT in it (type stubs installed into site-packages, a half-removed
    install) imports fine as an empty namespace package, and the failure
    would come later as an AttributeError deep in Polygraphy.
    """
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(f"TensorRT's Python bindings are not installed here ({e})", TENSORRT_HINT) from e
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str):
        where = ", ".join(getattr(trt, "__path__", [])) or getattr(trt, "__file__", "?")
        raise BackendUnavailable(f"the 'tensorrt' module found here ({where}) is not TensorRT's bindings "
                                 "(it has no __version__)", TENSORRT_HINT)
    try:
        import polygraphy.backend.trt  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"Polygraphy is not installed here ({e})", POLYGRAPHY_HINT) from e
    return version


@contextlib.contextmanager
def polygraphy_session(error: type[SfedgeError], what: str, hint: str) -> Iterator[None]:
    """Run Polygraphy calls with its log on stderr, and a ``PolygraphyException`` as ``error(what: reason, hint)``.

    Polygraphy prints its log (and TensorRT's, through its logger) to stdout;
    sfedge's stdout carries tables and JSON.  Polygraphy reports every failure
    (a parser error, a failed build, an engine that does not deserialize) by
    logging it and raising ``PolygraphyException``; its last line is the reason.
    """
    from polygraphy.exception import PolygraphyException

    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except PolygraphyException as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise error(f"{what}: {reason}", hint) from e
