"""Pumps every app's stdout and stderr into its log file and onto the supervisor's terminal.

Each launched app writes both streams into one pipe (`Spawner.spawn(capture_output=True)`).
One thread, `plexus-app-output`, waits on every pipe at once with `selectors` (one thread
for 500 apps, not 500 threads), reads what is there without blocking, cuts it into lines
(`log_lines`), appends them to `HOME/logs/APP.log` (`log_files`, rotated by size) and hands
them to a second thread, `plexus-app-echo`, which prints them on the terminal as
`APP | line`.

The two threads keep the promise that an app is never blocked by its output: the pipe is
read as fast as the file takes it, whatever the terminal does. The echo queue is bounded
(lines and characters); when a slow terminal lets it fill, lines are left out of the terminal
only, never the file, and the terminal is told how many (`OVERFLOW_NOTE`).

An app's last output (its traceback) is not lost: at the end of its pipe the unfinished
line is flushed, and `drain(app)` lets the supervisor wait until that pipe has ended and
its lines are in the file and on the terminal, so the crash is announced after the
traceback that explains it. `stop()` reads what is left in every pipe, then closes them.

Attaching goes through a queue and a wake-up pipe, so only the pump thread touches its
selector (one owner, as for the sockets elsewhere).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from broker.logs import event
from supervisor.log_files import DEFAULT_FILES, DEFAULT_MAX_BYTES, LogDirectory, stamp
from supervisor.log_lines import MAX_LINE_BYTES, LineSplitter

log = logging.getLogger("plexus.supervisor.output")

READ_BYTES = 64 * 1024
"""At most this much is read from one pipe per turn, so one chatty app cannot starve the
others."""
_FINAL_READS = 64
"""At stop, at most this many reads more per pipe (something may still be writing)."""
ECHO_MAX_LINES = 10_000
ECHO_MAX_CHARS = 4 * 1024 * 1024
OVERFLOW_NOTE = "[{count} lines not shown here, the terminal was too slow; all are in {path}]"
SEPARATOR = " | "


@dataclass(eq=False)
class _Stream:
    """One pipe of one app launch."""

    app: str
    fd: int
    splitter: LineSplitter
    written: threading.Event = field(default_factory=threading.Event)
    """The pipe ended and all its lines are in the file."""
    echoed: threading.Event = field(default_factory=threading.Event)
    """... and on the terminal too (or left out of it)."""


class _Echo:
    """The terminal side: a bounded queue of lines and the thread that prints them."""

    def __init__(
        self, out: TextIO, paths: Callable[[str], Path], max_lines: int, max_chars: int
    ) -> None:
        self._out = out
        self._paths = paths
        self._max_lines = max_lines
        self._max_chars = max_chars
        self._items: deque[tuple[str, str] | _Stream] = deque()
        self._lines = 0
        self._chars = 0
        self._dropped: dict[str, int] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._broken = False
        self._thread = threading.Thread(target=self._run, name="plexus-app-echo", daemon=True)
        self._thread.start()

    def put(self, app: str, lines: list[str]) -> None:
        with self._cond:
            for line in lines:
                size = len(line) + len(app) + 4
                if self._lines >= self._max_lines or self._chars + size > self._max_chars:
                    self._dropped[app] = self._dropped.get(app, 0) + 1
                    continue
                self._items.append((app, line))
                self._lines += 1
                self._chars += size
            self._cond.notify()

    def mark(self, stream: _Stream) -> None:
        """`stream` ended: set its `echoed` once the lines before it are printed (markers
        are never dropped; there is one per launch)."""
        with self._cond:
            self._items.append(stream)
            self._cond.notify()

    def close(self, timeout: float) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._dropped and not self._closing:
                    self._cond.wait()
                if not self._items and not self._dropped:
                    return
                items, self._items = self._items, deque()
                dropped, self._dropped = self._dropped, {}
                self._lines = self._chars = 0
            self._print(items, dropped)

    def _print(self, items: deque[tuple[str, str] | _Stream], dropped: dict[str, int]) -> None:
        text: list[str] = []
        ended: list[_Stream] = []
        for item in items:
            if isinstance(item, _Stream):
                ended.append(item)
            else:
                text.append(f"{item[0]}{SEPARATOR}{item[1]}\n")
        for app, count in dropped.items():
            note = OVERFLOW_NOTE.format(count=count, path=self._paths(app))
            text.append(f"{app}{SEPARATOR}{note}\n")
        if text and not self._broken:
            try:
                self._out.write("".join(text))
                self._out.flush()
            except (OSError, ValueError):  # the terminal went away: the files still get all
                self._broken = True
        for stream in ended:
            stream.echoed.set()


class AppOutput:
    """The apps' output pump (see the module docstring); threads start on the first
    `attach`, so building one opens nothing."""

    def __init__(
        self,
        log_dir: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        files: int = DEFAULT_FILES,
        echo: TextIO | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_line_bytes: int = MAX_LINE_BYTES,
        echo_max_lines: int = ECHO_MAX_LINES,
        echo_max_chars: int = ECHO_MAX_CHARS,
    ) -> None:
        self.logs = LogDirectory(log_dir, max_bytes, files)
        self._echo_out = echo
        self._echo_limits = (echo_max_lines, echo_max_chars)
        self._wall_clock = wall_clock
        self._max_line_bytes = max_line_bytes
        self._attached: queue.SimpleQueue[_Stream] = queue.SimpleQueue()
        self._current: dict[str, _Stream] = {}
        """The stream of each app's latest launch (what `drain` waits for)."""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stop_timeout = 0.0
        self._thread: threading.Thread | None = None
        self._echo: _Echo | None = None
        self._wake_r = self._wake_w = -1
        self._failing: set[str] = set()

    # -- the supervisor's side ------------------------------------------------------------------

    def attach(self, app: str, fd: int) -> None:
        """Pump pipe `fd` (the read end of `app`'s stdout and stderr) from now on; the pump
        owns `fd` and closes it when the pipe ends."""
        os.set_blocking(fd, False)
        stream = _Stream(app, fd, LineSplitter(self._max_line_bytes))
        with self._lock:
            if self._stopping.is_set():  # too late: nobody would read it
                os.close(fd)
                return
            self._start()
            self._current[app] = stream
        self._attached.put(stream)
        self._wake()

    def drain(self, app: str, timeout: float) -> bool:
        """Wait until the pipe of `app`'s latest launch has ended and its lines are written
        and echoed; False when `timeout` ran out first (a grandchild may hold the pipe)."""
        with self._lock:
            stream = self._current.get(app)
        if stream is None:
            return True
        deadline = time.monotonic() + timeout
        if not stream.written.wait(timeout):
            return False
        return stream.echoed.wait(max(0.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 2.0) -> None:
        """Read what is left in every pipe (for up to `timeout` seconds: the apps are gone,
        so their pipes end at once unless something of theirs survived), then close all."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop_timeout = timeout
            self._stopping.set()
        if thread is None:
            return
        self._wake()
        thread.join(timeout + 5.0)
        if self._echo is not None:
            self._echo.close(timeout + 5.0)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def path(self, app: str) -> Path:
        return self.logs.path(app)

    # -- the pump thread ----------------------------------------------------------------------

    def _start(self) -> None:
        """Under `_lock`: the wake-up pipe and both threads, once."""
        if self._thread is not None or self._stopping.is_set():
            return
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if self._echo_out is not None:
            self._echo = _Echo(self._echo_out, self.logs.path, *self._echo_limits)
        self._thread = threading.Thread(target=self._run, name="plexus-app-output", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: it is awake already
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        streams: dict[int, _Stream] = {}
        deadline: float | None = None
        try:
            while True:
                if self._stopping.is_set():
                    deadline = deadline or time.monotonic() + self._stop_timeout
                    if not streams or time.monotonic() >= deadline:
                        break
                for key, _ in selector.select(None if deadline is None else 0.05):
                    if key.data is None:
                        self._take_attached(selector, streams)
                        continue
                    try:
                        self._read(selector, streams, key.data)
                    except Exception as exc:  # a bug here must not leave every pipe unread
                        event(
                            log,
                            "app-output-error",
                            logging.ERROR,
                            app=key.data.app,
                            error=repr(exc),
                        )
            self._take_attached(selector, streams)
            for stream in list(streams.values()):  # what is left (bounded), then the end
                for _ in range(_FINAL_READS):
                    if not self._read(selector, streams, stream):
                        break
                if stream.fd in streams:
                    self._end(selector, streams, stream)
        finally:
            selector.close()
            self.logs.close()

    def _take_attached(self, selector: selectors.BaseSelector, streams: dict[int, _Stream]) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._wake_r, 4096)
        while True:
            try:
                stream = self._attached.get_nowait()
            except queue.Empty:
                return
            selector.register(stream.fd, selectors.EVENT_READ, stream)
            streams[stream.fd] = stream

    def _read(
        self, selector: selectors.BaseSelector, streams: dict[int, _Stream], stream: _Stream
    ) -> bool:
        """One read of `stream`'s pipe; True when it gave data (there may be more)."""
        try:
            data = os.read(stream.fd, READ_BYTES)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._end(selector, streams, stream)
            return False
        self._emit(stream.app, stream.splitter.feed(data))
        return True

    def _end(
        self, selector: selectors.BaseSelector, streams: dict[int, _Stream], stream: _Stream
    ) -> None:
        """The pipe ended: its unfinished line, then close it and tell who waits."""
        try:
            self._emit(stream.app, stream.splitter.close())
        finally:
            selector.unregister(stream.fd)
            del streams[stream.fd]
            os.close(stream.fd)
            stream.written.set()
            if self._echo is not None:
                self._echo.mark(stream)
            else:
                stream.echoed.set()

    def _emit(self, app: str, lines: list[str]) -> None:
        if not lines:
            return
        prefix = stamp(self._wall_clock()) + " "
        try:
            self.logs.write(app, [f"{prefix}{line}\n".encode() for line in lines])
        except OSError as exc:  # a full disk must not stop the pump: the terminal still shows
            if app not in self._failing:
                self._failing.add(app)
                event(log, "app-log-failed", logging.ERROR, app=app, error=str(exc))
        else:
            self._failing.discard(app)
        if self._echo is not None:
            self._echo.put(app, lines)
