"""bench/remote.py: command construction, and real runs against a throwaway sshd on 127.0.0.1.

The sshd fixture needs Debian's openssh-server (.ci/run installs it when it can); without it those tests skip.
The "remote" is this machine, so a test can look at what the remote side left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from edgedistill.bench.remote import (
    bench_command, check_command, check_workdir, cleanup_command, quote_remote_cmd, remote_error,
    run_remote_bench, ssh_command, summarise, validate_host,
)
from tests.conftest import Sshd
from edgedistill.core.errors import UserError



# ------------------------------------------------------------------------------------------ pure parts


def test_ssh_command() -> None:
    assert ssh_command("nvidia@orin.local") == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=4", "nvidia@orin.local"]
    argv = ssh_command("10.0.0.5", 2222, ["-i", "/k", "-o", "X=1"], connect_timeout=2.5)
    assert argv[argv.index("-p") + 1] == "2222"
    assert "ConnectTimeout=3" in argv  # rounded up, never 0
    assert argv[-5:] == ["-i", "/k", "-o", "X=1", "10.0.0.5"]  # options before the host, host last
    assert "-p" not in ssh_command("h")
    with pytest.raises(UserError, match="port"):
        ssh_command("h", 70000)


@pytest.mark.parametrize("host", ["orin", "nvidia@orin.local", "nvidia@192.168.1.20", "jetson-01",
                                  "user_1@my.host-name", "fe80::1%eth0", "nvidia@::1", "my_alias"])
def test_valid_hosts(host: str) -> None:
    assert validate_host(host) == host


@pytest.mark.parametrize("host", ["", "-oProxyCommand=touch /tmp/x", "a b", "host;reboot", "user@host`id`",
                                  "$(id)@h", "h|cat", "h&", "user@", "@host", "h\nx", "'h'", "a@b@c", "h>x"])
def test_invalid_hosts(host: str) -> None:
    with pytest.raises(UserError) as e:
        validate_host(host)
    assert "user@address" in str(e.value) and "\n" not in str(e.value)


def test_bench_command_quotes_every_argument() -> None:
    line = bench_command("/opt/my tools/edgedistill", "/tmp/edgedistill-bench.abc",
                         ["--device", "jetson", "--note", "it's $HOME; rm -rf /"])
    assert line.startswith("echo $$ > /tmp/edgedistill-bench.abc/pid && exec ")
    # the remote shell splits it back into exactly these words
    words = shlex.split(line.split(" && exec ", 1)[1])
    assert words == ["/opt/my tools/edgedistill", "bench", "/tmp/edgedistill-bench.abc/bundle", "--out",
                     "/tmp/edgedistill-bench.abc/report", "--device", "jetson", "--note", "it's $HOME; rm -rf /"]


def test_remote_cmd_quoting() -> None:
    assert quote_remote_cmd("edgedistill") == "edgedistill"
    assert quote_remote_cmd("~/venv/bin/edgedistill") == '"$HOME"/venv/bin/edgedistill'  # the remote home
    assert quote_remote_cmd("x; reboot") == "'x; reboot'"
    assert check_command("~/a b") == "command -v \"$HOME\"/'a b' >/dev/null 2>&1"
    with pytest.raises(UserError):
        quote_remote_cmd(" ")


def test_workdir_and_cleanup_lines() -> None:
    assert check_workdir("/tmp/edgedistill-bench.Ab12Cd34\n") == "/tmp/edgedistill-bench.Ab12Cd34"
    for bad in ["", "/", "/tmp", "/home/me", "/tmp/x y/edgedistill-bench.a", "/tmp/../edgedistill-bench.a/../..",
                "mktemp: failed"]:
        with pytest.raises(UserError):
            check_workdir(bad)
    assert cleanup_command("/tmp/edgedistill-bench.a") == "rm -rf /tmp/edgedistill-bench.a"
    kill = cleanup_command("/tmp/edgedistill-bench.a", kill=True)
    assert "kill -s TERM -- -\"$p\"" in kill and kill.endswith("rm -rf /tmp/edgedistill-bench.a")


def test_output_summaries() -> None:
    lines = ["loading", "error: artifact fp16.onnx: sha256 mismatch", "", "done"]
    assert remote_error(lines) == "artifact fp16.onnx: sha256 mismatch"
    assert remote_error(["fine"]) is None
    assert summarise(["a", "b", "", "c", "d"]) == "b | c | d"
    assert summarise([]) == "no output"
    assert len(summarise(["x" * 1000])) <= 303


def test_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a folder"):
        run_remote_bench("localhost", tmp_path / "nope", [], tmp_path / "out")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "out.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):  # before any ssh
        run_remote_bench("localhost", tmp_path / "bundle", [], tmp_path / "out.txt")
    with pytest.raises(UserError, match="user@address"):
        run_remote_bench("host; reboot", tmp_path / "bundle", [], tmp_path / "out")


# ------------------------------------------------------------------------------------------ real ssh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="ssh client not installed: apt-get install openssh-client")
def test_unreachable_host(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    port = _free_port()  # closed again: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        run_remote_bench("127.0.0.1", tmp_path / "bundle", [], tmp_path / "out", port=port,
                         ssh_options=["-F", "/dev/null"], connect_timeout_s=5)
    msg = str(e.value)
    assert msg.startswith("cannot reach 127.0.0.1 over ssh: ")
    assert "refused" in msg and f"ssh -p {port} 127.0.0.1" in msg and "\n" not in msg
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "out").exists()


def _script(path: Path, body: str, interpreter: str = sys.executable) -> Path:
    path.write_text(f"#!{interpreter}\n{body}")
    path.chmod(0o755)
    return path


# A stand-in for `edgedistill bench BUNDLE --out REPORT ARGS...`: checks every bundle file against the sha256
# in export.json, then writes a report saying what it saw.
FAKE_BENCH = """\
import hashlib, json, os, pathlib, sys
args = sys.argv[1:]
assert args[0] == "bench" and args[2] == "--out", args
bundle, report, rest = pathlib.Path(args[1]), pathlib.Path(args[3]), args[4:]
doc = json.loads((bundle / "export.json").read_text())
for name, sha in doc["sha256"].items():
    path = bundle / name
    if path.is_symlink() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
        print(f"error: bundle file {name} is damaged", file=sys.stderr)
        sys.exit(2)
print("timing fp32.onnx on cpu: p50 1.0 ms", flush=True)
print("a note on stderr", file=sys.stderr, flush=True)
(report / "plots").mkdir(parents=True)
(report / "bench.json").write_text(json.dumps({"args": rest, "bundle": str(bundle),
                                               "files": sorted(doc["sha256"])}))
(report / "bench.md").write_text("| artifact | p50 ms |\\n| fp32.onnx | 1.0 |\\n")
(report / "plots" / "pareto.png").write_bytes(b"\\x89PNG fake")
"""


def _bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "student").mkdir(parents=True)
    (bundle / "val").mkdir()
    files = {
        "fp32.onnx": os.urandom(300_000),
        "student/open_clip_config.json": b'{"embed_dim": 512}',
        "val/a b (1).jpg": os.urandom(5000),
    }
    for name, data in files.items():
        (bundle / name).write_bytes(data)
    outside = tmp_path / "engine_elsewhere.bin"  # a symlinked artifact: its content must travel, not the link
    outside.write_bytes(os.urandom(2000))
    (bundle / "linked.engine").symlink_to(outside)
    files["linked.engine"] = outside.read_bytes()
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    (bundle / "export.json").write_text(json.dumps({"sha256": sha}))
    return bundle


@pytest.mark.slow
def test_remote_bench_round_trip(sshd: Sshd, tmp_path: Path) -> None:
    fake = _script(tmp_path / "fake-edgedistill", FAKE_BENCH)
    out = tmp_path / "results" / "bench"
    out.mkdir(parents=True)
    (out / "bench.json").write_text("stale")   # replaced
    (out / "keep.txt").write_text("mine")      # left alone
    (out / "plots").mkdir()
    (out / "plots" / "old.png").write_text("old")  # a folder of the old report is replaced whole
    shown: list[str] = []

    class Console:  # the part of rich's Console the bench uses
        def print(self, text: str, **kw: object) -> None:
            assert kw.get("markup") is False
            shown.append(text)

    args = ["--device", "cpu", "--batch", "1,8", "--note", "it's $HOME; echo pwned"]
    result = sshd.bench(_bundle(tmp_path), out, str(fake), args, console=Console())
    assert result == out
    report = json.loads((out / "bench.json").read_text())
    assert report["args"] == args  # every argument arrived as one word, nothing was run by the remote shell
    assert report["files"] == ["fp32.onnx", "linked.engine", "student/open_clip_config.json", "val/a b (1).jpg"]
    assert (out / "bench.md").read_text().splitlines()[1] == "| fp32.onnx | 1.0 |"
    assert (out / "plots" / "pareto.png").read_bytes() == b"\x89PNG fake"
    assert not (out / "plots" / "old.png").exists()
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench"]  # no staging folder left beside it
    # the remote temporary folder (on this same machine) is gone
    workdir = Path(report["bundle"]).parent
    assert workdir.name.startswith("edgedistill-bench.") and not workdir.exists()
    # the remote output (stdout and stderr) was streamed, marked with the host
    assert f"[{sshd.host}] timing fp32.onnx on cpu: p50 1.0 ms" in shown
    assert f"[{sshd.host}] a note on stderr" in shown


@pytest.mark.slow
def test_remote_bench_into_new_folder(sshd: Sshd, tmp_path: Path) -> None:
    fake = _script(tmp_path / "fake-edgedistill", FAKE_BENCH)
    out = tmp_path / "new" / "report"
    sshd.bench(_bundle(tmp_path), out, str(fake))
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "plots"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a normal folder, not mkdtemp's private 0700
    assert json.loads((out / "bench.json").read_text())["args"] == []


def test_remote_command_not_installed(sshd: Sshd, tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "edgedistill")
    with pytest.raises(UserError) as e:
        sshd.bench(_bundle(tmp_path), tmp_path / "out", missing)
    msg = str(e.value)
    assert msg.startswith(f"edgedistill is not installed on {sshd.host}")
    assert missing in msg and "pip install edgedistill" in msg and "--remote-cmd PATH" in msg
    assert not (tmp_path / "out").exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has stopped running


@pytest.mark.slow
def test_remote_bench_times_out(sshd: Sshd, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    # a bench that hangs, with a child: both must be stopped on the target, not only the local ssh
    slow = _script(tmp_path / "slow-edgedistill",
                   f'echo "$2" > {marks}/bundle\necho $$ > {marks}/pid\nsleep 60 &\necho $! > {marks}/child\n'
                   f'wait\n', interpreter="/bin/sh")
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        sshd.bench(_bundle(tmp_path), tmp_path / "out", str(slow), timeout_s=3)
    elapsed = time.monotonic() - t0
    assert str(e.value).startswith(f"bench on {sshd.host} timed out after 3 s")
    assert elapsed < 15
    assert not (tmp_path / "out").exists()
    pids = [int((marks / name).read_text()) for name in ("pid", "child")]
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
    assert not Path((marks / "bundle").read_text().strip()).parent.exists()


@pytest.mark.slow
def test_remote_bench_user_error(sshd: Sshd, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    failing = _script(tmp_path / "failing-edgedistill",
                      f'echo "$2" > {marks}/bundle\necho "loading the export"\n'
                      f'echo "error: something bad; fix it like so" >&2\nexit 2\n', interpreter="/bin/sh")
    with pytest.raises(UserError) as e:
        sshd.bench(_bundle(tmp_path), tmp_path / "out", str(failing))
    assert str(e.value) == f"{sshd.host}: something bad; fix it like so"
    assert not (tmp_path / "out").exists()
    assert not Path((marks / "bundle").read_text().strip()).parent.exists()


@pytest.mark.slow
def test_remote_bench_crash(sshd: Sshd, tmp_path: Path) -> None:
    crashing = _script(tmp_path / "crashing-edgedistill",
                       'echo "Traceback (most recent call last):"\necho "RuntimeError: CUDA out of memory" >&2\n'
                       'exit 1\n', interpreter="/bin/sh")
    with pytest.raises(UserError) as e:
        sshd.bench(_bundle(tmp_path), tmp_path / "out", str(crashing))
    msg = str(e.value)
    assert msg.startswith(f"bench on {sshd.host} failed (exit status 1)")
    assert "RuntimeError: CUDA out of memory" in msg and "\n" not in msg


@pytest.mark.slow
def test_remote_bench_without_report(sshd: Sshd, tmp_path: Path) -> None:
    lazy = _script(tmp_path / "lazy-edgedistill", "echo done\n", interpreter="/bin/sh")
    with pytest.raises(UserError, match="report"):
        sshd.bench(_bundle(tmp_path), tmp_path / "out", str(lazy))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
