"""The supervisor's life-cycle state machine, without processes or clocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.lifecycle import TRANSITIONS, Action, Input, Lifecycle, RestartPolicy, State

POLICY = RestartPolicy(
    mode="on-failure",
    backoff_base_s=1.0,
    backoff_cap_s=8.0,
    budget=3,
    budget_window_s=60.0,
    settle_s=1.0,
)


def in_state(state: State, policy: RestartPolicy = POLICY) -> Lifecycle:
    life = Lifecycle(policy)
    life.state = state
    if state is State.STARTING:
        life.started_at = 100.0
    if state is State.BACKOFF:
        life.due_at = 101.0
    return life


@settings(max_examples=400)
@given(
    state=st.sampled_from(list(State)),
    event=st.sampled_from(list(Input)),
    now=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    status=st.none() | st.integers(-15, 3),
    mode=st.sampled_from(["always", "on-failure", "never"]),
)
def test_every_state_and_input(
    state: State, event: Input, now: float, status: int | None, mode: str
) -> None:
    life = in_state(state, RestartPolicy(mode=mode, budget=3))
    actions = life.handle(event, now, status)
    assert isinstance(life.state, State)
    assert set(actions) <= set(Action)
    if (state, event) not in TRANSITIONS:
        assert life.state is state and actions == []  # unknown pairs change nothing
    if Action.SPAWN in actions:
        assert life.state is State.STARTING
    if Action.TERMINATE in actions:
        assert life.state is State.STOPPING
    if Action.ANNOUNCE_FATAL in actions:
        assert life.state is State.FATAL
    if life.state is State.BACKOFF:
        assert life.due_at > now or life.due_at == 101.0


def state_of(life: Lifecycle) -> State:
    """The current state (read through a call, so type narrowing does not stick)."""
    return life.state


def crash(life: Lifecycle, now: float) -> list[Action]:
    return life.handle(Input.EXITED, now, status=1)


def test_crash_loop_backs_off_exponentially_then_goes_fatal() -> None:
    life = Lifecycle(POLICY)
    now = 0.0
    assert life.handle(Input.START, now) == [Action.SPAWN]
    delays = []
    for _ in range(3):
        life.handle(Input.SPAWNED, now)
        assert crash(life, now) == []
        assert life.state is State.BACKOFF
        delays.append(life.due_at - now)
        assert life.handle(Input.DUE, life.due_at - 0.001) == []  # not yet
        now = life.due_at
        assert life.handle(Input.DUE, now) == [Action.SPAWN]
    assert delays == [1.0, 2.0, 4.0]
    life.handle(Input.SPAWNED, now)
    assert crash(life, now) == [Action.ANNOUNCE_FATAL]
    assert life.state is State.FATAL and life.restart_count == 3
    assert life.handle(Input.START, now, reason="operator") == [Action.SPAWN]  # manual restart


def test_budget_window_forgets_old_restarts() -> None:
    life = Lifecycle(POLICY)
    life.handle(Input.START, 0.0)
    now = 0.0
    for _ in range(10):  # one crash every 30 s: never 3 within 60 s... until they pile up
        life.handle(Input.SPAWNED, now)
        crash(life, now)
        assert life.state is State.BACKOFF
        now += 61.0
        life.handle(Input.DUE, now)


def test_clean_exit_under_on_failure_is_final_but_always_restarts() -> None:
    life = Lifecycle(POLICY)
    life.handle(Input.START, 0.0)
    life.handle(Input.EXITED, 1.0, status=0)
    assert life.state is State.EXITED
    always = Lifecycle(RestartPolicy(mode="always"))
    always.handle(Input.START, 0.0)
    always.handle(Input.EXITED, 1.0, status=0)
    assert always.state is State.BACKOFF


def test_settles_into_running_after_the_settle_time() -> None:
    life = Lifecycle(POLICY)
    life.handle(Input.START, 0.0)
    life.handle(Input.SPAWNED, 10.0)
    assert life.next_timer() == 11.0
    life.handle(Input.SETTLED, 10.5)
    assert life.state is State.STARTING
    life.handle(Input.SETTLED, 11.0)
    assert state_of(life) is State.RUNNING


def test_kill_for_a_limit_counts_as_a_failure_and_restarts() -> None:
    life = in_state(State.RUNNING)
    assert life.handle(Input.KILL, 5.0, reason="rss 300 MiB over limit 100 MiB") == [
        Action.TERMINATE
    ]
    assert life.state is State.STOPPING
    life.handle(Input.EXITED, 6.0, status=-15)
    assert state_of(life) is State.BACKOFF
    assert "limit" in life.last_reason


def test_operator_stop_is_not_a_failure() -> None:
    life = in_state(State.RUNNING, RestartPolicy(mode="always"))
    assert life.handle(Input.STOP, 1.0) == [Action.TERMINATE]
    life.handle(Input.EXITED, 2.0, status=-15)
    assert life.state is State.STOPPED
    backoff = in_state(State.BACKOFF)
    assert backoff.handle(Input.STOP, 1.0) == []
    assert backoff.state is State.STOPPED
