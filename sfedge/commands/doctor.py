"""`sfedge doctor`: the first command to run on a new device; its output goes straight into an issue report.

It reports what this machine is (Jetson model and L4T release, CPU, memory),
its CUDA GPU (name, SM, memory, DLA cores) and the TensorRT and Polygraphy
installed next to it; builds a tiny fp32 engine from the ONNX sfedge ships
(``sfedge/selftest/doctor.onnx``, written by tests/doctor_model.py), checks it
against ONNX Runtime on this device (or, without ONNX Runtime, against the
reference outputs shipped beside it) and times it; and says, for every sfedge
target it finds, whether this device matches it.

It is the first real test of sfedge's TensorRT path: the engine goes through
the same builder and runner as ``sfedge build`` on a Jetson.  Nothing here
needs torch.  TensorRT objects are only created after the subprocess probe
found a usable GPU (:mod:`sfedge.backends.tensorrt.gpu`).

Exit status: 0 when everything that could be checked here passed, including
"nothing to check here" (no GPU or no TensorRT: the output says exactly what
is missing); 1 when something present is broken (TensorRT that fails, an
engine that does not build, load or agree); 2 for sfedge's usual errors.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

import sfedge
from sfedge.backends.registry import backend_info
from sfedge.backends.tensorrt import builder, runner
from sfedge.backends.tensorrt.gpu import DeviceReport, GpuInfo, probe_device
from sfedge.backends.tensorrt.loaders import POLYGRAPHY_HINT, TENSORRT_HINT
from sfedge.console import console, fmt_bytes, print_json
from sfedge.errors import SfedgeError
from sfedge.parity import Parity, Tolerance, compare_outputs
from sfedge.profile.stats import summarize
from sfedge.targets import Target, list_targets, target_dirs

__all__ = ["diagnose", "Diagnosis", "Check", "EXIT_BROKEN", "SELFTEST_ONNX", "SELFTEST_REFERENCE", "TOLERANCE"]

EXIT_BROKEN = 1
SELFTEST_DIR = Path(sfedge.__file__).resolve().parent / "selftest"
SELFTEST_ONNX, SELFTEST_REFERENCE = SELFTEST_DIR / "doctor.onnx", SELFTEST_DIR / "doctor.npz"
# The fp32 tolerance of sfedge's Jetson targets: an fp32 engine (TF32 off) against ONNX Runtime's fp32 CPU kernels.
TOLERANCE = Tolerance(max_abs=1e-3, cosine=0.9999)
WORKSPACE_MB = 256

EPILOG = """examples:
  sfedge doctor                 on a new Jetson, before anything else
  sfedge doctor --json > doctor.json     attach to an issue report

Exit status: 0 when everything that could be checked here passed (also when there is nothing
to check: no GPU or no TensorRT, and the output says what is missing); 1 when something
present is broken (TensorRT failing, the test engine not building, loading or agreeing with
ONNX Runtime); 2 for a bad option."""

OK, MISSING, BROKEN, INFO = "ok", "missing", "broken", "info"


@dataclass
class Check:
    """One line of the report: what was looked at, how it went, what it found, how to fix it."""

    name: str
    status: str  # ok | missing | broken | info
    detail: str
    hint: str | None = None


@dataclass
class Diagnosis:
    """Everything `sfedge doctor` found (its --json output)."""

    checks: list[Check] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] | None = None
    targets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        """broken if anything is; ok if the engine ran; else nothing-to-check."""
        if any(c.status == BROKEN for c in self.checks):
            return "broken"
        return "ok" if self.engine is not None else "nothing-to-check"

    @property
    def exit_code(self) -> int:
        return EXIT_BROKEN if self.status == "broken" else 0

    def as_dict(self) -> dict[str, Any]:
        return {"sfedge": sfedge.__version__, "status": self.status, "exit_code": self.exit_code,
                "checks": [asdict(c) for c in self.checks], "device": self.device, "engine": self.engine,
                "targets": self.targets}


def _module_version(name: str) -> tuple[str | None, str | None]:
    """(version, None) of an importable module, (None, why) otherwise; imported, so only for safe modules."""
    if importlib.util.find_spec(name) is None:
        return None, f"No module named '{name}'"
    try:
        module = __import__(name)
    except Exception as e:  # a broken install: report it, do not crash the doctor
        return None, f"{type(e).__name__}: {e}"
    return str(getattr(module, "__version__", "?")), None


def _host() -> dict[str, Any]:
    import psutil

    memory = psutil.virtual_memory()
    return {"python": platform.python_version(), "machine": platform.machine(), "system": platform.system(),
            "release": platform.release(), "cpus": os.cpu_count(), "memory_bytes": int(memory.total),
            "available_memory_bytes": int(memory.available)}


def _device_checks(report: DeviceReport, diagnosis: Diagnosis) -> None:
    host = diagnosis.device["host"]
    diagnosis.checks.append(Check("sfedge", OK, f"sfedge {sfedge.__version__}, Python {host['python']}, "
                                                f"{host['system']} {host['machine']}"))
    diagnosis.checks.append(Check("host", INFO, f"{host['cpus']} CPUs, {fmt_bytes(host['memory_bytes'])} RAM "
                                                f"({fmt_bytes(host['available_memory_bytes'])} available)"))
    if report.jetson_model or report.l4t:
        diagnosis.checks.append(Check("jetson", INFO, f"{report.jetson_model or '?'}; {report.l4t or 'no L4T release'}"))
    if report.probe_failed:
        diagnosis.checks.append(Check("gpu", BROKEN, "the GPU probe (a child Python process) crashed, hung or printed "
                                                     "no report", "run it by hand: python -c 'import ctypes; "
                                                     "ctypes.CDLL(\"libcuda.so.1\").cuInit(0)'"))
    elif report.gpu is None:
        diagnosis.checks.append(Check("gpu", MISSING, "no CUDA GPU (no libcuda, or it sees no device)",
                                      "on a Jetson, check JetPack's install (tegrastats, nvidia-smi on x86)"))
    else:
        g = report.gpu
        parts = [f"{g.name}, sm_{g.sm}", f"{fmt_bytes(g.memory_bytes)}"
                 + (f" ({fmt_bytes(g.free_memory_bytes)} free)" if g.free_memory_bytes is not None else ""),
                 f"CUDA driver {g.cuda_driver // 1000}.{g.cuda_driver % 1000 // 10}",
                 f"DLA cores: {g.dla_cores if g.dla_cores is not None else '? (TensorRT not usable)'}"]
        diagnosis.checks.append(Check("gpu", OK, "; ".join(parts)))
    if report.tensorrt is not None and not (report.gpu and report.gpu.tensorrt_error):
        diagnosis.checks.append(Check("tensorrt", OK, f"TensorRT {report.tensorrt}"))
    elif report.tensorrt is not None:
        diagnosis.checks.append(Check("tensorrt", BROKEN, f"TensorRT {report.tensorrt} imports but does not work: "
                                                          f"{report.tensorrt_error}", TENSORRT_HINT))
    elif report.tensorrt_error and "No module named 'tensorrt'" not in report.tensorrt_error:
        diagnosis.checks.append(Check("tensorrt", BROKEN, f"'import tensorrt' fails: {report.tensorrt_error}",
                                      TENSORRT_HINT))
    elif not report.probe_failed:
        diagnosis.checks.append(Check("tensorrt", MISSING, "TensorRT's Python bindings are not installed",
                                      TENSORRT_HINT))
    version, why = _module_version("polygraphy")
    diagnosis.device["polygraphy"] = version
    diagnosis.checks.append(Check("polygraphy", OK, f"Polygraphy {version}") if version
                            else Check("polygraphy", MISSING, f"Polygraphy is not installed ({why})", POLYGRAPHY_HINT))
    version, why = _module_version("onnxruntime")
    diagnosis.device["onnxruntime"] = version
    diagnosis.checks.append(Check("onnxruntime", INFO, f"ONNX Runtime {version} (the engine's parity reference)")
                            if version else
                            Check("onnxruntime", INFO, "not installed: the engine is checked against the reference "
                                                       "outputs shipped with sfedge"))


def _reference(x: np.ndarray, stored: np.ndarray) -> tuple[np.ndarray, str]:
    """ONNX Runtime's output for ``x`` on this device when it has ONNX Runtime, else the stored reference."""
    try:
        import onnxruntime as ort
    except ImportError:
        return stored, "the reference outputs shipped with sfedge (ONNX Runtime on the build machine)"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(SELFTEST_ONNX), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0], np.float32), f"ONNX Runtime {ort.__version__} on this device"


def _engine_checks(gpu: GpuInfo, runs: int, diagnosis: Diagnosis) -> None:
    """Build the self-test engine with sfedge's builder, run it with sfedge's runner, check and time it."""
    data = np.load(SELFTEST_REFERENCE)
    x, stored = np.asarray(data["input"]), np.asarray(data["logits"])
    with tempfile.TemporaryDirectory(prefix="sfedge-doctor-") as tmp:
        engine_path = Path(tmp) / "doctor.engine"
        try:
            build = builder.build_engine(SELFTEST_ONNX, engine_path, precision="fp32", workspace_mb=WORKSPACE_MB,
                                         timing_cache=Path(tmp) / "timing.cache")
        except SfedgeError as e:
            diagnosis.checks.append(Check("engine build", BROKEN, f"{SELFTEST_ONNX.name}: {e.message}", e.hint))
            return
        diagnosis.checks.append(Check("engine build", OK, f"fp32 engine of {SELFTEST_ONNX.name} in {build.seconds:.1f} s "
                                                          f"({fmt_bytes(build.engine_bytes)}), TensorRT {build.tensorrt}"))
        engine: dict[str, Any] = {"onnx": SELFTEST_ONNX.name, "precision": "fp32", "build_seconds": build.seconds,
                                  "engine_bytes": build.engine_bytes, "tensorrt": build.tensorrt}
        diagnosis.engine = engine
        try:
            with runner.TensorRTRunner(engine_path) as trt_runner:
                feed = trt_runner.prepare(x)
                output = trt_runner.finish(trt_runner.infer(feed))
                for _ in range(3):  # warm-up: first runs pay for lazy allocations and clock ramp-up
                    trt_runner.infer(feed)
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    trt_runner.infer(feed)
                    times.append((time.perf_counter() - t0) * 1e3)
                engine["memory"] = trt_runner.memory_info()
                engine["versions"] = trt_runner.versions()
        except (SfedgeError, ValueError) as e:
            diagnosis.checks.append(Check("engine run", BROKEN, f"{engine_path.name}: {e}"))
            return
    reference, source = _reference(x, stored)
    parity: Parity = compare_outputs(reference, output)
    failures = TOLERANCE.failures(parity)
    engine["parity"] = {**parity.as_dict(), "reference": source, "tolerance": TOLERANCE.as_dict()}
    detail = f"max abs {parity.max_abs:.3g}, cosine {parity.cosine:.6f} against {source}"
    diagnosis.checks.append(Check("engine parity", BROKEN if failures else OK,
                                  detail + (f": {'; '.join(failures)}" if failures else ""),
                                  "attach this report to an issue: the engine disagrees with ONNX Runtime"
                                  if failures else None))
    latency = summarize(times)
    engine["latency_ms"] = latency.as_dict()
    diagnosis.checks.append(Check("engine latency", INFO, f"median {latency.median:.3f} ms, p90 {latency.p90:.3f} ms "
                                                          f"over {latency.n} runs (1x3x64x64, fp32)"))


def _cpu_arch(machine: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())


def _target_row(target: Target, report: DeviceReport, host: dict[str, Any]) -> dict[str, Any]:
    """Does this device match ``target``?  (matches: True/False, why: the reason or the caveats)."""
    row: dict[str, Any] = {"target": target.name, "backend": "+".join(target.backends)}
    if "tensorrt" in target.backends:
        want_trt, want_sm = target.tensorrt_version, target.device.get("sm")
        row["wants"] = f"TensorRT {want_trt}, sm_{want_sm}"
        gpu = report.gpu
        why = gpu.mismatch(str(want_trt), int(want_sm or 0)) if gpu is not None else "no CUDA GPU here"
        notes = []
        want_dla = target.device.get("dla_cores")
        if gpu is not None and gpu.dla_cores is not None and want_dla is not None and int(want_dla) != gpu.dla_cores:
            notes.append(f"{gpu.dla_cores} DLA cores here, the target has {want_dla}")
        row["matches"], row["why"] = why is None, why or "; ".join(notes) or "matches"
        return row
    arch = target.device.get("arch")
    row["wants"] = f"{arch or 'any CPU'}, {'/'.join(target.backends)}"
    runtimes = [b for b in target.backends
                if any(importlib.util.find_spec(m.split(".")[0]) for m in backend_info(b).modules)]
    if arch and _cpu_arch(str(arch)) != _cpu_arch(host["machine"]):
        row["matches"], row["why"] = False, f"this CPU is {host['machine']}, the target is {arch}"
    elif not runtimes:
        row["matches"], row["why"] = False, f"no runtime for {'/'.join(target.backends)} installed here"
    else:
        row["matches"], row["why"] = True, f"CPU arch matches; runtime(s) installed: {', '.join(runtimes)}"
    return row


def diagnose(runs: int = 50) -> Diagnosis:
    """Probe this machine, build and check the self-test engine where possible, match it against the targets.

    Why one function: `sfedge doctor`'s table and --json print the same
    Diagnosis, and tests drive it with the probe, builder and runner replaced.
    """
    diagnosis = Diagnosis()
    report = probe_device()
    diagnosis.device = {"host": _host(), **report.as_dict()}
    _device_checks(report, diagnosis)
    gpu = report.gpu
    usable = gpu is not None and gpu.tensorrt is not None and not gpu.tensorrt_error
    if usable and gpu is not None and diagnosis.device.get("polygraphy"):
        _engine_checks(gpu, runs, diagnosis)
    else:
        missing = [c.name for c in diagnosis.checks if c.status == MISSING and c.name in ("gpu", "tensorrt", "polygraphy")]
        diagnosis.checks.append(Check("engine build", MISSING, "nothing to build here: needs "
                                      + (" and ".join(missing) if missing else "a working TensorRT on a CUDA GPU")))
    try:
        targets = list_targets()
    except SfedgeError as e:
        diagnosis.checks.append(Check("targets", BROKEN, f"a target file does not load: {e.message}", e.hint))
        targets = []
    if not targets:
        looked = ", ".join(str(d) for d in target_dirs()) or f"{Path.cwd() / 'targets'} (missing)"
        diagnosis.checks.append(Check("targets", INFO, f"no target files found (looked in: {looked})",
                                      "set SFEDGE_TARGETS to a folder of target .toml files (the repository's "
                                      "targets/), or run from a checkout"))
    diagnosis.targets = [_target_row(t, report, diagnosis.device["host"]) for t in targets]
    return diagnosis


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], verb: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the report as JSON (for issue reports)")
    p.add_argument("--runs", type=int, default=50, help="timed runs of the test engine (default: 50)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.runs < 1:
        raise SfedgeError(f"--runs must be at least 1, got {args.runs}", "give a positive number of runs")
    diagnosis = diagnose(runs=args.runs)
    if args.json:
        print_json(diagnosis.as_dict())
        return diagnosis.exit_code
    # Cells are rich Text, never markup: details quote pip extras ("sfedge[tensorrt]") and device strings.
    style = {OK: "green", MISSING: "yellow", BROKEN: "bold red", INFO: ""}
    checks = Table(title=Text("sfedge doctor"), header_style="bold", title_justify="left")
    for column in ("check", "status", "found"):
        checks.add_column(column)
    for c in diagnosis.checks:
        found = Text(c.detail)
        if c.hint:
            found.append(f"\nfix: {c.hint}", style="dim")
        checks.add_row(Text(c.name), Text(c.status, style=style[c.status]), found)
    console.print(checks)
    if diagnosis.targets:
        matches = Table(title=Text("targets: does this device match?"), header_style="bold", title_justify="left")
        for column in ("target", "backend", "wants", "matches", "why"):
            matches.add_column(column)
        for t in diagnosis.targets:
            matches.add_row(*(Text(str(v)) for v in (t["target"], t["backend"], t["wants"],
                                                      "yes" if t["matches"] else "no", t["why"])))
        console.print(matches)
    summary = {"ok": Text("OK: the TensorRT path works on this device", style="green"),
               "nothing-to-check": Text("nothing to check here: no usable TensorRT on a CUDA GPU (see 'missing' above)"),
               "broken": Text("BROKEN: see the 'broken' lines above; `sfedge doctor --json` for an issue report",
                              style="bold red")}
    console.print(summary[diagnosis.status])
    sys.stdout.flush()
    return diagnosis.exit_code
