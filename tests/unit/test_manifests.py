"""App manifests: the DESIGN.md example parses; every bad field names the file and the field;
the catalog answers permissions by id and re-reads the directory only when it must."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import catalog as catalog_module
from broker.catalog import ManifestCatalog
from broker.manifests import (
    Limits,
    Manifest,
    ManifestError,
    Permissions,
    load_manifest,
    load_manifests,
    parse_manifest,
)

DESIGN_EXAMPLE = """\
id = "ticker"
command = ["python", "-m", "examples.ticker"]
restart = "on-failure"          # always | on-failure | never
[limits]
memory_mb = 100
cpu_percent = 90
[permissions]
publish = ["market.>"]
subscribe = ["orders.*"]
request = ["pricing.>"]
ask = ["subscribe:news.>", "clipboard"]   # asked of the user at first use
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_design_example(tmp_path: Path) -> None:
    path = write(tmp_path, "ticker.toml", DESIGN_EXAMPLE)
    manifest = load_manifest(path)
    assert manifest == Manifest(
        app_id="ticker",
        command=("python", "-m", "examples.ticker"),
        restart="on-failure",
        limits=Limits(memory_mb=100, cpu_percent=90),
        permissions=Permissions(
            publish=("market.>",),
            subscribe=("orders.*",),
            request=("pricing.>",),
            ask=("subscribe:news.>", "clipboard"),
        ),
        after=(),
        env=(),
        path=str(path),
    )
    assert not manifest.external


def test_minimal_external_manifest(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, "x.toml", 'id = "blotter-2.v_1"\n'))
    assert manifest.app_id == "blotter-2.v_1"
    assert manifest.external and manifest.command is None
    assert manifest.restart == "on-failure"
    assert manifest.limits == Limits()
    assert manifest.permissions == Permissions()


def test_optional_fields(tmp_path: Path) -> None:
    text = """\
id = "app"
description = "an app"
restart = "always"
after = ["base"]
[env]
B = "2"
A = "1"
"""
    manifest = load_manifest(write(tmp_path, "app.toml", text))
    assert manifest.after == ("base",)
    assert manifest.env == (("A", "1"), ("B", "2"))
    assert manifest.restart == "always"


def test_load_manifests_directory(tmp_path: Path) -> None:
    write(tmp_path, "ticker.toml", DESIGN_EXAMPLE)
    write(tmp_path, "blotter.toml", 'id = "blotter"\nafter = ["ticker"]\n')
    write(tmp_path, "notes.txt", "not a manifest")
    manifests = load_manifests(tmp_path)
    assert sorted(manifests) == ["blotter", "ticker"]
    assert manifests["blotter"].after == ("ticker",)
    assert load_manifests(tmp_path) == manifests  # deterministic


BAD_FIELDS = [
    ('id = "Ticker"', "id"),
    ('id = ""', "id"),
    ('id = "-ticker"', "id"),
    ('id = "a b"', "id"),
    ('id = "$cli"', "id"),
    ('id = "' + "a" * 65 + '"', "id"),
    ("id = 5", "id"),
    ('command = ["x"]', "id"),  # missing id
    ('id = "a"\nrestart = "sometimes"', "restart"),
    ('id = "a"\nrestart = 1', "restart"),
    ('id = "a"\ncommand = []', "command"),
    ('id = "a"\ncommand = "python app.py"', "command"),
    ('id = "a"\ncommand = ["python", ""]', "command"),
    ('id = "a"\npermissions = "all"', "permissions"),
    ('id = "a"\n[permissions]\npublish = "market.>"', "permissions.publish"),
    ('id = "a"\n[permissions]\nsubscribe = [1]', "permissions.subscribe"),
    ('id = "a"\n[permissions]\nrequest = "x"', "permissions.request"),
    ('id = "a"\n[permissions]\nask = "clipboard"', "permissions.ask"),
    ('id = "a"\n[permissions]\npublish = ["a.>.b"]', "permissions.publish"),
    ('id = "a"\n[permissions]\nsubscribe = ["a*"]', "permissions.subscribe"),
    ('id = "a"\n[permissions]\nsubscribe = ["a..b"]', "permissions.subscribe"),
    ('id = "a"\n[permissions]\nrequest = ["a b"]', "permissions.request"),
    ('id = "a"\n[permissions]\nadmin = ["x"]', "permissions.admin"),
    ('id = "a"\ncolour = "red"', "colour"),
    ('id = "a"\n[extra]\nx = 1', "extra"),
    ('id = "a"\n[limits]\nmemory_mb = -1', "limits.memory_mb"),
    ('id = "a"\n[limits]\nmemory_mb = 0', "limits.memory_mb"),
    ('id = "a"\n[limits]\nmemory_mb = "100"', "limits.memory_mb"),
    ('id = "a"\n[limits]\nmemory_mb = 1.5', "limits.memory_mb"),
    ('id = "a"\n[limits]\ncpu_percent = -90', "limits.cpu_percent"),
    ('id = "a"\n[limits]\ncpu_percent = true', "limits.cpu_percent"),
    ('id = "a"\nlimits = 5', "limits"),
    ('id = "a"\nenv = ["A=1"]', "env"),
    ('id = "a"\n[env]\nA = 1', "env.A"),
    ('id = "a"\n[env]\nA = ["x"]', "env.A"),
    ('id = "a"\n[env.A]\nB = "x"', "env.A"),
    ('id = "a"\n[env]\n"A=B" = "x"', "env.A=B"),
    ('id = "a"\n[env]\n"=A" = "x"', "env.=A"),
    ('id = "a"\n[env]\n"" = "x"', "env"),
    ('id = "a"\n[env]\n"A\\u0000B" = "x"', "env.'A\\x00B'"),
    ('id = "a"\n[env]\nA = "x\\u0000y"', "env.A"),
    ('id = "a"\ncommand = []', "command"),
    ('id = "a"\ncommand = "python -m app"', "command"),
    ('id = "a"\ncommand = ["python", 3]', "command"),
    ('id = "a"\ncommand = ["python", ""]', "command"),
    ('id = "a"\ncommand = ["python", "a\\u0000b"]', "command[1]"),
    ('id = "a"\n[limits]\nmemory_mb = 1048577', "limits.memory_mb"),
    ('id = "a"\n[limits]\ncpu_percent = 25601', "limits.cpu_percent"),
    ('id = "a"\n[limits]\ncpu_percent = 0', "limits.cpu_percent"),
    ('id = "a"\n[limits]\ncpu_percent = 9999999999999999999', "limits.cpu_percent"),
    ('id = "a"\nafter = "b"', "after"),
    ('id = "a"\nafter = [""]', "after"),
]

INVALID_TOML = ['id = "a', 'id = "a"\nid = "b"', "[permissions\n"]


@pytest.mark.parametrize(("text", "field"), BAD_FIELDS)
def test_bad_field(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, "bad.toml", text + "\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    error = info.value
    assert error.path == str(path)
    assert error.field == field
    assert str(path) in str(error)
    assert f"field '{field}'" in str(error)
    assert error.fix and error.problem


@pytest.mark.parametrize("text", INVALID_TOML)
def test_invalid_toml_names_the_line_not_a_field(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "bad.toml", text + "\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.field is None
    assert "field" not in str(info.value)
    assert "line" in str(info.value)  # tomllib's position, so the user can find it


def test_invalid_utf8_is_a_manifest_error(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b'id = "\xff"\n')
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.field is None


def test_missing_apps_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifests(tmp_path / "nowhere")
    assert info.value.field is None
    assert "does not exist" in str(info.value)
    assert "field" not in str(info.value)
    assert "--apps" in info.value.fix


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "nope.toml")
    assert info.value.path == str(tmp_path / "nope.toml")


def test_id_with_trailing_newline_is_rejected(tmp_path: Path) -> None:
    # APP_ID.match with a `$` anchor also accepts "ticker\n"; an app id with a newline
    # then reaches ZAP, credential files and log lines.
    with pytest.raises(ManifestError) as info:
        parse_manifest(tmp_path / "t.toml", {"id": "ticker\n"})
    assert info.value.field == "id"
    path = write(tmp_path, "t.toml", 'id = "ticker\\n"\n')
    with pytest.raises(ManifestError):
        load_manifest(path)


def test_unknown_limits_key_is_rejected(tmp_path: Path) -> None:
    # Unknown top-level and [permissions] keys are errors, but a typo in [limits]
    # (memory = 100, memory_MB = 100) is silently ignored and the app runs unlimited.
    path = write(tmp_path, "a.toml", 'id = "a"\n[limits]\nmemory = 100\n')
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.field == "limits.memory"


def test_duplicate_ids_in_directory(tmp_path: Path) -> None:
    first = write(tmp_path, "a.toml", 'id = "same"\n')
    second = write(tmp_path, "b.toml", 'id = "same"\n')
    with pytest.raises(ManifestError) as info:
        load_manifests(tmp_path)
    error = info.value
    assert error.field == "id"
    assert error.path == str(second)
    assert str(first) in str(error)  # names the other file too


def test_unknown_after(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", 'id = "a"\n')
    path = write(tmp_path, "b.toml", 'id = "b"\nafter = ["a", "ghost"]\n')
    with pytest.raises(ManifestError) as info:
        load_manifests(tmp_path)
    assert info.value.field == "after"
    assert info.value.path == str(path)
    assert "ghost" in str(info.value)


def test_bad_file_in_directory_names_that_file(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", 'id = "a"\n')
    path = write(tmp_path, "b.toml", 'id = "b"\nrestart = "maybe"\n')
    with pytest.raises(ManifestError) as info:
        load_manifests(tmp_path)
    assert (info.value.path, info.value.field) == (str(path), "restart")


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifests(tmp_path / "missing")
    assert info.value.path == str(tmp_path / "missing")
    path = write(tmp_path, "file.toml", 'id = "a"\n')
    with pytest.raises(ManifestError):
        load_manifests(path)


def test_empty_directory(tmp_path: Path) -> None:
    assert load_manifests(tmp_path) == {}


# -- the catalog (permissions by id, for the broker and the query socket) ------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def test_catalog_answers_permissions_and_none_without_a_manifest(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", 'id = "a"\n[permissions]\nsubscribe = ["t.>"]\n')
    catalog = ManifestCatalog(tmp_path, _Clock())
    found = catalog.permissions("a")
    assert found is not None
    assert found.subscribe == ("t.>",)
    assert catalog.permissions("ghost") is None
    assert ManifestCatalog(None).permissions("a") is None


def test_catalog_sees_a_new_manifest_when_the_directory_changes(tmp_path: Path) -> None:
    clock = _Clock()
    catalog = ManifestCatalog(tmp_path, clock)
    assert catalog.permissions("late") is None
    write(tmp_path, "late.toml", 'id = "late"\n')  # the dir's mtime moves: seen at once
    assert catalog.permissions("late") is not None


def test_catalog_rereads_an_unchanged_directory_at_most_once_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    scans: list[Path] = []

    def counting(directory: Path) -> dict[str, Manifest]:
        scans.append(directory)
        return load_manifests(directory)

    monkeypatch.setattr("broker.catalog.load_manifests", counting)
    catalog = ManifestCatalog(tmp_path, clock)
    assert len(scans) == 1
    for _ in range(100):
        assert catalog.permissions("unknown") is None
    assert len(scans) == 1
    clock.now += catalog_module.RESCAN_INTERVAL_NS
    assert catalog.permissions("unknown") is None
    assert len(scans) == 2


def test_catalog_keeps_the_last_good_manifests_when_the_directory_turns_invalid(
    tmp_path: Path,
) -> None:
    clock = _Clock()
    write(tmp_path, "a.toml", 'id = "a"\n')
    catalog = ManifestCatalog(tmp_path, clock)
    write(tmp_path, "b.toml", 'id = "b"\nrestart = "maybe"\n')
    assert catalog.permissions("b") is None  # re-read, refused, logged
    assert catalog.permissions("a") is not None
