"""sfedge: SFConv and vanilla medical-imaging CNNs to per-device artifacts, and a profiler.

``import sfedge`` is cheap and needs neither torch nor any converter: the
runtime-only install (``pip install 'sfedge[runtime]'``) on a device uses the
bundle, runner and profiler modules, which import their heavy dependencies
lazily.  Model code lives in ``sfedge.nn`` and ``sfedge.models`` (torch).
"""

__version__ = "0.1.0"

from sfedge.errors import SfedgeError  # noqa: E402

__all__ = ["SfedgeError", "__version__"]
