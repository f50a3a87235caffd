"""The `knitwatch` command itself (`--version`, `--help`, `config check`, the log format), run as a user runs
it: a real subprocess."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from tests.helpers.cli import knitwatch
from tests.helpers.paths import EXAMPLE_CONFIG


def test_version_and_help() -> None:
    r = knitwatch("--version")
    assert r.returncode == 0 and r.stdout.startswith("knitwatch ")
    r = knitwatch("--help")
    assert r.returncode == 0
    assert "config" in r.stdout and "KNITWATCH_<SECTION>__<KEY>" in r.stdout


def test_config_check_prints_effective_settings_as_toml() -> None:
    r = knitwatch("config", "check", "--config", str(EXAMPLE_CONFIG), env={"KNITWATCH_API__PORT": "9123"})
    assert r.returncode == 0, r.stderr
    effective = tomllib.loads(r.stdout)  # the printout is itself a valid config
    assert effective["api"]["port"] == 9123
    assert effective["plc"]["host"] == "192.168.1.10"
    assert effective["cameras"][0]["simulator"]["random_defect_rate"] == 0.01


def test_config_check_json_and_global_config_option() -> None:
    r = knitwatch("--config", str(EXAMPLE_CONFIG), "config", "check", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["store"]["retention_days"] == 30


def test_bad_config_exits_2_naming_each_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[alert]\nmin_area = 5\n[api]\nport = "x"\n')
    r = knitwatch("config", "check", "--config", str(bad))
    assert r.returncode == 2
    assert "alert.min_area = 5" in r.stderr and "unknown key" in r.stderr
    assert "api.port = 'x'" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_env_exits_2() -> None:
    r = knitwatch("config", "check", "--config", str(EXAMPLE_CONFIG), env={"KNITWATCH_INFERENCE__DEVICE": "tpu"})
    assert r.returncode == 2
    assert "inference.device = 'tpu'" in r.stderr and "KNITWATCH_INFERENCE__DEVICE" in r.stderr
    assert "Traceback" not in r.stderr


def test_json_logs_carry_stage() -> None:
    r = knitwatch("--log-format", "json", "config", "check", "--config", str(EXAMPLE_CONFIG))
    assert r.returncode == 0
    records = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert records and all(rec["stage"] == "cli" for rec in records)
    assert records[-1]["event"] == "configuration is valid"
