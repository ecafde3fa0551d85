"""Persistence benchmark: what storing every message costs, each figure beside a baseline.

    python -m perf.bench_persistence [--quick] [--json-only] [--sections writer,confirm,...]

Four sections (perf/README.md, "Persistence benchmark", says how to read them):

writer   StoreWriter.commit throughput, 1,000 events of 256 B per group commit (LMDB,
         synced), beside bare py-lmdb writing the same encoded records the same way.
confirm  broker + persistence service: publish -> CONFIRM lag at a fixed offered rate
         (1,000 and 10,000 msg/s), then confirmed throughput (cf on every message,
         pipelined, 1 and 64 messages per PUB), beside the same broker with persistence off.
store    a big store (10 M messages on 1,000 topics; --quick 1 M) written by StoreWriter:
         build time, disk per message, 30 days at 1 M/h; then the platform started on it:
         Bus.replay rate and Bus.history latency beside in-process reads of the same store.
routing  perf.bench_routing's plexus workload (perf.harness.run_one) against a broker with
         persistence on (and the service beside it) and one with it off, interleaved.

stdout: one JSON document (also written to --json), then a short table unless --json-only.
Progress goes to stderr. Every temporary home (the big store is several GB) is deleted at
the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from unittest import mock

import msgpack
import zmq

from broker import event_records as R
from broker import protocol as P
from broker.codec import encode_pub_header, new_message_id
from broker.config import PlatformConfig
from broker.paths import PlatformPaths
from perf import procutil
from perf.cli import int_list, name_list
from perf.control import die_with_parent
from perf.credentials import app_token
from perf.model import NS_PER_S, PhasePlan, Schedule, WorkerSpec, build_schedule, summarize_ns
from perf.systems import BrokerConfig, BrokerHandle, WorkerControl
from perf.systems import plexus as plexus_adapter
from perf.workload import Pacer, sleep_until
from supervisor.identity import Identities

if TYPE_CHECKING:
    from perf.harness import RunResult
    from perf.summary import Cell

SCHEMA = "plexus-perf/persistence/1"
DEFAULT_JSON = Path("perf/results/persistence.json")
SECTIONS = ("writer", "confirm", "store", "routing")
PAYLOAD = 256
COMMIT_BATCH = 1000
TOPICS = 1000
PUB_APP, READ_APP = "bench-pub", "bench-read"
MANIFESTS = {
    PUB_APP: '[permissions]\npublish = ["bench.>"]\n',
    READ_APP: '[permissions]\nsubscribe = ["bench.>"]\n',
}
PER_HOUR = 1_000_000
RETENTION_MESSAGES = 30 * 24 * PER_HOUR  # 30 days at 1 M messages an hour
SPACING_NS = 3600 * NS_PER_S // PER_HOUR  # 3.6 ms between stored messages: 1 M an hour
BYTES_PER_MESSAGE_GUESS = 700  # disk check before building the big store (measured ~500)
READY_TIMEOUT_S = 120.0  # platform start on a 10 M store included
ABORTED = -1
_SNDMORE, _NOBLOCK = 2, 1
_POLLIN, _POLLOUT = 1, 2


def _progress(text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {text}", file=sys.stderr, flush=True)


# -- small statistics -------------------------------------------------------------------------


def figure(values: Sequence[float | None], digits: int = 3) -> dict[str, Any]:
    """{"median", "values"} of the runs that produced a value (None when none did)."""
    kept = [float(v) for v in values if v is not None]
    median = statistics.median(kept) if kept else None
    return {
        "median": round(median, digits) if median is not None else None,
        "values": [round(v, digits) for v in kept],
    }


def lag_summary(samples: Sequence[int]) -> dict[str, float | int | None]:
    """Nearest-rank p50/p99/p999 and the max of nanosecond samples, in ms."""
    s = summarize_ns(list(samples))
    if s is None:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    return {
        "count": s.count,
        "p50_ms": s.p50_us / 1000,
        "p99_ms": s.p99_us / 1000,
        "p999_ms": s.p999_us / 1000,
        "max_ms": max(samples) / 1e6,
    }


class CpuMeter:
    """CPU of named process groups and of the whole machine between two snapshots.

    "other" is everything the machine did besides the groups: another job on this 2-core
    box shows up there, and a figure measured beside a busy "other" is suspect.
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._t = 0
        self._cpu: dict[str, int] = {}
        self._host = (0, 0)
        self._written = 0
        self.written = 0  # device bytes written between start() and stop(), machine-wide

    def start(self) -> None:
        self._t = time.monotonic_ns()
        self._cpu = {name: procutil.cpu_ns(pids) for name, pids in self.groups.items()}
        self._host = procutil.host_jiffies()
        self._written = device_written()

    def stop(self) -> dict[str, float]:
        span = max(1e-9, (time.monotonic_ns() - self._t) / NS_PER_S)
        cores = {
            name: (procutil.cpu_ns(pids) - self._cpu[name]) / NS_PER_S / span
            for name, pids in self.groups.items()
        }
        self.written = device_written() - self._written
        busy, _total = procutil.host_jiffies()
        host = (busy - self._host[0]) / procutil.TICKS_PER_S / span
        cores["other"] = max(0.0, host - sum(cores.values()))
        return {name: round(value, 3) for name, value in cores.items()}


# -- platform processes -----------------------------------------------------------------------


def write_manifests(apps: Path) -> None:
    apps.mkdir(parents=True, exist_ok=True)
    for app_id, body in MANIFESTS.items():
        (apps / f"{app_id}.toml").write_text(f'id = "{app_id}"\n{body}', encoding="utf-8")


def start_persistence_service(
    paths: PlatformPaths, apps: Path, max_seconds: float, log: Path, identities: Identities
) -> subprocess.Popen[bytes]:
    """`python -m persistence` on `paths`, bounded in time like every perf broker.

    As the supervisor starts it (`identities` are the platform's, the broker's too): the
    store's key and a grant channel, and its `$persistence` credential, granted to the new
    process, on an inherited pipe (never on the command line).
    """
    argv = [sys.executable, "-m", "persistence", "--home", str(paths.home), "--apps", str(apps)]
    return procutil.spawn_bounded(
        argv,
        max_seconds,
        log,
        PlatformConfig().to_document(),
        identities=identities,
        service="persistence",
        identity=P.PERSISTENCE_ID,
    )


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _log_events(path: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of event `name` in a platform log."""
    found: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
    return found


def raw_dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, app_id: str, token: str, timeout_s: float
) -> zmq.Socket[bytes]:
    """An authenticated (credential `token`), welcomed DEALER (perf.systems.plexus's HELLO)."""
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.rcvhwm = 0  # a CONFIRM the broker cannot hand over is lost: never refuse one
    sock.sndhwm = 100_000
    plexus_adapter._hello(sock, app_id, token, endpoint, timeout_s)
    return sock


class Platform:
    """A broker (persistence on or off) and, with persistence on, the service, on one home.

    The broker runs with a peer timeout longer than its life: the raw benchmark DEALERs
    send no heartbeats. This process is their supervisor (perf.credentials): `credential`
    grants one good here and in the worker processes it starts.
    """

    def __init__(self, root: Path, persistence: bool, max_seconds: float) -> None:
        self.root = root
        self.persistence = persistence
        self.max_seconds = max_seconds
        self.apps = root / "apps"
        self.paths = PlatformPaths.resolve(root / "home")
        self.broker: subprocess.Popen[bytes] | None = None
        self.service: subprocess.Popen[bytes] | None = None
        self.identities = Identities()
        self.ready_s = 0.0

    @property
    def endpoint(self) -> str:
        return self.paths.bus_endpoint()

    def start(self) -> float:
        """Start both processes; seconds until an app's HELLO is welcomed (recovery done)."""
        write_manifests(self.apps)
        self.paths.prepare()
        started = time.monotonic()
        argv = [sys.executable, "-m", "broker", "--home", str(self.paths.home)]
        argv += ["--apps", str(self.apps)]
        config = PlatformConfig(
            persistence=self.persistence,
            peer_timeout_ms=plexus_adapter.peer_timeout_ms(self.max_seconds),
        )
        self.broker = procutil.spawn_bounded(
            argv,
            self.max_seconds,
            self.root / "broker.log",
            config.to_document(),
            identities=self.identities,
        )
        if self.persistence:
            self.service = start_persistence_service(
                self.paths,
                self.apps,
                self.max_seconds,
                self.root / "persistence.log",
                self.identities,
            )
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            plexus_adapter.procutil_wait_for_socket(
                Path(self.endpoint.removeprefix("ipc://")), READY_TIMEOUT_S
            )
            operator = self.credential(P.CLI_ID)
            raw_dealer(ctx, self.endpoint, P.CLI_ID, operator, READY_TIMEOUT_S).close(0)
        except Exception as exc:
            raise RuntimeError(f"platform did not start: {exc}; {self.logs()}") from None
        finally:
            ctx.term()
        self.ready_s = time.monotonic() - started
        return self.ready_s

    def logs(self) -> str:
        return (
            f"broker log: {_log_tail(self.root / 'broker.log')}; "
            f"persistence log: {_log_tail(self.root / 'persistence.log')}"
        )

    def credential(self, app_id: str) -> str:
        """A new credential for `app_id`, good in this process and its children."""
        return app_token(self.identities, app_id)

    def broker_pids(self) -> list[int]:
        return procutil.child_pids(self.broker.pid) if self.broker else []

    def service_pids(self) -> list[int]:
        return procutil.child_pids(self.service.pid) if self.service else []

    def stop(self) -> dict[str, Any]:
        """Stop the broker, then the service (it commits what it still holds)."""
        if self.broker is not None:
            procutil.stop_process(self.broker, 5.0)
        if self.service is not None:
            procutil.stop_process(self.service, 15.0)
        self.identities.close()
        stopped = _log_events(self.root / "persistence.log", "persistence-stopped")
        return {"commits": stopped[-1].get("commits")} if stopped else {}


def _temp_root(prefix: str) -> Path:
    """A short directory under /tmp (ipc socket paths must stay under ~100 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# -- events for the store ---------------------------------------------------------------------


class EventMaker:
    """Published events (stream v2) as the broker writes them: real headers and ids, 256 B
    payloads, random topics out of 1,000, contiguous seqs, timestamps 3.6 ms apart (1 M
    messages an hour)."""

    def __init__(self, first_ts_ns: int, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.topics = [f"bench.t{k:04d}.data" for k in range(TOPICS)]
        self.payload = bytes(range(256)) * (PAYLOAD // 256)
        self.next_seq = 1
        self.first_ts_ns = first_ts_ns

    def ts_of(self, seq: int) -> int:
        return self.first_ts_ns + (seq - 1) * SPACING_NS

    def batch(self, n: int) -> list[R.Event]:
        out: list[R.Event] = []
        pick = self.rng.randrange
        topics, payload = self.topics, self.payload
        for seq in range(self.next_seq, self.next_seq + n):
            msg_id = new_message_id()
            topic = topics[pick(TOPICS)]
            header = encode_pub_header(msg_id, topic)
            record = R.Published(
                PUB_APP, "bench", topic, msg_id, "", "", False, header, payload, []
            )
            out.append(R.Event(seq, self.ts_of(seq), record))
        self.next_seq += n
        return out


def _segment_defaults() -> tuple[int, int]:
    """(segment max bytes, period ns): what `python -m persistence` uses by default."""
    from persistence.__main__ import persistence_config

    segments = persistence_config(PlatformConfig(), PlatformPaths.resolve("/"), None).segments
    return segments.max_bytes, segments.period_ns


def open_writer(store_dir: Path, clock: Callable[[], int] = time.time_ns) -> Any:
    """A StoreWriter on `store_dir` laid out as the service lays it out."""
    from broker.paths import SEGMENTS_DIR, STATE_FILE
    from persistence.state import StateStore
    from persistence.store import MessageStore, SegmentPolicy
    from persistence.writer import StoreWriter

    max_bytes, period_ns = _segment_defaults()
    messages = MessageStore(
        store_dir / SEGMENTS_DIR,
        readonly=False,
        policy=SegmentPolicy(max_bytes, period_ns),
        clock=clock,
    )
    state = StateStore(store_dir / STATE_FILE, readonly=False)
    return StoreWriter(messages, state, sealer=None)


def close_writer(writer: Any) -> None:
    writer.messages.close()
    writer.state.close()


def disk_usage(path: Path) -> tuple[int, int]:
    """(allocated bytes as `du` counts them, apparent bytes) of every file under `path`."""
    out = subprocess.run(
        ["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True
    )
    allocated = int(out.stdout.split()[0])
    apparent = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return allocated, apparent


# -- section 1: StoreWriter throughput --------------------------------------------------------


def _writer_run(events: list[R.Event], root: Path) -> tuple[float, list[float]]:
    """(msg/s, commit seconds per batch) of StoreWriter.commit on a fresh store."""
    writer = open_writer(root / "store")
    batches = [events[k : k + COMMIT_BATCH] for k in range(0, len(events), COMMIT_BATCH)]
    commits: list[float] = []
    try:
        started = time.perf_counter()
        for batch in batches:
            t = time.perf_counter()
            writer.commit(batch)
            commits.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
    finally:
        close_writer(writer)
    return len(events) / elapsed, commits


def _lmdb_run(records: list[tuple[bytes, bytes]], root: Path) -> float:
    """msg/s of bare py-lmdb: the same records, 1,000 per synced transaction, append mode,
    one environment opened as persistence.segments opens a segment (no topic index, no
    state environment, nothing encoded inside the timed loop)."""
    import lmdb

    env = lmdb.open(
        str(root / "bare.mdb"),
        subdir=False,
        map_size=4 * 2**30,
        max_dbs=4,
        sync=True,
        metasync=True,
        readahead=False,
    )
    db = env.open_db(b"msgs")
    try:
        started = time.perf_counter()
        for k in range(0, len(records), COMMIT_BATCH):
            with env.begin(write=True) as txn:
                cursor = txn.cursor(db)
                for key, value in records[k : k + COMMIT_BATCH]:
                    cursor.put(key, value, append=True)
        elapsed = time.perf_counter() - started
    finally:
        env.close()
    return len(records) / elapsed


def section_writer(n: int, repeat: int) -> dict[str, Any]:
    from persistence.segments import encode_record, seq_key

    maker = EventMaker(time.time_ns() - n * SPACING_NS)
    events = maker.batch(n)
    records = [
        (
            seq_key(e.seq),
            encode_record(e.ts_ns, [m.sender, m.topic, m.msg_id, m.header, m.payload, False]),
        )
        for e in events
        if isinstance(m := e.record, R.Published)
    ]
    writer_rates: list[float] = []
    lmdb_rates: list[float] = []
    commit_ms: list[float] = []
    for rep in range(repeat):
        order = ["writer", "lmdb"] if rep % 2 == 0 else ["lmdb", "writer"]
        for what in order:
            root = _temp_root("pxw-")
            try:
                if what == "writer":
                    rate, commits = _writer_run(events, root)
                    writer_rates.append(rate)
                    commit_ms += [c * 1000 for c in commits]
                else:
                    lmdb_rates.append(_lmdb_run(records, root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
        _progress(
            f"writer rep {rep + 1}: StoreWriter {writer_rates[-1]:,.0f} msg/s, "
            f"bare LMDB {lmdb_rates[-1]:,.0f} msg/s"
        )
    commit_ms.sort()
    return {
        "messages_per_run": n,
        "batch": COMMIT_BATCH,
        "payload_bytes": PAYLOAD,
        "record_bytes": round(statistics.mean(len(v) for _, v in records[:1000]), 1),
        "store_writer_msg_per_s": figure(writer_rates, 0),
        "baseline_bare_lmdb_msg_per_s": figure(lmdb_rates, 0),
        "commit_ms_per_batch": {
            "p50": round(commit_ms[len(commit_ms) // 2], 3),
            "p99": round(commit_ms[min(len(commit_ms) - 1, int(0.99 * len(commit_ms)))], 3),
        },
    }


# -- section 2: publish -> CONFIRM (raw DEALER publishers) ------------------------------------


@dataclass(frozen=True, slots=True)
class ConfirmPlan:
    """Phases of one confirm run (PhasePlan timing) and, per flood phase, its PUB size."""

    phases: tuple[PhasePlan, ...]
    batch: dict[str, int]
    window: int  # most unconfirmed messages one flood publisher keeps in flight
    tail_ns: int
    tick_ns: int  # a paced publisher sleeps at least this long (sends what fell due meanwhile)


@dataclass(slots=True)
class ConfirmTally:
    """One publisher's counters for one phase."""

    sent_in_window: int = 0
    confirmed: int = 0  # sent in the window and confirmed before the run ended
    arrived_in_window: int = 0  # CONFIRMed ids received inside the window (throughput)
    late: int = 0  # paced sends more than tick + 1 ms behind their due time
    errors: int = 0
    lags_ns: array[int] = field(default_factory=lambda: array("q"))


class ConfirmPublisher:
    """One DEALER as `bench-pub`: sends PUBs with cf on every message, times each CONFIRM.

    Waits with select() on the socket's FD (ZMQ_EVENTS checked first, the edge-triggered
    pattern), so paced sends keep sub-millisecond due times and a CONFIRM is timestamped
    as soon as it arrives.
    """

    def __init__(self, endpoint: str, token: str, wid: int) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = raw_dealer(self.ctx, endpoint, PUB_APP, token, READY_TIMEOUT_S)
        self.fd = int(self.sock.getsockopt(zmq.FD))
        self.topics = [f"bench.p{wid}.t{k:02d}" for k in range(100)]
        self.payload = bytes(PAYLOAD)
        self.pending: dict[bytes, tuple[int, int]] = {}  # id -> (phase index, send ns)
        self.errors: list[str] = []
        self.tallies: list[ConfirmTally] = []
        self.windows: list[tuple[int, int]] = []

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def send(self, count: int, phase: int, k: int, now: int) -> bool:
        """One PUB of `count` messages, each with cf; False when the socket is full."""
        sock = self.sock
        try:
            sock.send(P.PUB, _SNDMORE | _NOBLOCK)
        except zmq.Again:
            return False
        last = count - 1
        for i in range(count):
            msg_id = new_message_id()
            sock.send(encode_pub_header(msg_id, self.topics[(k + i) % 100], confirm=True), _SNDMORE)
            sock.send(self.payload, _SNDMORE if i < last else 0)
            self.pending[msg_id] = (phase, now)
        return True

    def wait(self, until_ns: int) -> None:
        """Until something is readable or the clock reaches `until_ns`."""
        if int(self.sock.getsockopt(zmq.EVENTS)) & _POLLIN:
            return
        timeout = (until_ns - time.monotonic_ns()) / NS_PER_S
        if timeout > 0:
            select.select([self.fd], [], [], timeout)

    def drain(self) -> None:
        """Take every CONFIRM and ERROR waiting; account each id to the phase that sent it."""
        sock = self.sock
        while True:
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            now = time.monotonic_ns()
            body = msgpack.unpackb(frames[1], raw=False) if len(frames) > 1 else {}
            if frames[0] == P.CONFIRM:
                for msg_id in body.get("ids", ()):
                    self._settle(msg_id, now, True)
            elif frames[0] == P.ERROR:
                ref = body.get("ref") or {}
                if len(self.errors) < 5:
                    self.errors.append(f"{body.get('code')}: {body.get('message')}")
                if isinstance(ref, dict) and "id" in ref:
                    self._settle(ref["id"], now, False)
                elif self.tallies:
                    self.tallies[-1].errors += 1

    def _settle(self, msg_id: bytes, now: int, confirmed: bool) -> None:
        entry = self.pending.pop(msg_id, None)
        if entry is None:
            return
        index, sent = entry
        tally = self.tallies[index]
        if not confirmed:
            tally.errors += 1
            return
        ws, we = self.windows[index]
        if ws <= sent < we:
            tally.confirmed += 1
            tally.lags_ns.append(now - sent)
        if ws <= now < we:
            tally.arrived_in_window += 1

    def run(self, schedule: Schedule, plan: ConfirmPlan, wid: int, n_pubs: int) -> None:
        self.tallies = [ConfirmTally() for _ in schedule.phases]
        self.windows = [(p.window_start_ns, p.window_end_ns) for p in schedule.phases]
        for phase in schedule.phases:
            nxt = phase.index + 1
            until = schedule.phases[nxt].start_ns if nxt < len(schedule.phases) else schedule.end_ns
            sleep_until(phase.start_ns)
            if phase.kind == "latency":
                self._paced(Pacer(phase, (wid,), n_pubs), phase.index, plan.tick_ns)
            else:
                self._flood(phase.index, plan.batch.get(phase.name, 1), plan.window)
            while time.monotonic_ns() < until:  # the gap: collect late CONFIRMs
                self.drain()
                self.wait(until)

    def _paced(self, pacer: Pacer, index: int, tick_ns: int) -> None:
        ws, we = self.windows[index]
        tally = self.tallies[index]
        k = 0
        while True:
            self.drain()  # first, so that `now` is the send time, not before the drain
            if (now := time.monotonic_ns()) >= we:
                return
            due = pacer.due_ns(k)
            if due > now:
                self.wait(min(max(due, now + tick_ns), we))
                continue
            if not self.send(1, index, k, now):
                self.wait(now + 1_000_000)
                continue
            k += 1
            if now >= ws:
                tally.sent_in_window += 1
                if now - due > tick_ns + 1_000_000:
                    tally.late += 1

    def _flood(self, index: int, batch: int, window: int) -> None:
        ws, we = self.windows[index]
        tally = self.tallies[index]
        k = 0
        while True:
            self.drain()
            if (now := time.monotonic_ns()) >= we:
                return
            if len(self.pending) + batch > window:
                self.wait(we)
                continue
            if not self.send(batch, index, k, now):
                self.wait(now + 1_000_000)
                continue
            k += batch
            if now >= ws:
                tally.sent_in_window += batch


ConfirmMessage = tuple[str, int, Any]


def confirm_worker(
    wid: int,
    n_pubs: int,
    endpoint: str,
    token: str,
    plan: ConfirmPlan,
    q: Queue[ConfirmMessage],
    go: MpEvent,
    t0: Synchronized[int],
    max_seconds: int,
) -> None:
    """Entry point of one publisher process (multiprocessing spawn; `token`, its
    credential, travels with the pickled arguments)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    signal.alarm(max_seconds)
    try:
        pub = ConfirmPublisher(endpoint, token, wid)
    except Exception as exc:
        q.put(("error", wid, f"{type(exc).__name__}: {exc}"))
        return
    try:
        q.put(("ready", wid, None))
        if not go.wait(max_seconds) or t0.value == ABORTED:
            return
        schedule = build_schedule(plan.phases, int(t0.value), plan.tail_ns)
        pub.run(schedule, plan, wid, n_pubs)
        q.put(("report", wid, (pub.tallies, len(pub.pending), pub.errors)))
    except Exception as exc:
        q.put(("error", wid, f"{type(exc).__name__}: {exc}"))
    finally:
        pub.close()


def _await(
    q: Queue[ConfirmMessage], procs: list[BaseProcess], kind: str, timeout_s: float
) -> dict[int, Any]:
    """Collect one `kind` message from every worker; raise on an error or a silent death."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < len(procs):
        try:
            what, wid, body = q.get(timeout=0.5)
        except queue_mod.Empty:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(procs) - len(got)} publishers silent ({kind})") from None
            dead = [i for i, p in enumerate(procs) if p.exitcode is not None and i not in got]
            if dead and q.empty():
                time.sleep(0.5)
                if q.empty():
                    raise RuntimeError(
                        f"publisher {dead[0]} exited with {procs[dead[0]].exitcode}"
                    ) from None
            continue
        if what == "error":
            raise RuntimeError(f"publisher {wid}: {body}")
        if what == kind:
            got[wid] = body
    return got


def _reap(procs: list[BaseProcess]) -> None:
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    for p in procs:
        p.join(3.0)
        if p.exitcode is None:
            p.kill()
            p.join(1.0)


def _phase_metrics(
    phase_name: str,
    kind: str,
    rate: int,
    window_s: float,
    tallies: list[ConfirmTally],
    cores: dict[str, float],
    written: int,
) -> dict[str, Any]:
    sent = sum(t.sent_in_window for t in tallies)
    confirmed = sum(t.confirmed for t in tallies)
    arrived = sum(t.arrived_in_window for t in tallies)
    lags = array("q")
    for t in tallies:
        lags.extend(t.lags_ns)
    server = cores.get("broker", 0.0) + cores.get("persistence", 0.0)
    out: dict[str, Any] = {
        "phase": phase_name,
        "kind": kind,
        "offered_per_s": rate,
        "sent_per_s": sent / window_s,
        "confirmed_fraction": confirmed / sent if sent else None,
        "confirmed_per_s": arrived / window_s,
        "late_fraction": sum(t.late for t in tallies) / sent if sent else 0.0,
        "errors": sum(t.errors for t in tallies),
        "lag": lag_summary(lags),
        "cores": cores,
        "server_cpu_us_per_msg": server * window_s * 1e6 / arrived if arrived else None,
        "disk_written_mb_per_s": round(written / window_s / 1e6, 2) if written >= 0 else None,
        "disk_written_bytes_per_msg": round(written / arrived)
        if arrived and written >= 0
        else None,
    }
    return out


def run_confirm(persistence: bool, plan: ConfirmPlan, n_pubs: int) -> dict[str, Any]:
    """One run: a fresh platform, `n_pubs` publisher processes, the plan's phases."""
    tail_s = plan.tail_ns / NS_PER_S
    span_s = sum((p.warmup_ns + p.measure_ns + p.gap_ns) / NS_PER_S for p in plan.phases) + tail_s
    max_seconds = span_s + 2 * READY_TIMEOUT_S
    root = _temp_root("pxc-")
    platform_ = Platform(root, persistence, max_seconds)
    ctx = mp.get_context("spawn")
    q: Queue[ConfirmMessage] = ctx.Queue()
    go, t0 = ctx.Event(), ctx.Value("q", 0)
    procs: list[BaseProcess] = []
    result: dict[str, Any] = {"persistence": persistence, "status": "ok"}
    try:
        result["ready_s"] = round(platform_.start(), 3)
        tokens = [platform_.credential(PUB_APP) for _ in range(n_pubs)]
        for wid in range(n_pubs):
            endpoint, token = platform_.endpoint, tokens[wid]
            proc = ctx.Process(
                target=confirm_worker,
                args=(wid, n_pubs, endpoint, token, plan, q, go, t0, int(max_seconds)),
                name=f"perf-confirm-{wid}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        try:
            _await(q, procs, "ready", 60.0)
        except Exception:
            t0.value = ABORTED
            go.set()
            raise
        start = time.monotonic_ns() + NS_PER_S // 2
        t0.value = start
        go.set()
        schedule = build_schedule(plan.phases, start, plan.tail_ns)
        meter = CpuMeter(
            {
                "broker": platform_.broker_pids(),
                "persistence": platform_.service_pids(),
                "publishers": [p.pid for p in procs if p.pid is not None],
                "harness": [os.getpid()],
            }
        )
        cores: list[dict[str, float]] = []
        written: list[int] = []
        for phase in schedule.phases:
            sleep_until(phase.window_start_ns)
            meter.start()
            sleep_until(phase.window_end_ns)
            cores.append(meter.stop())
            written.append(meter.written)
        sleep_until(schedule.end_ns)
        reports = _await(q, procs, "report", 30.0)
        unconfirmed = sum(r[1] for r in reports.values())
        errors = sorted({e for r in reports.values() for e in r[2]})
        result["phases"] = [
            _phase_metrics(
                p.name,
                p.kind,
                p.rate,
                p.window_s,
                [r[0][p.index] for r in reports.values()],
                cores[p.index],
                written[p.index],
            )
            for p in schedule.phases
        ]
        result["unconfirmed_at_end"] = unconfirmed
        result["error_samples"] = errors[:5]
    except Exception as exc:
        result["status"] = "failed"
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        _reap(procs)
        with contextlib.suppress(Exception):
            q.close()
            q.cancel_join_thread()
        result.update(platform_.stop())
        if result["status"] != "ok":
            result["logs"] = platform_.logs()
        shutil.rmtree(root, ignore_errors=True)
    return result


def confirm_plan(args: argparse.Namespace) -> ConfirmPlan:
    window_s, flood_s, warmup_s, gap_s = args.lag_window, args.flood_window, args.warmup, args.gap
    ns = NS_PER_S
    w, m, g, f = int(warmup_s * ns), int(window_s * ns), int(gap_s * ns), int(flood_s * ns)
    phases = (
        PhasePlan("lag@1000", "latency", 1000, w, m, g),
        PhasePlan("lag@10000", "latency", 10000, w, m, g),
        PhasePlan("flood/1", "flood", 0, w, f, g),
        PhasePlan("flood/64", "flood", 0, w, f, g),
    )
    batch = {"flood/1": 1, "flood/64": 64}
    return ConfirmPlan(phases, batch, 4096, int(0.5 * ns), int(args.tick_ms * 1e6))


def _confirm_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (persistence on/off, phase) over the successful runs."""
    out: dict[str, Any] = {}
    for label, on in (("on", True), ("off", False)):
        ok = [r for r in runs if r["persistence"] is on and r["status"] == "ok"]
        phases: dict[str, Any] = {}
        for i, name in enumerate(p["phase"] for p in (ok[0]["phases"] if ok else [])):
            rows = [r["phases"][i] for r in ok]
            phases[name] = {
                "runs_ok": len(rows),
                "runs_total": len([r for r in runs if r["persistence"] is on]),
                "offered_per_s": rows[0]["offered_per_s"],
                "confirmed_per_s": figure([x["confirmed_per_s"] for x in rows], 0),
                "sent_per_s": figure([x["sent_per_s"] for x in rows], 0),
                "confirmed_fraction": figure([x["confirmed_fraction"] for x in rows], 5),
                "late_fraction": figure([x["late_fraction"] for x in rows], 4),
                "errors": [x["errors"] for x in rows],
                "lag_p50_ms": figure([x["lag"]["p50_ms"] for x in rows]),
                "lag_p99_ms": figure([x["lag"]["p99_ms"] for x in rows]),
                "lag_max_ms": figure([x["lag"]["max_ms"] for x in rows]),
                "server_cpu_us_per_msg": figure([x["server_cpu_us_per_msg"] for x in rows], 1),
                "disk_written_mb_per_s": figure([x["disk_written_mb_per_s"] for x in rows], 2),
                "cores": {
                    k: figure([x["cores"].get(k) for x in rows], 2)["median"]
                    for k in ("broker", "persistence", "publishers", "harness", "other")
                },
            }
        out[label] = phases
        if on:
            out["commits_per_run"] = figure([r.get("commits") for r in ok], 0)
    return out


def section_confirm(args: argparse.Namespace) -> dict[str, Any]:
    plan = confirm_plan(args)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for on in [True, False] if rep % 2 == 0 else [False, True]:
            t = time.monotonic()
            run = run_confirm(on, plan, args.publishers)
            run["rep"] = rep
            runs.append(run)
            label = "persistence on " if on else "persistence off"
            if run["status"] != "ok":
                _progress(f"confirm rep {rep + 1} {label}: FAILED {run['error']}")
                continue
            parts = []
            for ph in run["phases"]:
                if ph["kind"] == "latency":
                    parts.append(f"{ph['phase']} p99 {ph['lag']['p99_ms']:.2f} ms")
                else:
                    parts.append(f"{ph['phase']} {ph['confirmed_per_s']:,.0f}/s")
            _progress(
                f"confirm rep {rep + 1} {label}: {', '.join(parts)} [{time.monotonic() - t:.0f} s]"
            )
    return {
        "publishers": args.publishers,
        "payload_bytes": PAYLOAD,
        "in_flight_window_per_publisher": plan.window,
        "pacing_tick_ms": plan.tick_ns / 1e6,
        "phases": [dataclasses.asdict(p) for p in plan.phases],
        "summary": _confirm_summary(runs),
        "runs": runs,
    }


# -- section 3: a big store -------------------------------------------------------------------


def build_store(home: Path, n: int) -> dict[str, Any]:
    """Write `n` messages through StoreWriter in 1,000-event group commits (synced).

    The store's clock follows the messages' timestamps, so segments roll by period (1 h)
    and size (256 MiB) as they would have while the messages arrived at 1 M an hour.
    """
    end_ts = time.time_ns() - NS_PER_S
    maker = EventMaker(end_ts - n * SPACING_NS)
    simulated = [maker.first_ts_ns]
    paths = PlatformPaths.resolve(home)
    paths.prepare()
    writer = open_writer(paths.store_dir, clock=lambda: simulated[0])
    gen_s = commit_s = tenth_s = 0.0
    tenths: list[float] = []  # commit-only msg/s of each tenth of the build
    written_before = device_written()
    started = time.perf_counter()
    report_every = max(COMMIT_BATCH, n // 10)
    try:
        for done in range(0, n, COMMIT_BATCH):
            t = time.perf_counter()
            batch = maker.batch(min(COMMIT_BATCH, n - done))
            t2 = time.perf_counter()
            simulated[0] = batch[0].ts_ns
            writer.commit(batch)
            t3 = time.perf_counter()
            gen_s += t2 - t
            commit_s += t3 - t2
            tenth_s += t3 - t2
            if (done + COMMIT_BATCH) % report_every == 0:
                tenths.append(report_every / tenth_s)
                tenth_s = 0.0
                _progress(
                    f"store: {done + COMMIT_BATCH:,} of {n:,} written "
                    f"({(done + COMMIT_BATCH) / (time.perf_counter() - started):,.0f} msg/s)"
                )
        segments = len(writer.messages.segments())
    finally:
        close_writer(writer)
    build_s = time.perf_counter() - started
    written = device_written() - written_before
    allocated, apparent = disk_usage(paths.store_dir)
    return {
        "messages": n,
        "topics": TOPICS,
        "payload_bytes": PAYLOAD,
        "first_ts_ns": maker.first_ts_ns,
        "build_s": round(build_s, 1),
        "build_msg_per_s": round(n / build_s),
        "commit_s": round(commit_s, 1),
        "commit_msg_per_s": round(n / commit_s),
        "commit_msg_per_s_by_tenth": [round(x) for x in tenths],
        "generate_s": round(gen_s, 1),
        "device_written_bytes_per_msg": round(written / n, 1) if written_before >= 0 else None,
        "segments": segments,
        "disk_bytes": allocated,
        "apparent_bytes": apparent,
        "disk_bytes_per_msg": round(allocated / n, 1),
        "retention_30d_1M_per_h": {
            "messages": RETENTION_MESSAGES,
            "disk_bytes": round(allocated / n * RETENTION_MESSAGES),
            "disk_gb": round(allocated / n * RETENTION_MESSAGES / 1e9, 1),
        },
    }


def device_written(path: str = "/tmp") -> int:
    """Bytes written so far to the block device holding `path` (machine-wide: includes
    every process's writes; -1 when /sys does not tell)."""
    st = os.stat(path)
    stat_file = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(stat_file.read_text().split()[6]) * 512
    return -1


def _replay_baselines(store_dir: Path, first_seq: int, count: int) -> tuple[float, float]:
    """(raw LMDB cursor records/s, MessageStore.scan msg/s) over the same messages, read
    in this process beside the running service (LMDB readers do not block its writer)."""
    import lmdb

    from broker.paths import SEGMENTS_DIR
    from persistence.segments import list_segment_files, seq_key
    from persistence.store import MessageStore

    files = list_segment_files(store_dir / SEGMENTS_DIR)
    t = time.perf_counter()
    seen = 0
    for index, (first, path) in enumerate(files):
        if index + 1 < len(files) and files[index + 1][0] <= first_seq:
            continue  # wholly before the range
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=True, max_dbs=4)
        try:
            with env.begin(db=env.open_db(b"msgs", create=False)) as txn:
                cursor = txn.cursor()
                if cursor.set_range(seq_key(max(first, first_seq))):
                    for value in cursor.iternext(keys=False, values=True):
                        seen += len(value) > 0
        finally:
            env.close()
    raw_rate = seen / (time.perf_counter() - t)
    store = MessageStore(store_dir / SEGMENTS_DIR, readonly=True)
    try:
        since_ns = store.get(first_seq)
        assert since_ns is not None
        t = time.perf_counter()
        scanned = sum(1 for _ in store.scan(since_ns.ts_ns))
        scan_rate = scanned / (time.perf_counter() - t)
    finally:
        store.close()
    if scanned != count or seen != count:
        raise RuntimeError(f"baselines read {seen} / {scanned} messages, expected {count}")
    return raw_rate, scan_rate


def section_store(args: argparse.Namespace) -> dict[str, Any]:
    n = args.store_messages
    free = shutil.disk_usage("/tmp").free
    need = n * BYTES_PER_MESSAGE_GUESS + 2**30
    if free < need:
        return {"skipped": f"needs ~{need / 1e9:.1f} GB free in /tmp, {free / 1e9:.1f} GB free"}
    root = _temp_root("pxs-")
    try:
        _progress(f"store: building {n:,} messages in {root}")
        out = build_store(root / "home", n)
        _progress(
            f"store: built in {out['build_s']} s, {out['disk_bytes_per_msg']} B/msg on disk, "
            f"30 days at 1 M/h: {out['retention_30d_1M_per_h']['disk_gb']} GB"
        )
        platform_ = Platform(root, True, 3600.0)
        try:
            out["platform_ready_s"] = round(platform_.start(), 2)
            recovered = _log_events(root / "broker.log", "broker-recovered")
            if recovered:
                out["broker_recovered"] = {
                    k: recovered[-1].get(k) for k in ("watermark", "recent_ids", "sessions")
                }
            _progress(f"store: platform ready on the store after {out['platform_ready_s']} s")
            out.update(_measure_reads(args, platform_, out["first_ts_ns"], n))
        finally:
            platform_.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _measure_reads(
    args: argparse.Namespace, platform_: Platform, first_ts: int, n: int
) -> dict[str, Any]:
    from broker.paths import SEGMENTS_DIR
    from clients.bus import Bus
    from persistence.store import MessageStore

    replay_n = min(n, args.replay_messages)
    since_ns = first_ts + (n - replay_n) * SPACING_NS
    since_s = since_ns / NS_PER_S
    bus = Bus.connect(
        platform_.endpoint, READ_APP, platform_.credential(READ_APP), session="bench", timeout=30
    )
    meter = CpuMeter(
        {
            "broker": platform_.broker_pids(),
            "persistence": platform_.service_pids(),
            "harness": [os.getpid()],
        }
    )
    out: dict[str, Any] = {"replay_messages": replay_n}
    try:
        rates: list[float] = []
        cores: list[dict[str, float]] = []
        raw_rates: list[float] = []
        scan_rates: list[float] = []
        filtered_s: list[float] = []
        for rep in range(args.repeat):
            meter.start()
            t = time.perf_counter()
            got = sum(1 for _ in bus.replay("bench.>", since_s, timeout=60))
            elapsed = time.perf_counter() - t
            cores.append(meter.stop())
            if got != replay_n:
                raise RuntimeError(f"replay returned {got} messages, expected {replay_n}")
            rates.append(got / elapsed)
            raw, scan = _replay_baselines(platform_.paths.store_dir, n - replay_n + 1, replay_n)
            raw_rates.append(raw)
            scan_rates.append(scan)
            t = time.perf_counter()
            one = sum(1 for _ in bus.replay("bench.t0007.data", since_s, timeout=120))
            filtered_s.append(time.perf_counter() - t)
            _progress(
                f"store rep {rep + 1}: Bus.replay {rates[-1]:,.0f} msg/s, MessageStore.scan "
                f"{scan:,.0f}/s, raw LMDB {raw:,.0f}/s; "
                f"one topic ({one} msgs): {filtered_s[-1]:.2f} s"
            )
        out["replay_msg_per_s"] = figure(rates, 0)
        out["replay_cores"] = {
            k: figure([c.get(k) for c in cores], 2)["median"]
            for k in ("broker", "persistence", "harness", "other")
        }
        out["baseline_store_scan_msg_per_s"] = figure(scan_rates, 0)
        out["baseline_raw_lmdb_records_per_s"] = figure(raw_rates, 0)
        out["replay_one_topic_of_1000_s"] = figure(filtered_s)
        # history: random topics, the same ones through the bus and in-process
        rng = random.Random(11)
        topics = [f"bench.t{rng.randrange(TOPICS):04d}.data" for _ in range(args.history_calls)]
        bus.history(topics[0], last=100, timeout=30)  # connect the query socket first
        lat: list[float] = []
        for topic in topics:
            t = time.perf_counter()
            found = bus.history(topic, last=100, timeout=30)
            lat.append(time.perf_counter() - t)
            if len(found) != 100:
                raise RuntimeError(f"history({topic}) returned {len(found)} messages")
        store = MessageStore(platform_.paths.store_dir / SEGMENTS_DIR, readonly=True)
        base: list[float] = []
        try:
            for topic in topics:
                t = time.perf_counter()
                store.history(topic, 100)
                base.append(time.perf_counter() - t)
        finally:
            store.close()
        out["history"] = _ms_percentiles(lat)
        out["baseline_store_history"] = _ms_percentiles(base)
        _progress(
            f"store: history p50 {out['history']['p50_ms']} ms p99 {out['history']['p99_ms']} ms "
            f"(in-process {out['baseline_store_history']['p99_ms']} ms p99)"
        )
    finally:
        bus.close()
    return out


def _ms_percentiles(seconds: list[float]) -> dict[str, Any]:
    s = sorted(seconds)
    n = len(s)

    def rank(q: float) -> float:
        return round(s[min(n - 1, max(0, int(q * n + 0.999999) - 1))] * 1000, 3)

    return {"calls": n, "p50_ms": rank(0.5), "p99_ms": rank(0.99), "max_ms": round(s[-1] * 1000, 3)}


# -- section 4: routing with persistence on beside off ----------------------------------------


class PersistedPlexusBroker(plexus_adapter.PlexusBroker):
    """perf.systems.plexus's broker with persistence on and the persistence service.

    The service starts first, then PlexusBroker starts `python -m broker` with its config's
    persistence switched on; both share one `Identities` (this process is their
    supervisor), so the broker knows `$persistence` and the service knows the apps. The
    service's CPU counts as the broker's (`pids`): with persistence on, storing every
    message is part of what serving it costs.
    """

    def __init__(self, config: BrokerConfig) -> None:
        paths = PlatformPaths.resolve(config.workdir / "home")
        paths.prepare()
        apps = config.workdir / "apps"
        apps.mkdir(exist_ok=True)
        identities = Identities()
        self._service = start_persistence_service(
            paths, apps, config.max_seconds, config.workdir / "persistence.log", identities
        )
        try:
            super().__init__(config, persistence=True, identities=identities)
        except BaseException:
            procutil.stop_process(self._service)
            identities.close()
            raise

    def pids(self) -> list[int]:
        return super().pids() + procutil.child_pids(self._service.pid)

    def stop(self) -> None:
        super().stop()
        procutil.stop_process(self._service, 10.0)


class PersistenceOnAdapter:
    """The `plexus` adapter with PersistedPlexusBroker: what perf.harness.run_one loads
    while a persistence-on run starts. Worker processes load the real `plexus` adapter
    (same clients), so only the broker side differs."""

    NAME = "plexus"

    def unavailable_reason(self) -> str | None:
        return None

    def start_broker(self, config: BrokerConfig) -> BrokerHandle:
        return PersistedPlexusBroker(config)

    def publisher_worker(self, spec: WorkerSpec, ctl: WorkerControl) -> None:
        plexus_adapter.publisher_worker(spec, ctl)

    def subscriber_worker(self, spec: WorkerSpec, ctl: WorkerControl) -> None:
        plexus_adapter.subscriber_worker(spec, ctl)


ROUTING_ON, ROUTING_OFF = "pers-on", "pers-off"


def section_routing(args: argparse.Namespace, tables: dict[str, Any]) -> dict[str, Any]:
    """Runs interleaved (order swapped every repetition); `tables` gets the cells and
    failed runs for perf.report.render."""
    from perf import harness
    from perf.cli import PAYLOAD as ROUTING_PAYLOAD
    from perf.cli import build_plan
    from perf.summary import aggregate

    plan = build_plan(args.routing_rates, args.routing_duration, args.warmup, args.gap)
    tail_ns = int(0.3 * NS_PER_S)
    runs: list[RunResult] = []
    grid = [(layout, n) for n in args.routing_apps for layout in args.routing_layouts]
    total = args.repeat * len(grid) * 2
    for rep in range(args.repeat):
        for layout, n_apps in grid:
            order = [ROUTING_OFF, ROUTING_ON] if rep % 2 == 0 else [ROUTING_ON, ROUTING_OFF]
            for label in order:
                cfg = harness.RunConfig(
                    "plexus", layout, n_apps, rep, plan, ROUTING_PAYLOAD, tail_ns
                )
                t = time.monotonic()
                if label == ROUTING_ON:
                    with mock.patch.object(
                        harness, "load_adapter", lambda _name: PersistenceOnAdapter()
                    ):
                        result = harness.run_one(cfg)
                else:
                    result = harness.run_one(cfg)
                result.system = label
                runs.append(result)
                _progress(
                    f"routing [{len(runs)}/{total}] rep {rep + 1} {layout} {n_apps} apps {label}: "
                    f"{_routing_headline(result)} [{time.monotonic() - t:.0f} s]"
                )
    cells: list[Cell] = aggregate(runs)
    tables["cells"] = cells
    tables["failed"] = [r for r in runs if r.status != "ok"]
    return {
        "baseline": ROUTING_OFF,
        "apps": args.routing_apps,
        "layouts": args.routing_layouts,
        "phases": [dataclasses.asdict(p) for p in plan],
        "summary": [dataclasses.asdict(c) for c in cells],
        "runs": [dataclasses.asdict(r) for r in runs],
    }


def _routing_headline(r: RunResult) -> str:
    if r.status != "ok":
        return f"FAILED: {r.error}"
    parts = []
    for p in r.phases:
        if p.kind == "flood":
            parts.append(f"flood {p.delivered_rate:,.0f}/s")
        elif p.e2e is not None:
            parts.append(f"{p.name} p99 {p.e2e.p99_us / 1000:.2f} ms")
    return ", ".join(parts)


# -- report -----------------------------------------------------------------------------------


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _med(node: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node.get("median") if isinstance(node, dict) and "median" in node else node


def _ratio(value: Any, base: Any) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def _lag_cell(summary: dict[str, Any], label: str, phase: str) -> str:
    node = summary.get(label, {}).get(phase, {})
    return "/".join(_num(_med(node, k), ".1f") for k in ("lag_p50_ms", "lag_p99_ms", "lag_max_ms"))


Row = tuple[str, str, str, str, str]  # figure, plexus, baseline, x base, what the baseline is


def _writer_rows(w: dict[str, Any]) -> list[Row]:
    a, b = _med(w, "store_writer_msg_per_s"), _med(w, "baseline_bare_lmdb_msg_per_s")
    what = "bare py-lmdb, same records, 1000/txn, synced"
    return [
        (
            "store rate: StoreWriter.commit, msg/s",
            _num(a, ",.0f"),
            _num(b, ",.0f"),
            _ratio(a, b),
            what,
        )
    ]


def _confirm_rows(s: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    off = "persistence off (CONFIRM = accepted)"
    for phase, what in (("flood/1", "1 msg per PUB"), ("flood/64", "64 msgs per PUB")):
        a, b = _med(s, "on", phase, "confirmed_per_s"), _med(s, "off", phase, "confirmed_per_s")
        rows.append(
            (f"confirmed msg/s, {what}", _num(a, ",.0f"), _num(b, ",.0f"), _ratio(a, b), off)
        )
    for phase in ("lag@1000", "lag@10000"):
        rate = int(phase.split("@")[1])
        a, b = _med(s, "on", phase, "lag_p99_ms"), _med(s, "off", phase, "lag_p99_ms")
        on_cell, off_cell = _lag_cell(s, "on", phase), _lag_cell(s, "off", phase)
        rows.append(
            (f"pub->CONFIRM @{rate:,}/s p50/p99/max ms", on_cell, off_cell, _ratio(a, b), off)
        )
        share = _med(s, "on", phase, "confirmed_fraction")
        if share is not None and share < 0.9999:
            rows.append(
                ("  confirmed share", f"{100 * share:.2f}%", "", "", "sent, CONFIRMed by end")
            )
    return rows


def _single(figure_: str, value: str, note: str) -> Row:
    """A row without a baseline."""
    return (figure_, value, "", "", note)


def _store_rows(st: dict[str, Any]) -> list[Row]:
    if "skipped" in st or "error" in st:
        return [_single("big store", "not run", str(st.get("skipped") or st.get("error")))]
    mil = f"{st['messages'] / 1e6:g}M"
    tenths = st.get("commit_msg_per_s_by_tenth") or [None]
    commit = f"commits alone {st['commit_msg_per_s']:,} msg/s"
    rows = [
        _single(f"build {mil}-msg store, s (1 run)", _num(st["build_s"], ",.1f"), commit),
        _single(
            "  commit msg/s, first tenth of the build",
            _num(tenths[0], ",.0f"),
            f"last tenth: {_num(tenths[-1], ',.0f')} msg/s",
        ),
        _single(
            "  bytes written to disk per message stored",
            _num(st.get("device_written_bytes_per_msg"), ",.0f"),
            "device write counter during the build (/sys/.../stat)",
        ),
        _single(
            "disk bytes per message (1 run)",
            _num(st["disk_bytes_per_msg"], ",.1f"),
            f"du of the store dir, {st['segments']} segments",
        ),
        _single(
            "30 days at 1M/h = 720M msgs, GB",
            _num(st["retention_30d_1M_per_h"]["disk_gb"], ",.1f"),
            "bytes per message x 720M",
        ),
        _single(
            "platform start on this store, s (1 run)",
            _num(st.get("platform_ready_s"), ".2f"),
            "spawn -> first WELCOME (recovery done)",
        ),
    ]
    if "replay_msg_per_s" in st:
        rmil = f"{st['replay_messages'] / 1e6:g}M"
        a, b = _med(st, "replay_msg_per_s"), _med(st, "baseline_store_scan_msg_per_s")
        raw = _num(_med(st, "baseline_raw_lmdb_records_per_s"), ",.0f")
        note = f"MessageStore.scan in-process; raw cursor {raw}/s"
        one = _num(_med(st, "replay_one_topic_of_1000_s"), ".2f")
        h, hb = st["history"], st["baseline_store_history"]
        on, base = f"{h['p50_ms']:.2f}/{h['p99_ms']:.2f}", f"{hb['p50_ms']:.2f}/{hb['p99_ms']:.2f}"
        rows += [
            (
                f"Bus.replay of {rmil} msgs, msg/s",
                _num(a, ",.0f"),
                _num(b, ",.0f"),
                _ratio(a, b),
                note,
            ),
            _single(f"Bus.replay 1 topic within last {rmil}, s", one, "through the topic index"),
            (
                f"history(last=100) p50/p99 ms, {h['calls']} calls",
                on,
                base,
                _ratio(h["p99_ms"], hb["p99_ms"]),
                "MessageStore.history in-process",
            ),
        ]
    return rows


def render_table(doc: dict[str, Any], repeat: int, tables: dict[str, Any]) -> str:
    """The short human table: one line per figure, plexus beside its baseline."""
    rows: list[Row] = []
    if "store_writer_msg_per_s" in doc.get("writer", {}):
        rows += _writer_rows(doc["writer"])
    if "summary" in doc.get("confirm", {}):
        rows += _confirm_rows(doc["confirm"]["summary"])
    if "store" in doc:
        rows += _store_rows(doc["store"])
    head: Row = ("figure", "plexus", "baseline", "x base", "baseline is")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]

    def line(r: Row) -> str:
        cells = [r[0].ljust(widths[0]), *(r[i].rjust(widths[i]) for i in (1, 2, 3)), r[4]]
        return "  ".join(cells)

    lines: list[str] = []
    if rows:
        lines.append(f"Persistence: medians of {repeat} runs unless marked; x base = plexus / base")
        lines += [line(head), *(line(r) for r in rows)]
    if doc.get("verdict"):
        lines.append(doc["verdict"])
    if "cells" in tables:
        from perf.report import render

        lines += ["", f"Routing, bench_routing's plexus workload: {ROUTING_ON} = --persistence on"]
        lines.append(render(tables["cells"], ROUTING_OFF, {}, tables["failed"]))
    return "\n".join(lines)


def _verdict(doc: dict[str, Any]) -> str | None:
    s = doc.get("confirm", {}).get("summary")
    if not s:
        return None
    p99 = _med(s, "on", "lag@10000", "lag_p99_ms")
    if p99 is None:
        return None
    req = "met" if p99 < 1000 else "NOT met"
    aim = "met" if p99 < 100 else "missed"
    return (
        f"publish->synced p99 at 10,000 msg/s: {p99:.1f} ms "
        f"(requirement < 1 s: {req}; aim < 100 ms: {aim})"
    )


def _jsonable(obj: object) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, array):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def environment() -> dict[str, Any]:
    import lmdb

    packages: dict[str, str | None] = {}
    for pkg in ("pyzmq", "lmdb", "msgpack"):
        try:
            packages[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            packages[pkg] = None
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "broker", "persistence", "clients"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libzmq": zmq.zmq_version(),
        "liblmdb": ".".join(map(str, lmdb.version())),
        "packages": packages,
        "git_head": git.stdout.strip() or None,
        "uncommitted_product_files": dirty.stdout.split("\n")[:20] if dirty.stdout.strip() else [],
        "loadavg_at_start": list(os.getloadavg()),
        "tmp_free_gb": round(shutil.disk_usage("/tmp").free / 1e9, 1),
    }


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m perf.bench_persistence", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 M-message store, short windows, mux only"
    )
    ap.add_argument("--json-only", action="store_true", help="print only the JSON document")
    ap.add_argument("--sections", type=name_list, default=list(SECTIONS), help=",".join(SECTIONS))
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (medians)")
    ap.add_argument("--publishers", type=int, default=4, help="publisher processes (confirm)")
    ap.add_argument("--writer-messages", type=int, help="per StoreWriter run (default 200,000)")
    ap.add_argument("--store-messages", type=int, help="big store size (default 10 M, quick 1 M)")
    ap.add_argument("--replay-messages", type=int, default=1_000_000, help="replayed per run")
    ap.add_argument("--history-calls", type=int, default=300)
    ap.add_argument("--lag-window", type=float, help="measured s per lag phase (default 10)")
    ap.add_argument(
        "--tick-ms", type=float, default=1.0, help="shortest sleep of a paced publisher (0: none)"
    )
    ap.add_argument("--flood-window", type=float, help="measured s per flood phase (default 3)")
    ap.add_argument("--warmup", type=float, help="s before each window (default 1)")
    ap.add_argument("--gap", type=float, help="s after each window (default 1)")
    ap.add_argument("--routing-apps", type=int_list, default=[10])
    ap.add_argument("--routing-layouts", type=name_list, help="procs,mux (quick: mux)")
    ap.add_argument("--routing-rates", type=int_list, default=[1000, 10000])
    ap.add_argument("--routing-duration", type=float, help="window per phase (default 3)")
    ap.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"also written here ({DEFAULT_JSON})"
    )
    args = ap.parse_args(argv)
    quick = args.quick
    args.writer_messages = args.writer_messages or (50_000 if quick else 200_000)
    args.store_messages = args.store_messages or (1_000_000 if quick else 10_000_000)
    args.lag_window = args.lag_window or (3.0 if quick else 10.0)
    args.flood_window = args.flood_window or (1.5 if quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.gap = args.gap if args.gap is not None else (0.5 if quick else 1.0)
    args.routing_layouts = args.routing_layouts or (["mux"] if quick else ["mux", "procs"])
    args.routing_duration = args.routing_duration or (1.0 if quick else 3.0)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}")
    if args.repeat < 1 or args.publishers < 1:
        ap.error("--repeat and --publishers must be >= 1")
    return args


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    procutil.raise_fd_limit()
    started, t_start = dt.datetime.now(dt.UTC), time.monotonic()
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "environment": environment(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    interrupted = False
    failed: list[str] = []
    tables: dict[str, Any] = {}
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "writer": lambda: section_writer(args.writer_messages, args.repeat),
        "confirm": lambda: section_confirm(args),
        "store": lambda: section_store(args),
        "routing": lambda: section_routing(args, tables),
    }
    try:
        for name in SECTIONS:
            if name not in args.sections:
                continue
            _progress(f"section {name}")
            t = time.monotonic()
            try:
                doc[name] = runners[name]()
            except Exception as exc:
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
                doc[name] = {"error": f"{type(exc).__name__}: {exc}"}
                _progress(f"section {name} FAILED: {exc}")
            if isinstance(doc[name], dict):
                doc[name]["elapsed_s"] = round(time.monotonic() - t, 1)
    except (KeyboardInterrupt, SystemExit):
        interrupted = True
        _progress("interrupted: children stopped and temp dirs removed; writing what was measured")
    doc["verdict"] = _verdict(doc)
    doc["interrupted"] = interrupted
    doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
    text = json.dumps(doc, indent=1, default=_jsonable)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")
    print(text)
    if not args.json_only:
        print()
        print(render_table(doc, args.repeat, tables))
    _progress(f"wrote {args.json} after {time.monotonic() - t_start:.0f} s")
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
