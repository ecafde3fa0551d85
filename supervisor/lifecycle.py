"""The life cycle of one supervised process, as an explicit state machine.

States and inputs are closed sets; `TRANSITIONS` is the whole table, and anything not in
it is ignored (a late exit report for a process already replaced, say). Time is a
parameter (`now`: monotonic seconds, so a wall-clock jump moves no timer), so the machine
is driven without processes or sleeps; the supervisor turns the returned `Action`s into
spawns and signals.

    STOPPED  --start-->  STARTING  --spawned + settle time-->  RUNNING
    STARTING/RUNNING --exited--> BACKOFF (policy says restart, budget left)
                                 | EXITED (policy says no) | FATAL (budget spent)
    BACKOFF  --due-->  STARTING
    RUNNING  --unresponsive / over limit-->  STOPPING (then restart per policy)
    any      --stop-->  STOPPING  --exited-->  STOPPED
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class State(Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


class Input(Enum):
    START = "start"  # operator or platform start
    SPAWNED = "spawned"  # the OS started the process
    SPAWN_FAILED = "spawn-failed"
    SETTLED = "settled"  # alive for the settle time: it counts as running
    EXITED = "exited"  # the process ended (status given)
    DUE = "due"  # backoff delay over
    STOP = "stop"  # operator or platform stop
    KILL = "kill"  # unresponsive or over a limit: stop it, then apply the policy


class Action(Enum):
    SPAWN = "spawn"
    TERMINATE = "terminate"  # SIGTERM the group, SIGKILL after the grace period
    ANNOUNCE_FATAL = "announce-fatal"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When and how fast to restart (manifest `restart`, platform defaults)."""

    mode: str = "on-failure"  # always | on-failure | never
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    budget: int = 5  # restarts ...
    budget_window_s: float = 60.0  # ... within this many seconds, then FATAL
    settle_s: float = 1.0


@dataclass
class Lifecycle:
    """One app's state, restart history and pending timer."""

    policy: RestartPolicy
    state: State = State.STOPPED
    restarts: deque[float] = field(default_factory=deque)
    """Monotonic times of the restarts inside the budget window."""
    restart_count: int = 0
    due_at: float = 0.0
    started_at: float = 0.0
    """Monotonic time of the last spawn (0: not spawned yet)."""
    last_status: int | None = None
    last_reason: str = ""
    """Why the last attempt ended (its own reason: a kill's, a stop's, or its status)."""
    killing: bool = False  # a KILL is in progress: its exit is a failure, not a stop
    ending: str = ""
    """Why the current attempt is being ended (a kill or stop reason); cleared per attempt."""

    def handle(
        self, event: Input, now: float, status: int | None = None, reason: str = ""
    ) -> list[Action]:
        """Apply one input; returns what the supervisor must do."""
        handler = TRANSITIONS.get((self.state, event))
        if handler is None:
            return []
        return handler(self, now, status, reason)

    def next_timer(self) -> float | None:
        """When `DUE` (BACKOFF) or `SETTLED` (STARTING) should be fed, if at all."""
        if self.state is State.BACKOFF:
            return self.due_at
        if self.state is State.STARTING and self.started_at:
            return self.started_at + self.policy.settle_s
        return None

    # -- transitions ------------------------------------------------------------------------

    def _start(self, now: float, status: int | None, reason: str) -> list[Action]:
        # STOPPED/EXITED/FATAL/BACKOFF -> STARTING
        self.state = State.STARTING
        self.started_at = 0.0
        self.killing = False
        self.ending = ""
        if reason == "operator":
            self.restarts.clear()
        return [Action.SPAWN]

    def _spawned(self, now: float, status: int | None, reason: str) -> list[Action]:
        # STARTING -> STARTING (waiting to settle)
        self.started_at = now
        return []

    def _settled(self, now: float, status: int | None, reason: str) -> list[Action]:
        # STARTING -> RUNNING
        if self.started_at and now >= self.started_at + self.policy.settle_s:
            self.state = State.RUNNING
        return []

    def _exited(self, now: float, status: int | None, reason: str) -> list[Action]:
        # STARTING/RUNNING -> BACKOFF | EXITED | FATAL
        self.last_status = status
        self.last_reason = reason or describe_status(status)
        failed = self.killing or status != 0
        self.killing = False
        self.ending = ""
        if self.policy.mode == "never" or (self.policy.mode == "on-failure" and not failed):
            self.state = State.EXITED
            return []
        return self._schedule_restart(now)

    def _spawn_failed(self, now: float, status: int | None, reason: str) -> list[Action]:
        # STARTING -> BACKOFF | FATAL
        self.last_reason = reason or "could not be started"
        return self._schedule_restart(now)

    def _schedule_restart(self, now: float) -> list[Action]:
        window = self.policy.budget_window_s
        while self.restarts and self.restarts[0] < now - window:
            self.restarts.popleft()
        if len(self.restarts) >= self.policy.budget:
            self.state = State.FATAL
            return [Action.ANNOUNCE_FATAL]
        delay = min(
            self.policy.backoff_base_s * (2 ** len(self.restarts)), self.policy.backoff_cap_s
        )
        self.restarts.append(now)
        self.restart_count += 1
        self.state = State.BACKOFF
        self.due_at = now + delay
        return []

    def _due(self, now: float, status: int | None, reason: str) -> list[Action]:
        # BACKOFF -> STARTING
        if now < self.due_at:
            return []
        return self._start(now, None, "restart")

    def _stop(self, now: float, status: int | None, reason: str) -> list[Action]:
        # STARTING/RUNNING -> STOPPING ; BACKOFF -> STOPPED
        if self.state is State.BACKOFF:
            self.state = State.STOPPED
            return []
        self.state = State.STOPPING
        self.killing = False
        self.ending = reason or "stop requested"
        return [Action.TERMINATE]

    def _kill(self, now: float, status: int | None, reason: str) -> list[Action]:
        # RUNNING/STARTING -> STOPPING, exit then counts as a failure
        self.state = State.STOPPING
        self.killing = True
        self.ending = reason or "killed"
        return [Action.TERMINATE]

    def _stopped(self, now: float, status: int | None, reason: str) -> list[Action]:
        # STOPPING -> STOPPED, or, after a KILL, the restart policy
        self.last_status = status
        ending, self.ending = self.ending, ""
        if self.killing:
            self.state = State.RUNNING  # let _exited judge it as the failure it is
            return self._exited(now, status, ending)
        exit_status = describe_status(status)
        self.last_reason = f"{ending} ({exit_status})" if ending else exit_status
        self.state = State.STOPPED
        return []


Handler = Callable[[Lifecycle, float, "int | None", str], list[Action]]

TRANSITIONS: dict[tuple[State, Input], Handler] = {
    (State.STOPPED, Input.START): Lifecycle._start,
    (State.EXITED, Input.START): Lifecycle._start,
    (State.FATAL, Input.START): Lifecycle._start,
    (State.BACKOFF, Input.START): Lifecycle._start,
    (State.STARTING, Input.SPAWNED): Lifecycle._spawned,
    (State.STARTING, Input.SPAWN_FAILED): Lifecycle._spawn_failed,
    (State.STARTING, Input.SETTLED): Lifecycle._settled,
    (State.STARTING, Input.EXITED): Lifecycle._exited,
    (State.RUNNING, Input.EXITED): Lifecycle._exited,
    (State.BACKOFF, Input.DUE): Lifecycle._due,
    (State.STARTING, Input.STOP): Lifecycle._stop,
    (State.RUNNING, Input.STOP): Lifecycle._stop,
    (State.BACKOFF, Input.STOP): Lifecycle._stop,
    (State.STARTING, Input.KILL): Lifecycle._kill,
    (State.RUNNING, Input.KILL): Lifecycle._kill,
    (State.STOPPING, Input.EXITED): Lifecycle._stopped,
}


def describe_status(status: int | None) -> str:
    """'exit 3', 'killed by SIGKILL', ... from a Popen return code."""
    if status is None:
        return "unknown"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit {status}"
