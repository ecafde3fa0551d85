"""Small OS helpers for the harness: ports, broker processes, CPU accounting.

Broker binaries are started under coreutils `timeout`, so a broker is bounded in
time even if the harness is killed, and the `timeout` process gets SIGTERM when
the harness dies (it forwards it to the broker). CPU time is read from
/proc/<pid>/task/*/schedstat (nanoseconds, all threads) because the tick-based
utime/stime are 10 ms coarse, too coarse for a 1,000 msg/s window.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from broker.config import CONFIG_FD_VARIABLE
from perf.control import die_with_parent
from security.grant_channel import GRANTS_FD_VARIABLE
from security.handoff import (
    CREDENTIAL_FD_VARIABLE,
    SERVER_KEY_FD_VARIABLE,
    TOKEN_VARIABLE,
    handoff_pipe,
)
from supervisor.identity import CredentialGate, Identities


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_tcp(port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    """Return once 127.0.0.1:port accepts connections; raise if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _term_when_orphaned() -> None:
    die_with_parent(signal.SIGTERM)


def spawn_bounded(
    argv: list[str],
    max_seconds: float,
    log: Path,
    config_document: bytes | None = None,
    *,
    identities: Identities | None = None,
    service: str = "broker",
    identity: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv under `timeout`, output to `log`, in its own session (no Ctrl-C).

    `config_document` (a Plexus platform config) reaches the child on PLEXUS_CONFIG_FD,
    the way the supervisor hands it to the broker and the persistence service. With
    `identities` this process is the child's supervisor (perf.credentials): the child gets
    the server key and grant channel of `service` ("broker" or "persistence"), and with
    `identity` (e.g. `$persistence`) a credential of its own, granted to the new process
    before it can read it (PLEXUS_CREDENTIAL_FD).
    """
    fds: list[int] = []
    env = dict(os.environ)
    if config_document is not None:
        fds.append(handoff_pipe(config_document))
        env[CONFIG_FD_VARIABLE] = str(fds[-1])
    channel = identities.service_channel(service) if identities is not None else None
    if channel is not None:
        env[SERVER_KEY_FD_VARIABLE] = str(channel.key_fd)
        env[GRANTS_FD_VARIABLE] = str(channel.channel_fd)
    gate = CredentialGate.new() if channel is not None and identity is not None else None
    if gate is not None:
        env.pop(TOKEN_VARIABLE, None)  # it would win over the descriptor
        env[CREDENTIAL_FD_VARIABLE] = str(gate.read_end)
    passed = [*fds, *(channel.fds() if channel else ()), *([gate.read_end] if gate else ())]
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["timeout", "--kill-after=5", f"{max_seconds:.0f}", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=tuple(passed),
                start_new_session=True,
                preexec_fn=_term_when_orphaned,  # noqa: PLW1509 - only a prctl syscall
            )
    except BaseException:
        if channel is not None:
            channel.child_spawned()  # nobody got them: close our copies all the same
            channel.ours.close()
        if gate is not None:
            gate.abandon()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    if identities is not None and channel is not None:
        identities.service_started(service, channel, proc.pid, gate, identity)
    return proc


def child_pids(pid: int) -> list[int]:
    """Direct children of pid (e.g. the broker under `timeout`)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 3.0) -> None:
    """SIGTERM, wait, SIGKILL; never raises."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)


def cpu_ns(pids: list[int]) -> int:
    """CPU time consumed so far by all threads of `pids` (0 for vanished ones)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.scandir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int(Path(task.path, "schedstat").read_text().split()[0])
    return total


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """CPU time so far of each thread of `pid`, summed by thread name (/proc comm), so a
    profile can set the interpreter's threads ("python") apart from libzmq's ("ZMQbg/...")."""
    totals: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                name = Path(task.path, "comm").read_text().strip()
                ns = int(Path(task.path, "schedstat").read_text().split()[0])
                totals[name] = totals.get(name, 0) + ns
    return totals


def module_of(pid: int) -> str | None:
    """What `pid` runs: MODULE for `python -m MODULE`, else its program's base name;
    None when it is gone. Lets a handle tell a platform's broker from its supervisor."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return None
    program = Path(words[0]).name
    if program.startswith("python") and "-m" in words[:-1]:
        return words[words.index("-m") + 1]
    return program


def process_jiffies(pids: list[int]) -> int:
    """utime + stime of whole processes (all threads), in clock ticks.

    One small read per process, so cheap enough for hundreds of workers at a
    window edge; tick-coarse, but the truncation errors of many processes
    average out over a window of a second or more.
    """
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def host_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user/nice
    return total - idle, total


def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one (500 apps need many fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def find_binary(name: str) -> str | None:
    """`name` on PATH, else in /usr/sbin (Debian puts broker daemons there, off a user's PATH)."""
    found = shutil.which(name)
    if found is None and Path(f"/usr/sbin/{name}").exists():
        found = f"/usr/sbin/{name}"
    return found


def peer_unavailable(binary: str, module: str, package: str) -> str | None:
    """Why a peer system cannot run (its daemon or its Python client is missing), or None."""
    if find_binary(binary) is None:
        return f"{binary} binary not found (perf/setup.sh installs it)"
    if importlib.util.find_spec(module) is None:
        return f"python package {package} not installed (perf/setup.sh installs it)"
    return None
