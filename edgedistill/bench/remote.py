"""Bench on a remote target (a Jetson on the desk) over the system ``ssh``: copy the bundle, run, fetch the report.

Everything goes through the user's own ``ssh`` with their keys and ~/.ssh/config; nothing here stores or asks for
a credential (BatchMode: a host that wants a password fails fast with a message, never hangs on a prompt).
Files travel as tar streams over ssh, so the target needs only ``sh``, ``tar``, ``mktemp`` and edgedistill.
The remote command line goes through the remote login shell: every argument is quoted with shlex.quote, and the
host is validated, so nothing the user typed becomes shell syntax or an ssh option.

The command lines are built by small pure functions (``ssh_command``, ``bench_command``...) tested on their own.
"""

from __future__ import annotations

import collections
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Sequence

from edgedistill.core.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

SSH_FAILED = 255  # ssh's own exit status when the connection (not the remote command) failed
_USER = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_ADDRESS = r"[A-Za-z0-9_:][A-Za-z0-9._:%-]*"  # a name, an ~/.ssh/config alias, IPv4, or IPv6 (with %scope)
_HOST = re.compile(rf"(?:{_USER}@)?{_ADDRESS}")
# what `mktemp -d` may answer: an absolute path ending in our template, nothing a shell would interpret
_WORKDIR = re.compile(r"/[A-Za-z0-9._/-]*edgedistill-bench\.[A-Za-z0-9]+")
_TEMPLATE = "edgedistill-bench.XXXXXXXX"


# ------------------------------------------------------------------------------------------ pure parts


def validate_host(host: str) -> str:
    """``host`` if it is ``user@address`` or ``address``; a UserError for anything a shell or ssh could misread.

    A leading '-' would be read by ssh as an option, spaces and shell characters could become commands.
    """
    if not isinstance(host, str) or not _HOST.fullmatch(host):
        raise UserError(f"--host {host!r} is not user@address or address (letters, digits and . - _ : only, "
                        f"no spaces or shell characters), e.g. --host nvidia@192.168.1.20")
    return host


def validate_port(port: int | None) -> int | None:
    if port is not None and not 1 <= int(port) <= 65535:
        raise UserError(f"--port {port} is not a TCP port (1-65535)")
    return None if port is None else int(port)


def ssh_command(host: str, port: int | None = None, options: Sequence[str] = (),
                connect_timeout: float = 10) -> list[str]:
    """``ssh`` argv up to and including the host; the caller appends one remote command string.

    BatchMode: never prompt for a password or a host key (fail instead of hanging). ServerAlive: a target that
    vanishes mid-bench (unplugged, rebooted) ends the session within a minute rather than at the time-out.
    """
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, math.ceil(connect_timeout))}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    port = validate_port(port)
    if port is not None:
        argv += ["-p", str(port)]
    return [*argv, *options, validate_host(host)]


def quote_remote_cmd(remote_cmd: str) -> str:
    """Quote the remote edgedistill for the remote shell, keeping a leading ``~/`` meaning the remote home."""
    if not remote_cmd or not remote_cmd.strip():
        raise UserError("--remote-cmd is empty: give the edgedistill command on the target, e.g. "
                        "~/venv/bin/edgedistill")
    if remote_cmd.startswith("~/"):
        return '"$HOME"/' + shlex.quote(remote_cmd[2:])
    return shlex.quote(remote_cmd)


def check_command(remote_cmd: str) -> str:
    """Remote shell line that succeeds only when ``remote_cmd`` exists and is executable."""
    return f"command -v {quote_remote_cmd(remote_cmd)} >/dev/null 2>&1"


def mktemp_command() -> str:
    return f'mktemp -d "${{TMPDIR:-/tmp}}/{_TEMPLATE}"'


def unpack_command(dest: str) -> str:
    """Remote shell line that unpacks a tar stream from stdin into ``dest``."""
    return f"mkdir -p {shlex.quote(dest)} && tar -C {shlex.quote(dest)} -xf -"


def pack_command(src: str) -> str:
    """Remote shell line that writes ``src`` as a tar stream to stdout."""
    return f"tar -C {shlex.quote(src)} -cf - ."


def bench_command(remote_cmd: str, workdir: str, bench_args: Sequence[str]) -> str:
    """Remote shell line for ``<remote_cmd> bench WORKDIR/bundle --out WORKDIR/report ARGS...``.

    It records its pid first: sshd starts each session command in a new session, so that pid is also the
    process group of the bench and of everything it starts, which a time-out can then stop as a whole.
    """
    args = " ".join(shlex.quote(str(a)) for a in bench_args)
    line = (f"echo $$ > {shlex.quote(workdir + '/pid')} && exec {quote_remote_cmd(remote_cmd)} bench "
            f"{shlex.quote(workdir + '/bundle')} --out {shlex.quote(workdir + '/report')}")
    return f"{line} {args}" if args else line


def cleanup_command(workdir: str, kill: bool = False) -> str:
    """Remote shell line that removes ``workdir`` (first stopping the bench's process group when ``kill``)."""
    q = shlex.quote(workdir)
    if not kill:
        return f"rm -rf {q}"
    pidfile = shlex.quote(workdir + "/pid")
    return (f'p=$(cat {pidfile} 2>/dev/null); if [ -n "$p" ]; then kill -s TERM -- -"$p" 2>/dev/null; '
            f'for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- -"$p" 2>/dev/null || break; sleep 0.2; done; '
            f'kill -s KILL -- -"$p" 2>/dev/null; fi; rm -rf {q}')


def check_workdir(text: str) -> str:
    """The directory ``mktemp -d`` printed, if it is one we may later ``rm -rf``; else a UserError."""
    workdir = text.strip()
    if not _WORKDIR.fullmatch(workdir) or "/../" in workdir:
        raise UserError(f"mktemp on the target answered {workdir[:100]!r}, not a temporary folder; "
                        f"set TMPDIR there to a plain path such as /tmp")
    return workdir


def last_line(text: str | bytes | None, default: str = "no message") -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    # ssh's notes about host keys are no reason for anything
    lines = [ln for ln in lines if not ln.startswith("Warning: Permanently added")] or lines
    return lines[-1] if lines else default


def summarise(lines: Sequence[str], n: int = 3, width: int = 300) -> str:
    """The last ``n`` non-empty lines joined into one line (UserError messages are one line)."""
    kept = [ln.strip() for ln in lines if ln.strip()][-n:]
    text = " | ".join(kept) or "no output"
    return text if len(text) <= width else "..." + text[-width:]


def remote_error(lines: Sequence[str]) -> str | None:
    """The message of the last ``error: ...`` line the remote CLI printed, if any."""
    for ln in reversed(lines):
        m = re.match(r"\s*error:\s*(.*\S)", ln)
        if m:
            return m.group(1)
    return None


# ------------------------------------------------------------------------------------------ running


class _Remote:
    """One target: runs shell lines there through ssh, turning ssh failures into one-line UserErrors."""

    def __init__(self, host: str, port: int | None, options: Sequence[str], connect_timeout: float,
                 console: Console | None) -> None:
        self.host = host
        self.port = port
        self.base = ssh_command(host, port, options, connect_timeout)
        self.connect_timeout = connect_timeout
        self.console = console

    @property
    def ssh_hint(self) -> str:
        return f"ssh -p {self.port} {self.host}" if self.port else f"ssh {self.host}"

    def argv(self, line: str) -> list[str]:
        return [*self.base, line]

    def emit(self, text: str) -> None:
        if self.console is None:
            print(text, file=sys.stderr, flush=True)
        else:  # remote output is text, not rich markup
            self.console.print(text, markup=False, highlight=False)

    def run(self, line: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        timeout = self.connect_timeout + 30 if timeout is None else timeout
        try:
            return subprocess.run(self.argv(line), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
        except FileNotFoundError:
            raise UserError("--host needs the OpenSSH client `ssh`, which is not installed here: install it "
                            "(apt-get install openssh-client) or run bench on the target itself") from None
        except subprocess.TimeoutExpired:
            raise UserError(f"cannot reach {self.host} over ssh: no answer within {timeout:g} s; check the address "
                            f"and that `{self.ssh_hint}` works without a password") from None

    def check_reachable(self) -> None:
        proc = self.run("true")
        if proc.returncode != 0:
            raise UserError(f"cannot reach {self.host} over ssh: {last_line(proc.stderr)}; check the address and "
                            f"that `{self.ssh_hint}` works without a password")

    def lost(self, what: str, stderr: str | bytes | None) -> UserError:
        return UserError(f"lost the ssh connection to {self.host} while {what}: {last_line(stderr)}")

    def check_command(self, remote_cmd: str) -> None:
        proc = self.run(check_command(remote_cmd))
        if proc.returncode == SSH_FAILED:
            raise self.lost("looking for edgedistill", proc.stderr)
        if proc.returncode != 0:
            hint = ("" if "/" in remote_cmd else " (a pip --user or venv install is often not on the PATH that "
                    "ssh gives commands)")
            raise UserError(f"edgedistill is not installed on {self.host}: `{remote_cmd}` is not found there"
                            f"{hint}; install it there (pip install edgedistill) or pass --remote-cmd PATH")

    def mktemp(self) -> str:
        proc = self.run(mktemp_command())
        if proc.returncode == SSH_FAILED:
            raise self.lost("making a temporary folder", proc.stderr)
        if proc.returncode != 0:
            raise UserError(f"cannot make a temporary folder on {self.host}: {last_line(proc.stderr)}; "
                            f"check that its /tmp (or $TMPDIR) is writable")
        return check_workdir(proc.stdout)

    def cleanup(self, workdir: str, kill: bool = False) -> None:
        try:
            proc = self.run(cleanup_command(workdir, kill))
            ok = proc.returncode == 0
        except UserError:
            ok = False
        if not ok:  # best effort: the bench result (or error) matters more than a leftover temp folder
            self.emit(f"warning: could not remove {workdir} on {self.host}; remove it by hand")


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


class _TimedOut(Exception):
    pass


def _kill(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _pipe(producer: list[str], consumer: list[str], deadline: _Deadline,
          cwd_note: str) -> tuple[int, str, int, str]:
    """Run ``producer | consumer``; (producer rc, its stderr, consumer rc, its stderr). _TimedOut on time-out."""
    with tempfile.TemporaryFile() as err1, tempfile.TemporaryFile() as err2:
        try:
            p1 = subprocess.Popen(producer, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err1)
        except FileNotFoundError:
            raise UserError(f"{cwd_note} needs `{producer[0]}`, which is not installed here") from None
        try:
            p2 = subprocess.Popen(consumer, stdin=p1.stdout, stdout=subprocess.DEVNULL, stderr=err2)
        except FileNotFoundError:
            _kill(p1)
            raise UserError(f"{cwd_note} needs `{consumer[0]}`, which is not installed here") from None
        finally:
            assert p1.stdout is not None
            p1.stdout.close()  # the consumer holds the only read end: the producer sees it close
        try:
            p2.wait(timeout=deadline.left())
            p1.wait(timeout=max(1.0, deadline.left()))
        except subprocess.TimeoutExpired:
            _kill(p1, p2)
            raise _TimedOut from None
        return p1.returncode, _read(err1), p2.returncode, _read(err2)


def _read(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode("utf-8", "replace")


def _stream(remote: _Remote, line: str, deadline: _Deadline) -> tuple[int, list[str]]:
    """Run the bench, echoing its output (stdout and stderr) as it comes; (exit status, last output lines)."""
    try:
        proc = subprocess.Popen(remote.argv(line), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    except FileNotFoundError:
        raise UserError("--host needs the OpenSSH client `ssh`, which is not installed here") from None
    tail: collections.deque[str] = collections.deque(maxlen=50)

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            tail.append(text)
            remote.emit(f"[{remote.host}] {text}")

    reader = threading.Thread(target=pump, name="remote-bench-output", daemon=True)
    reader.start()
    try:
        proc.wait(timeout=deadline.left())
    except subprocess.TimeoutExpired:
        _kill(proc)
        reader.join(timeout=2)
        raise _TimedOut from None
    except BaseException:  # Ctrl-C: do not leave the local ssh behind
        _kill(proc)
        raise
    reader.join(timeout=5)  # a ProxyCommand child may hold the pipe open: do not wait on it forever
    return proc.returncode, list(tail)


def _install(staging: Path, out_dir: Path) -> None:
    """Move a complete fetched report from ``staging`` into ``out_dir`` (each file by an atomic rename)."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
        return
    if not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder: pass a folder for the report")
    for entry in sorted(staging.iterdir()):
        target = out_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a folder of the previous report (os.replace cannot replace a full folder)
        os.replace(entry, target)


def run_remote_bench(host: str, bundle_dir: Path, bench_args: list[str], out_dir: Path, *,
                     remote_cmd: str = "edgedistill", port: int | None = None, ssh_options: Sequence[str] = (),
                     timeout_s: float = 1800, connect_timeout_s: float = 10,
                     console: Console | None = None) -> Path:
    """Run ``<remote_cmd> bench`` on ``host`` over ssh on a copy of ``bundle_dir``; the report lands in ``out_dir``.

    Steps: check the host answers and has edgedistill; copy the bundle to a fresh temporary folder there
    (symlinks followed); run the bench, streaming its output, within ``timeout_s`` seconds (for copy, run and
    fetch together); bring the report back complete or not at all; remove the remote folder. Every failure is
    a one-line UserError naming the host. Returns ``out_dir``.
    """
    remote = _Remote(host, port, ssh_options, connect_timeout_s, console)  # validates host and port
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    if not bundle_dir.is_dir():
        raise UserError(f"bench bundle {bundle_dir} is not a folder")
    if timeout_s <= 0:
        raise UserError(f"--timeout must be positive (got {timeout_s:g})")
    if out_dir.exists() and not out_dir.is_dir():  # found now, not after a half-hour bench
        raise UserError(f"--out {out_dir} is a file, not a folder: pass a folder for the report")
    remote.check_reachable()
    remote.check_command(remote_cmd)
    workdir = remote.mktemp()
    deadline = _Deadline(timeout_s)
    stage = ["copying the bundle"]  # what is under way, for the timeout's message
    running = False  # while the bench may still run there, cleaning up means stopping it first
    try:
        _copy_bundle(remote, bundle_dir, f"{workdir}/bundle", deadline)
        stage[0], running = "running the bench", True
        _run_bench(remote, bench_command(remote_cmd, workdir, bench_args), deadline)
        stage[0], running = "fetching the report", False
        _fetch_report(remote, f"{workdir}/report", out_dir, deadline)
    except _TimedOut:
        remote.cleanup(workdir, kill=True)
        raise UserError(f"bench on {host} timed out after {timeout_s:g} s (while {stage[0]}); pass a larger "
                        f"--timeout, or bench fewer batch sizes or iterations") from None
    except BaseException:
        remote.cleanup(workdir, kill=running)
        raise
    remote.cleanup(workdir)
    return out_dir


def _copy_bundle(remote: _Remote, bundle_dir: Path, bundle: str, deadline: _Deadline) -> None:
    remote.emit(f"copying {bundle_dir} to {remote.host}:{bundle}")
    tar_rc, tar_err, ssh_rc, ssh_err = _pipe(["tar", "-C", str(bundle_dir), "-chf", "-", "."],
                                             remote.argv(unpack_command(bundle)), deadline, "packing the bundle")
    if ssh_rc == SSH_FAILED:
        raise remote.lost("copying the bundle", ssh_err)
    if ssh_rc != 0:
        raise UserError(f"copying the bundle to {remote.host} failed: {last_line(ssh_err)}; check the free space "
                        f"in its temporary folder and that tar is installed there")
    if tar_rc != 0:
        raise UserError(f"packing {bundle_dir} for {remote.host} failed: {last_line(tar_err)}")


def _run_bench(remote: _Remote, command: str, deadline: _Deadline) -> None:
    rc, tail = _stream(remote, command, deadline)
    if rc == 2:
        message = remote_error(tail)
        raise UserError(f"{remote.host}: {message}" if message else
                        f"bench on {remote.host} failed (exit status 2): {summarise(tail)}")
    if rc == SSH_FAILED:
        raise remote.lost("the bench ran", "\n".join(tail))
    if rc != 0:
        raise UserError(f"bench on {remote.host} failed (exit status {rc}): {summarise(tail)}")


def _fetch_report(remote: _Remote, report: str, out_dir: Path, deadline: _Deadline) -> None:
    """The remote report folder into ``out_dir``, complete or not at all."""
    host = remote.host
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # staged beside out_dir (same filesystem, so the final moves are renames); removed in any case
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.fetch-", dir=out_dir.parent))
    try:
        fetched = staging / "report"  # made by mkdir, not mkdtemp: it may become out_dir, with umask modes
        fetched.mkdir()
        # the target's file owners and modes mean nothing here (and root would otherwise restore them)
        untar = ["tar", "--no-same-owner", "--no-same-permissions", "-C", str(fetched), "-xf", "-"]
        ssh_rc, ssh_err, tar_rc, tar_err = _pipe(remote.argv(pack_command(report)), untar, deadline,
                                                 "unpacking the report")
        if ssh_rc == SSH_FAILED:
            raise remote.lost("fetching the report", ssh_err)
        if ssh_rc != 0:
            raise UserError(f"bench on {host} finished but its report cannot be read ({report}): "
                            f"{last_line(ssh_err)}")
        if tar_rc != 0:
            raise UserError(f"unpacking the report from {host} into {out_dir.parent} failed: {last_line(tar_err)}")
        if not any(fetched.iterdir()):
            raise UserError(f"bench on {host} finished but wrote no report in {report}")
        _install(fetched, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
