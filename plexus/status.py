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
    """The `plexus status --json` document (field names are a documented contract,
    docs/cli.md)."""
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
            "external": bool(info.get("external")),
            "restarts": info.get("restarts", 0),
            "uptime_s": info.get("uptime_s"),
            "exit_status": info.get("exit_status"),
            "exit_reason": info.get("exit_reason") or None,
            "cpu_percent": info.get("cpu_percent"),  # sampled by the supervisor, tree included
            "rss_mb": info.get("rss_mb"),
            "connections": connected.get("sessions", 0),
            "last_heartbeat_s_ago": connected.get("last_seen_s_ago"),
        }
    platform_clients = sum(
        int(entry.get("sessions", 0)) for app, entry in sessions.items() if app.startswith("$")
    )
    total_clients = int(stats.get("sessions", 0))
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
        "clients": total_clients,
        "app_clients": total_clients - platform_clients,
        "platform_clients": platform_clients,
        "subscriptions": stats.get("subscriptions", 0),
        "msg_per_s": stats.get("delivered_per_s", 0.0),
        "published": stats.get("published", 0),
        "delivered": stats.get("delivered", 0),
        "undeliverable": stats.get("undeliverable", 0),
        "dlq": {
            "entries": stats.get("dlq_size", 0),
            "dropped": stats.get("dlq_dropped", 0),
            "by_reason": stats.get("dlq_by_reason", {}),
            "discarded_on_close": stats.get("discarded_on_close", 0),
        },
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


def seconds(value: float | None) -> str:
    """A duration for people: `35 s`, `12 min`, `3.2 h`, `2.0 d`."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.0f} s"
    if value < 3600:
        return f"{value / 60:.0f} min"
    if value < 86400:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} d"


def latency(micros: float | None) -> str:
    """A latency for people: `850 µs`, `4.2 ms`, `1.3 s`."""
    if micros is None:
        return "-"
    if micros < 1000:
        return f"{micros:.0f} µs"
    if micros < 1_000_000:
        return f"{micros / 1000:.1f} ms"
    return f"{micros / 1_000_000:.1f} s"


def _unit(value: Any, unit: str) -> str:
    return "-" if value is None else f"{value} {unit}"


def _store_line(store: dict[str, Any] | None) -> str:
    if store is None:
        return "store     off (--no-persistence): nothing is written to disk"
    return (
        f"store     pid {_cell(store['pid'])}  {_cell(store['state'])}  "
        f"restarts {store['restarts']}  stored up to event {_cell(store['stored_watermark'])}"
        f" of {_cell(store['last_event'])}  confirms waiting {_cell(store['confirms_waiting'])}"
    )


def render_apps(rows: list[dict[str, Any]]) -> str:
    """The app table of `plexus status` and `plexus apps list`: one row an app."""
    lines = [
        f"{'APP':<16}{'PID':>8} {'STATE':<9}{'CONN':>5}{'RESTARTS':>9}{'UPTIME':>9}"
        f"{'CPU':>8}{'RSS':>10}{'HEARTBEAT':>11}  LAST EXIT"
    ]
    for app in rows:
        beat = app.get("last_heartbeat_s_ago")
        cpu = app.get("cpu_percent")
        lines.append(
            f"{app['app']:<16}{_cell(app['pid']):>8} {_cell(app['state']):<9}"
            f"{app.get('connections', 0):>5}{app['restarts']:>9}{seconds(app['uptime_s']):>9}"
            f"{_unit(cpu, '%'):>8}{_unit(app['rss_mb'], 'MiB'):>10}"
            f"{(f'{beat:.1f} s ago' if beat is not None else '-'):>11}"
            f"  {app.get('exit_reason') or '-'}"
        )
    return "\n".join(lines)


def render_status(report: dict[str, Any]) -> str:
    """A short report for people; every figure with its unit."""
    broker = report["broker"]
    route = broker.get("route_latency_us") or {}
    dlq = report["dlq"]
    lines = [
        f"platform  running {seconds(report['uptime_s'])}  home {report['home']}",
        f"broker    pid {broker['pid']}  cpu {_unit(broker['cpu_percent'], '%')}  "
        f"rss {_unit(broker['rss_mb'], 'MiB')}  restarts {broker['restarts']}",
        f"traffic   {report['msg_per_s']} msg/s  published {report['published']}  "
        f"delivered {report['delivered']}  undeliverable {report['undeliverable']}  "
        f"route p50 {latency(route.get('p50_us'))}  p99 {latency(route.get('p99_us'))}",
        f"clients   {report['clients']} connected ({report['app_clients']} apps, "
        f"{report['platform_clients']} platform: supervisor, store, this command)  "
        f"subscriptions {report['subscriptions']}  auth failures {report['auth_failures']}",
        f"dlq       {dlq['entries']} dead letters ({dlq['dropped']} dropped when full)  "
        f"{dlq['discarded_on_close']} discarded by clean closes (not failures)",
        _store_line(report.get("store")),
        "",
        render_apps([{"app": name, **app} for name, app in report["apps"].items()]),
    ]
    return "\n".join(lines)
