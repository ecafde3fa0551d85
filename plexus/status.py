"""`plexus status`: the supervisor's state file, the broker's STATS and psutil, as one report."""

from __future__ import annotations

import time
from typing import Any

import psutil

_SAMPLE_S = 0.2


def _processes(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    """CPU % (sampled over a short window, children included) and RSS MiB per name
    (the broker; apps are sampled by the supervisor every second)."""
    procs: dict[str, list[psutil.Process]] = {}
    for name, pid in pids.items():
        try:
            root = psutil.Process(pid)
            procs[name] = [root, *root.children(recursive=True)]
            for proc in procs[name]:
                proc.cpu_percent(None)
        except psutil.Error:
            continue
    time.sleep(_SAMPLE_S)
    result: dict[str, dict[str, float]] = {}
    for name, group in procs.items():
        cpu = rss = 0.0
        for proc in group:
            try:
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
        result[name] = {"cpu_percent": round(cpu, 1), "rss_mb": round(rss / 2**20, 1)}
    return result


def collect_status(state: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """The `plexus status --json` document (field names are a documented contract)."""
    now = time.time()
    apps_state: dict[str, dict[str, Any]] = state.get("apps", {})
    broker_pid = state.get("broker", {}).get("pid")
    measured = _processes({"$broker": broker_pid} if broker_pid else {})
    sessions: dict[str, Any] = stats.get("apps", {})
    apps = {}
    for name, info in sorted(apps_state.items()):
        connected = sessions.get(name, {})
        apps[name] = {
            "pid": info.get("pid"),
            "state": info.get("state"),
            "restarts": info.get("restarts", 0),
            "uptime_s": info.get("uptime_s"),
            "exit_status": info.get("exit_status"),
            "exit_reason": info.get("exit_reason") or None,
            "cpu_percent": info.get("cpu_percent"),  # sampled by the supervisor, tree included
            "rss_mb": info.get("rss_mb"),
            "connections": connected.get("sessions", 0),
            "last_heartbeat_s_ago": connected.get("last_seen_s_ago"),
        }
    return {
        "running": True,
        "home": state.get("home"),
        "supervisor_pid": state.get("pid"),
        "uptime_s": round(now - state.get("started_at", now), 1),
        "persistence": state.get("persistence", True),
        "broker": {
            "pid": broker_pid,
            "restarts": state.get("broker", {}).get("restarts", 0),
            "cpu_percent": measured.get("$broker", {}).get("cpu_percent"),
            "rss_mb": measured.get("$broker", {}).get("rss_mb"),
            "endpoint": stats.get("endpoint"),
            "route_latency_us": stats.get("route_latency"),
        },
        "store": _store_status(state, stats),
        "clients": stats.get("sessions", 0),
        "subscriptions": stats.get("subscriptions", 0),
        "msg_per_s": stats.get("delivered_per_s", 0.0),
        "published": stats.get("published", 0),
        "delivered": stats.get("delivered", 0),
        "undeliverable": stats.get("undeliverable", 0),
        "auth_failures": stats.get("auth_failures", 0),
        "errors": stats.get("errors", {}),
        "apps": apps,
    }


def _store_status(state: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any] | None:
    """The persistence service and how far behind the broker it is (None when off)."""
    service = state.get("persistence_service")
    if not state.get("persistence", True) or not isinstance(service, dict):
        return None
    events = stats.get("events", {})
    return {
        "pid": service.get("pid"),
        "state": service.get("state"),
        "restarts": service.get("restarts", 0),
        "stored_watermark": events.get("stored_watermark"),
        "last_event": events.get("last_seq"),
        "backlog_bytes": events.get("backlog_bytes"),
        "confirms_waiting": events.get("confirms_waiting"),
    }


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _store_line(store: dict[str, Any] | None) -> str:
    if store is None:
        return "store     off (--no-persistence): nothing is written to disk"
    return (
        f"store     pid {_cell(store['pid'])}  {_cell(store['state'])}  "
        f"restarts {store['restarts']}  stored up to event {_cell(store['stored_watermark'])}"
        f" of {_cell(store['last_event'])}  confirms waiting {_cell(store['confirms_waiting'])}"
    )


def render_status(report: dict[str, Any]) -> str:
    """A short table for people."""
    broker = report["broker"]
    latency = broker.get("route_latency_us") or {}
    lines = [
        f"platform  running {report['uptime_s']}s  home {report['home']}",
        f"broker    pid {broker['pid']}  cpu {_cell(broker['cpu_percent'])}%  "
        f"rss {_cell(broker['rss_mb'])} MiB  restarts {broker['restarts']}",
        f"traffic   {report['msg_per_s']} msg/s  published {report['published']}  "
        f"delivered {report['delivered']}  undeliverable {report['undeliverable']}  "
        f"route p99 {_cell(latency.get('p99_us'))} µs",
        f"clients   {report['clients']}  subscriptions {report['subscriptions']}  "
        f"auth failures {report['auth_failures']}",
        _store_line(report.get("store")),
        "",
        f"{'APP':<16}{'PID':>8} {'STATE':<9}{'RESTARTS':>9}{'UPTIME':>8}{'CPU%':>7}"
        f"{'RSS MiB':>9}{'CONN':>6}{'HEARTBEAT':>11}  LAST EXIT",
    ]
    for name, app in report["apps"].items():
        beat = app["last_heartbeat_s_ago"]
        lines.append(
            f"{name:<16}{_cell(app['pid']):>8} {_cell(app['state']):<9}{app['restarts']:>9}"
            f"{_cell(app['uptime_s']):>8}{_cell(app['cpu_percent']):>7}{_cell(app['rss_mb']):>9}"
            f"{app['connections']:>6}{(f'{beat}s ago' if beat is not None else '-'):>11}"
            f"  {app['exit_reason'] or '-'}"
        )
    return "\n".join(lines)
