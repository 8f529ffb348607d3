"""The parent's side of a profiling worker: start ``python -m sfedge.profile.worker``, send requests, freeze it between them.

Numpy-free; psutil suspends idle workers (see :class:`WorkerProcess`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

import sfedge
from sfedge import errors
from sfedge.errors import SfedgeError
from sfedge.isolation import neutral_cwd, python_argv
from sfedge.profile.types import Subject

__all__ = ["WorkerProcess"]


class WorkerProcess:
    """A ``python -m sfedge.profile.worker`` subprocess and its request/reply channel.

    Between requests the process is suspended (SIGSTOP, or the platform's
    equivalent through psutil) unless ``freeze=False``, so only the worker
    being timed can use the CPU.  The worker starts isolated
    (:mod:`sfedge.isolation`: ``-P`` and an empty working folder), so a module
    planted in the bundle or the folder ``sfedge profile`` runs from is never
    imported; paths in requests are absolute for that reason.
    """

    def __init__(self, subject: Subject, python: str = sys.executable, env: dict[str, str] | None = None,
                 freeze: bool = True) -> None:
        self.subject = subject
        package_root = Path(sfedge.__file__).resolve().parent.parent
        environment = dict(os.environ if env is None else env)
        if package_root.name not in ("site-packages", "dist-packages"):  # a source checkout: let the worker find it
            environment["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(package_root), environment.get("PYTHONPATH")) if p)
        environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            python_argv("-m", "sfedge.profile.worker", python=python), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, bufsize=1, env=environment, cwd=neutral_cwd(),
        )
        self._ps = psutil.Process(self.proc.pid)
        self.freeze = freeze
        self._frozen = False

    def request(self, cmd: str, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its reply (SfedgeError naming the configuration on failure).

        The worker is frozen again as soon as it has answered: an idle runtime
        must not compete with the one being timed (ONNX Runtime's thread pool
        keeps spinning after a run; on 2 cores three idle workers' spinning
        made the measured one 40% slower).
        """
        self._resume()
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **params}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait(timeout=10)
            raise SfedgeError(
                f"the profiling worker for {self.subject.label} exited (code {self.proc.returncode}) during '{cmd}': "
                f"{self.stderr_tail() or 'no output'}",
                "run with --verbose; a crash while loading usually means the runtime does not support this artifact",
            )
        reply = json.loads(line)
        if self.freeze:
            self._suspend()
        if not reply.pop("ok", False):
            raise _worker_error(reply, self.subject.label, cmd)
        return reply

    def _suspend(self) -> None:
        try:
            self._ps.suspend()
            self._frozen = True
        except Exception:  # psutil.Error (gone, no permission): timing continues unfrozen, as before
            self.freeze = False

    def _resume(self) -> None:
        if self._frozen:
            try:
                self._ps.resume()
            except Exception:  # the process is gone: the request below reports it
                pass
            self._frozen = False

    def stderr_tail(self, lines: int = 1) -> str:
        self._stderr.seek(0)
        text = [ln.strip() for ln in self._stderr.read().splitlines() if ln.strip()]
        return " | ".join(text[-lines:])

    def close(self) -> None:
        """Ask the worker to exit; kill it if it does not."""
        self._resume()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()
        self._stderr.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_error(reply: dict[str, Any], label: str, cmd: str) -> SfedgeError:
    """Re-raise a worker's exception as the same sfedge error class, naming the configuration."""
    cls = getattr(errors, str(reply.get("type")), None)
    message = f"{label}: {reply.get('error')}"
    if isinstance(cls, type) and issubclass(cls, SfedgeError) and cls is not errors.UnknownNameError:
        return cls(message)
    return SfedgeError(f"{label}: '{cmd}' failed: {reply.get('type')}: {reply.get('error')}",
                       "run with --verbose for the worker's traceback")
