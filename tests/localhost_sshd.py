"""A real SSH server on localhost for the remote-profiling tests (asyncssh; no sshd needed).

It serves exec requests (each command runs in ``/bin/sh -c`` with the given
home folder as working directory and $HOME) and SFTP/SCP rooted at the same
home, with a generated host key and one authorized client key.  The system
``ssh``/``scp`` clients talk to it like to any device.

    python tests/localhost_sshd.py --home DIR --client-pub KEY.pub --host-key KEY --port-file PORT

writes the port it listens on to PORT once it accepts connections, and
serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import asyncssh


async def _pump(src: asyncio.StreamReader, dst: object) -> None:
    while True:
        chunk = await src.read(65536)
        if not chunk:
            return
        dst.write(chunk)


async def _feed_stdin(process: asyncssh.SSHServerProcess, proc: asyncio.subprocess.Process) -> None:
    try:
        while True:
            chunk = await process.stdin.read(65536)
            if not chunk:
                break
            proc.stdin.write(chunk)
            await proc.stdin.drain()
    except (asyncssh.Error, ConnectionError, BrokenPipeError):
        pass
    finally:
        if not proc.stdin.is_closing():
            proc.stdin.close()


class SFTPServerWithExitStatus(asyncssh.SFTPServer):
    """asyncssh's SFTP server closes the channel without an exit status, which makes OpenSSH's scp (SFTP mode)
    exit 1 after a complete transfer; OpenSSH's own sftp-server reports 0, as sent here."""

    def exit(self) -> None:
        try:
            self.channel.exit(0)
        except (OSError, asyncssh.Error):
            pass


def make_handler(home: str, env: dict[str, str]):
    async def handle(process: asyncssh.SSHServerProcess) -> None:
        if not process.command:
            process.stderr.write(b"this test server runs commands only (no shell)\n")
            process.exit(1)
            return
        proc = await asyncio.create_subprocess_shell(
            process.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=home, env=env,
        )
        feeder = asyncio.ensure_future(_feed_stdin(process, proc))
        await asyncio.gather(_pump(proc.stdout, process.stdout), _pump(proc.stderr, process.stderr))
        code = await proc.wait()
        feeder.cancel()
        process.exit(code)

    return handle


async def serve(args: argparse.Namespace) -> None:
    env = dict(os.environ, HOME=args.home)
    server = await asyncssh.create_server(
        asyncssh.SSHServer, "127.0.0.1", 0,
        server_host_keys=[args.host_key], authorized_client_keys=args.client_pub,
        process_factory=make_handler(args.home, env), encoding=None,
        sftp_factory=SFTPServerWithExitStatus, allow_scp=True,
    )
    port = server.sockets[0].getsockname()[1]
    tmp = args.port_file + ".part"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, args.port_file)
    await asyncio.Event().wait()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True)
    p.add_argument("--client-pub", required=True)
    p.add_argument("--host-key", required=True)
    p.add_argument("--port-file", required=True)
    args = p.parse_args()
    for key in ("home", "client_pub", "host_key", "port_file"):
        setattr(args, key, os.path.abspath(getattr(args, key)))
    os.chdir(args.home)  # SFTP resolves relative paths against the server's working directory
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
