"""The systemd unit: parsed and checked key by key, and verified by ``systemd-analyze verify`` (and
rated by ``systemd-analyze security --offline``) when systemd's tools are installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

UNIT = ROOT / "systemd" / "knitwatch.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: sections, repeated keys kept in order, comments and continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        m = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_has_the_keys_the_issue_asks_for() -> None:
    u = parse_unit(UNIT.read_text())
    unit, svc, inst = u["Unit"], u["Service"], u["Install"]
    one = {k: v[-1] for k, v in svc.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert int(one["WatchdogSec"]) >= 30
    assert one["Restart"] == "on-failure"
    assert int(unit["StartLimitBurst"][-1]) >= 1 and int(unit["StartLimitIntervalSec"][-1]) > 0
    assert one["StateDirectory"] == one["RuntimeDirectory"] == one["LogsDirectory"] == "knitwatch"
    for key in ("ProtectSystem",):
        assert one[key] == "strict"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality"):
        assert one[key] == "yes", key
    assert one["User"] == "knitwatch" and one["SupplementaryGroups"].split() == ["video", "render"]
    assert one["KillMode"] == "mixed"  # SIGTERM to the supervisor only: it orders the shutdown
    assert one["DevicePolicy"] == "closed"
    allowed = " ".join(svc["DeviceAllow"])
    for dev in ("char-video4linux", "/dev/nvidiactl", "/dev/nvidia-uvm", "char-nvidia-frontend"):
        assert dev in allowed, dev
    assert "PrivateDevices" not in svc  # it would hide the cameras and the GPU
    exec_start = one["ExecStart"].split()
    assert exec_start[0].endswith("/knitwatch") and "run" in exec_start and "--config" in exec_start
    assert "multi-user.target" in inst["WantedBy"]


def test_exec_start_matches_the_cli() -> None:
    """The command line in ExecStart is one the CLI accepts."""
    from knitwatch.daemon.cli.main import build_parser

    argv = parse_unit(UNIT.read_text())["Service"]["ExecStart"][-1].split()[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "run" and args.log_format == "json" and str(args.config) == "/etc/knitwatch/knitwatch.toml"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this environment's knitwatch
    exe = Path(sys.executable).parent / "knitwatch"
    if not exe.exists():
        exe = Path(shutil.which("knitwatch") or "/bin/true")
    text = UNIT.read_text().replace("/opt/knitwatch/venv/bin/knitwatch", str(exe))
    unit = tmp_path / "knitwatch.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys or bad values, but names them: nothing about our unit may be said
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if "knitwatch.service" in ln]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr
    # the check itself works: a typo is reported
    bad = tmp_path / "bad" / "knitwatch.service"
    bad.parent.mkdir()
    bad.write_text(text.replace("WatchdogSec=", "WatchdogSek="))
    r = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "WatchdogSek" in r.stdout + r.stderr
    # exposure rating (systemd >= 252): hardened
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True,
                       timeout=60)
    m = re.search(r"Overall exposure level for knitwatch\.service: ([\d.]+)", r.stdout + r.stderr)
    if m is not None:
        assert float(m.group(1)) <= 4.0, r.stdout[-2000:]
