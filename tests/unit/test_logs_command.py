"""`plexus logs` on log files alone (no platform): last lines, JSON, unknown apps."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from plexus.cli import main
from supervisor.log_files import LogDirectory, stamp


def _home(tmp_path: Path, apps: dict[str, list[str]]) -> Path:
    logs = LogDirectory(tmp_path / "logs", max_bytes=40, files=3)
    for app, lines in apps.items():
        for i, line in enumerate(lines):
            logs.write(app, [f"{stamp(1_790_000_000 + i)} {line}\n".encode()])
    logs.close()
    return tmp_path


def test_the_last_lines_also_from_rotated_files(tmp_path: Path) -> None:
    home = _home(tmp_path, {"ticker": [f"price {i}" for i in range(6)]})
    assert (home / "logs" / "ticker.log.1").exists()  # 40-byte files: it rotated
    result = CliRunner().invoke(main, ["logs", "ticker", "--home", str(home), "--lines", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "2026-09-21T14:13:23.000Z price 3",
        "2026-09-21T14:13:24.000Z price 4",
        "2026-09-21T14:13:25.000Z price 5",
    ]


def test_json_is_one_object_a_line(tmp_path: Path) -> None:
    home = _home(tmp_path, {"ticker": ["a", "b"]})
    result = CliRunner().invoke(main, ["logs", "ticker", "--home", str(home), "--json"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.output.splitlines()] == [
        {"app": "ticker", "ts": 1_790_000_000.0, "line": "a"},
        {"app": "ticker", "ts": 1_790_000_001.0, "line": "b"},
    ]


def test_an_unknown_app_exits_5_naming_the_apps_with_logs(tmp_path: Path) -> None:
    home = _home(tmp_path, {f"app{i:02d}": ["x"] for i in range(25)})
    for name in ("nobody", "../app01", "App01"):
        result = CliRunner().invoke(main, ["logs", name, "--home", str(home)])
        assert result.exit_code == 5, (name, result.output)
        message = result.output.strip()
        assert len(message.splitlines()) == 1
        assert "apps with logs: app00, app01," in message and "and 5 more" in message
    empty = CliRunner().invoke(main, ["logs", "nobody", "--home", str(tmp_path / "none")])
    assert empty.exit_code == 5 and "no app has logs there yet" in empty.output
