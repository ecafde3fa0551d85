"""The OS seam of the supervisor: start a child in its own process group, signal it, reap it.

Everything that forks, kills or waits goes through `Spawner`, so the supervisor's logic can
be tested with a fake one. On Linux each child asks the kernel to SIGKILL it when the
supervisor dies (PR_SET_PDEATHSIG), so no child outlives a supervisor killed with -9.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    """A running (or finished) child process."""

    name: str
    process: subprocess.Popen[bytes]
    output: int | None = None
    """The read end of the pipe its stdout and stderr go to (`capture_output`), or None when
    they are the supervisor's own; whoever takes it closes it (`AppOutput` at the end)."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """Exit status if it ended (negative: killed by that signal), else None."""
        return self.process.poll()


class Spawner:
    """Starts and stops children; the only code that touches processes."""

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        pass_fds: Sequence[int] = (),
        cwd: str | None = None,
        capture_output: bool = False,
    ) -> Child:
        """Start `argv`; with `capture_output` its stdout and stderr both go into one pipe,
        whose read end is `Child.output` (else they are the supervisor's)."""
        read_end, write_end = os.pipe() if capture_output else (None, None)
        try:
            process = subprocess.Popen(
                list(argv),
                env=dict(env),
                pass_fds=tuple(pass_fds),
                cwd=cwd,
                stdout=write_end,
                stderr=subprocess.STDOUT if capture_output else None,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, no locks or imports
            )
        except BaseException:
            if read_end is not None:
                os.close(read_end)
            raise
        finally:
            if write_end is not None:
                os.close(write_end)  # the child holds it now: the pipe ends when the child does
        return Child(name, process, read_end)

    def signal_group(self, child: Child, signum: int) -> None:
        """Send `signum` to the child's whole process group (its own children included)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    def is_stopped(self, child: Child) -> bool:
        """Whether the child is stopped (SIGSTOP, a debugger): it cannot handle SIGTERM."""
        try:
            status = psutil.Process(child.pid).status()
        except psutil.Error:
            return False
        return status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)

    def wait(self, child: Child, timeout: float) -> int | None:
        try:
            return child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, child: Child, grace: float) -> int | None:
        """SIGTERM the group, SIGKILL it after `grace` seconds; returns the exit status."""
        if child.poll() is None:
            self.signal_group(child, signal.SIGTERM)
            self.signal_group(child, signal.SIGCONT)  # a stopped child handles it only so
            status = self.wait(child, grace)
            if status is not None:
                self.signal_group(child, signal.SIGKILL)  # stragglers of the group
                return status
        self.signal_group(child, signal.SIGKILL)
        return self.wait(child, grace)
