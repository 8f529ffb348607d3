"""Sign and check bundle manifests with SSH signatures (``ssh-keygen -Y sign`` / ``-Y verify``), as git does.

Hashes alone prove consistency: the files are the ones the manifest lists.
Whoever can change a file can also change the manifest, so they do not prove
*who* built the bundle.  A signature does: the manifest hashes every file, and
the signature covers the manifest's exact bytes, so a valid signature by a key
in the user's ``allowed_signers`` file means every byte of the bundle is what
that key's owner built.

Why SSH signatures: the keys users already have for ``--remote`` (and for git
commit signing) work unchanged; the ``allowed_signers`` format (one line per
principal and public key, optional ``namespaces=`` / ``valid-before=``) is
OpenSSH's own, documented in ssh-keygen(1); and nothing here implements
cryptography: ``ssh-keygen`` (OpenSSH >= 8.2, on every current Linux and
macOS, JetPack 5 and later) does all of it.  Signatures use the namespace
:data:`NAMESPACE`, so a signature made for git or for files cannot be replayed
as a bundle signature.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sfedge.errors import SfedgeError
from sfedge.isolation import neutral_cwd

__all__ = [
    "NAMESPACE", "SignatureCheck", "SigningError", "sign_bytes", "check_signature", "ssh_keygen", "MAX_SIGNATURE_BYTES",
]

NAMESPACE = "sfedge-bundle"
MAX_SIGNATURE_BYTES = 64 << 10
_INSTALL = "install OpenSSH 8.2 or newer (apt install openssh-client)"


class SigningError(SfedgeError):
    """ssh-keygen is missing or cannot sign/verify (exit code 2: a setup problem, not a verify FAIL)."""


@dataclass
class SignatureCheck:
    """Outcome of checking one signature: ``valid`` with the signer's principal, else why not."""

    valid: bool
    principal: str | None = None
    reason: str = ""


def ssh_keygen() -> str:
    """The path of OpenSSH's ssh-keygen on PATH (SigningError when there is none)."""
    found = shutil.which("ssh-keygen")
    if found is None:
        raise SigningError("ssh-keygen is not installed here, so signatures cannot be made or checked", _INSTALL)
    return found


def _run(argv: list[str], data: bytes | None, what: str) -> subprocess.CompletedProcess[bytes]:
    try:
        if data is None:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, cwd=neutral_cwd(), timeout=120)
        else:
            p = subprocess.run(argv, input=data, capture_output=True, cwd=neutral_cwd(), timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SigningError(f"ssh-keygen could not {what}: {e}", _INSTALL) from e
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0 and any(s in err for s in ("unknown option", "illegal option", "Usage: ssh-keygen")):
        raise SigningError(f"this ssh-keygen cannot {what} (no -Y support)", _INSTALL)
    return p


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def sign_bytes(data: bytes, key: str | os.PathLike[str]) -> bytes:
    """An SSH signature (armored text) of ``data`` by ``key`` (a private key, or a public key held by ssh-agent)."""
    key = Path(key).expanduser().absolute()
    if not key.is_file():
        raise SigningError(f"signing key {key} does not exist", "give a private key file, e.g. --sign ~/.ssh/id_ed25519")
    p = _run([ssh_keygen(), "-q", "-Y", "sign", "-n", NAMESPACE, "-f", str(key)], data, "sign")
    if p.returncode != 0 or b"BEGIN SSH SIGNATURE" not in p.stdout:
        raise SigningError(f"ssh-keygen could not sign with {key}: {_last_line(p.stderr)}",
                           "check the key (a passphrase-protected key needs ssh-agent: ssh-add it and pass KEY.pub)")
    return p.stdout


def check_signature(data: bytes, signature: bytes, allowed_signers: str | os.PathLike[str]) -> SignatureCheck:
    """Check that ``signature`` is a valid :data:`NAMESPACE` signature of ``data`` by a key in ``allowed_signers``.

    Two ssh-keygen steps: ``-Y find-principals`` names the signer from the
    allowed_signers file (none: the key is not trusted), then ``-Y verify``
    checks the signature over ``data`` for that principal and namespace.
    """
    signers = Path(allowed_signers).expanduser().absolute()
    if not signers.is_file():
        raise SigningError(f"allowed signers file {signers} does not exist",
                           "one line per signer: `name@example ssh-ed25519 AAAA...` (see ssh-keygen(1), ALLOWED SIGNERS)")
    if len(signature) > MAX_SIGNATURE_BYTES or b"BEGIN SSH SIGNATURE" not in signature:
        return SignatureCheck(False, reason="the signature file is not an SSH signature")
    exe = ssh_keygen()
    fd, name = tempfile.mkstemp(suffix=".sig", prefix="sfedge-")  # ssh-keygen reads signatures from a file only
    sig = Path(name)
    with os.fdopen(fd, "wb") as f:
        f.write(signature)
    try:
        found = _run([exe, "-Y", "find-principals", "-s", str(sig), "-f", str(signers)], None, "find signers")
        principals = [ln.strip() for ln in found.stdout.decode(errors="replace").splitlines() if ln.strip()]
        if found.returncode != 0 or not principals:
            return SignatureCheck(False, reason=f"signed by a key that is not in {signers}")
        for principal in principals:
            p = _run([exe, "-Y", "verify", "-f", str(signers), "-I", principal, "-n", NAMESPACE, "-s", str(sig)], data,
                     "verify signatures")
            if p.returncode == 0:
                return SignatureCheck(True, principal=principal)
        return SignatureCheck(False, reason=f"bad signature: {_last_line(p.stderr)}")
    finally:
        sig.unlink(missing_ok=True)
