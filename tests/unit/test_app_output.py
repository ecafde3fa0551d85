"""The output pump on real pipes (no processes): lines to the file and the terminal, the end
of a pipe drained, a slow terminal that never blocks a writer, stop with pipes still open,
and many pipes on one thread."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.app_output import AppOutput
from tests.conftest import wait_for

MOMENT = 1_790_000_000.5
STAMP = "2026-09-21T14:13:20.500Z"


class Terminal(io.StringIO):
    """A terminal that can be made to hang (a paused tty, a full pipe nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.flowing = threading.Event()
        self.flowing.set()
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        self.flowing.wait(30)
        with self.lock:
            return super().write(text)

    def text(self) -> str:
        with self.lock:
            return self.getvalue()


@pytest.fixture
def terminal() -> Terminal:
    return Terminal()


@pytest.fixture
def output(tmp_path: Path, terminal: Terminal) -> Iterator[AppOutput]:
    pump = AppOutput(tmp_path / "logs", echo=terminal, wall_clock=lambda: MOMENT)
    yield pump
    terminal.flowing.set()
    pump.stop(timeout=0.5)


def _pipe(output: AppOutput, app: str) -> int:
    """A pipe pumped as `app`'s output; returns its write end (the app's side)."""
    read_end, write_end = os.pipe()
    output.attach(app, read_end)
    return write_end


def test_lines_go_stamped_to_the_file_and_named_to_the_terminal(
    output: AppOutput, terminal: Terminal, tmp_path: Path
) -> None:
    app = _pipe(output, "blotter")
    os.write(app, b'hello\nTraceback (most recent call last):\n  File "x"\nValueError: b')
    os.write(app, b"oom")  # the last line has no newline: the pipe's end flushes it
    os.close(app)
    assert output.drain("blotter", 10.0)
    assert (tmp_path / "logs" / "blotter.log").read_text() == (
        f"{STAMP} hello\n{STAMP} Traceback (most recent call last):\n"
        f'{STAMP}   File "x"\n{STAMP} ValueError: boom\n'
    )
    assert terminal.text() == (
        'blotter | hello\nblotter | Traceback (most recent call last):\nblotter |   File "x"\n'
        "blotter | ValueError: boom\n"
    )


def test_drain_waits_no_longer_than_told_for_a_pipe_still_held(output: AppOutput) -> None:
    app = _pipe(output, "forker")  # a grandchild keeps the pipe open
    os.write(app, b"still here\n")
    assert output.drain("forker", 0.1) is False
    os.close(app)
    assert output.drain("forker", 10.0) is True
    assert output.drain("never-launched", 0.0) is True


def test_a_hung_terminal_never_blocks_the_app_and_the_file_gets_everything(
    tmp_path: Path, terminal: Terminal
) -> None:
    pump = AppOutput(tmp_path / "logs", echo=terminal, echo_max_lines=50)
    terminal.flowing.clear()
    app = _pipe(pump, "chatty")
    lines = 20_000  # ~1 MiB: far more than a pipe holds
    done = threading.Event()

    def write_all() -> None:
        for start in range(0, lines, 500):
            os.write(app, b"".join(b"line %06d\n" % i for i in range(start, start + 500)))
        os.close(app)
        done.set()

    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    assert done.wait(30), "the app was blocked by its output"
    log = tmp_path / "logs" / "chatty.log"
    wait_for(lambda: log.exists() and log.read_bytes().count(b"\n") == lines, 30)
    assert log.read_text().splitlines()[-1].endswith("line 019999")
    terminal.flowing.set()
    assert pump.drain("chatty", 10.0)
    shown = terminal.text()
    assert "lines not shown here, the terminal was too slow" in shown
    assert str(log) in shown
    assert shown.count("\n") < lines
    pump.stop(timeout=0.5)


def test_stop_reads_what_is_left_also_from_a_pipe_still_open(
    tmp_path: Path, terminal: Terminal
) -> None:
    pump = AppOutput(tmp_path / "logs", echo=terminal)
    app = _pipe(pump, "survivor")
    os.write(app, b"left over\nunfinished")
    pump.stop(timeout=0.2)
    lines = (tmp_path / "logs" / "survivor.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["left over", "unfinished"]
    assert "survivor | unfinished" in terminal.text()
    with pytest.raises(BrokenPipeError):  # the pump closed its end
        os.write(app, b"more\n")
    os.close(app)
    late_read, late_write = os.pipe()
    pump.attach("late", late_read)  # after stop: closed at once, nothing leaks
    with pytest.raises(BrokenPipeError):
        os.write(late_write, b"x\n")
    os.close(late_write)


def test_many_apps_share_one_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    pump = AppOutput(tmp_path / "logs", echo=None)
    ends = {f"a{i}": _pipe(pump, f"a{i}") for i in range(300)}
    assert threading.active_count() <= before + 1  # no echo thread without a terminal
    for app, end in ends.items():
        os.write(end, f"I am {app}\n".encode())
        os.close(end)
    for app in ends:
        assert pump.drain(app, 10.0)
    pump.stop()
    assert (tmp_path / "logs" / "a299.log").read_text().endswith(" I am a299\n")
    assert pump.logs.open_files == 0
    assert threading.active_count() <= before


def test_a_log_file_that_cannot_be_written_stops_neither_pump_nor_terminal(
    output: AppOutput, terminal: Terminal
) -> None:
    def refuse(app: str, lines: object) -> None:
        raise OSError(28, "No space left on device")

    output.logs.write = refuse  # type: ignore[method-assign]
    app = _pipe(output, "full")
    os.write(app, b"one\ntwo\n")
    os.close(app)
    assert output.drain("full", 10.0)
    assert terminal.text() == "full | one\nfull | two\n"
