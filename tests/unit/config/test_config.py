from __future__ import annotations

from pathlib import Path

import pytest

from knitwatch.config import ConfigError, Settings, load_settings
from tests.helpers.paths import EXAMPLE_CONFIG


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "k.toml"
    p.write_text(text)
    return p


def test_example_config_loads_and_differs_from_defaults() -> None:
    s = load_settings(EXAMPLE_CONFIG)
    assert s.cameras[0].id == "cam0"
    assert s.plc.host == "192.168.1.10"  # from the file, not the default
    assert s.cameras[0].simulator.random_defect_rate == pytest.approx(0.01)
    assert Settings().plc.host == "127.0.0.1"


def test_defaults_without_file(tmp_path: Path) -> None:
    s = load_settings(None, use_default_path=False)
    assert s.api.host == "127.0.0.1"
    assert [c.id for c in s.cameras] == ["cam0"]


def test_typo_key_is_named(tmp_path: Path) -> None:
    p = write(tmp_path, "[alert]\nconfirm_kk = 2\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(p)
    (problem,) = ei.value.problems
    assert problem.key == "alert.confirm_kk"
    assert problem.value == 2
    assert "unknown key" in problem.message


def test_wrong_type_and_range_are_each_named(tmp_path: Path) -> None:
    p = write(tmp_path, '[api]\nport = "eighty"\n[inference]\nmax_batch_tiles = 0\n')
    with pytest.raises(ConfigError) as ei:
        load_settings(p)
    keys = {p.key: p for p in ei.value.problems}
    assert set(keys) == {"api.port", "inference.max_batch_tiles"}
    assert keys["api.port"].value == "eighty"
    assert keys["inference.max_batch_tiles"].value == 0


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "[api]\nport = 9000\n[plc]\ndriver = 'modbus'\n")
    monkeypatch.setenv("KNITWATCH_API__PORT", "9100")
    s = load_settings(p)
    assert s.api.port == 9100  # env wins over file
    assert s.plc.driver == "modbus"  # file wins over default


def test_env_list_section_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNITWATCH_CAMERAS", '[{"id": "a"}, {"id": "b", "fps": 5}]')
    s = load_settings(None, use_default_path=False)
    assert [c.id for c in s.cameras] == ["a", "b"]
    assert s.cameras[1].fps == 5


def test_bad_env_value_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNITWATCH_API__PORT", "70000")
    with pytest.raises(ConfigError) as ei:
        load_settings(None, use_default_path=False)
    (problem,) = ei.value.problems
    assert problem.key == "api.port"
    assert "KNITWATCH_API__PORT" in problem.source


def test_unknown_env_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNITWATCH_ALRET__MIN_AREA_PX", "3")
    with pytest.raises(ConfigError) as ei:
        load_settings(None, use_default_path=False)
    assert ei.value.problems[0].key == "KNITWATCH_ALRET__MIN_AREA_PX"


def test_cross_field_rules(tmp_path: Path) -> None:
    bad = [
        ("[alert]\nconfirm_k = 4\nconfirm_n = 3\n", "alert"),
        ("[api]\nhost = '0.0.0.0'\n", "api"),
        ("[[cameras]]\nid = 'a'\n[[cameras]]\nid = 'a'\n", "cameras"),
        ("[[cameras]]\nid = 'a'\nsource = 'opencv'\n", "cameras.0"),
    ]
    for text, key in bad:
        with pytest.raises(ConfigError) as ei:
            load_settings(write(tmp_path, text))
        assert ei.value.problems[0].key == key, text
    ok = load_settings(write(tmp_path, "[api]\nhost = '0.0.0.0'\ntoken = 'secret-0123456789abcdef'\n"))
    assert ok.api.host == "0.0.0.0"


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[api\nport = 1\n"))


@pytest.mark.parametrize("text, key", [
    ("[store]\nretention_days = inf\n", "store.retention_days"),  # on main: the alert stage crash-looped
    ("[store]\nmax_gb = inf\n", "store.max_gb"),
    ("[alert]\npixel_threshold = nan\n", "alert.pixel_threshold"),  # on main: nothing detected, health green
    ("[alert]\nimage_threshold = -inf\n", "alert.image_threshold"),
    ("[[cameras]]\nid = 'a'\npixel_threshold = nan\n", "cameras.0.pixel_threshold"),
    ("[daemon]\nstall_s = inf\n", "daemon.stall_s"),
    ("[inference]\nmax_wait_ms = nan\n", "inference.max_wait_ms"),
])
def test_non_finite_numbers_are_named_errors(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_settings(write(tmp_path, text))
    (problem,) = ei.value.problems
    assert problem.key == key
    assert "finite" in problem.message


def test_every_float_setting_rejects_inf_and_nan() -> None:
    """No float setting of any section takes inf or nan (one rule for all, present and future)."""
    import math

    from pydantic import BaseModel, ValidationError

    from knitwatch.config import settings as mod

    sections = [c for c in vars(mod).values()
                if isinstance(c, type) and issubclass(c, mod.Section) and c is not mod.Section]
    checked = 0
    for cls in sections:
        for name, field in cls.model_fields.items():
            if "float" not in str(field.annotation):
                continue
            for bad in (math.inf, -math.inf, math.nan):
                with pytest.raises(ValidationError, match="finite"):
                    cls.__pydantic_validator__.validate_assignment(cls.model_construct(), name, bad)
                checked += 1
    assert checked >= 3 * 20
    assert all(issubclass(c, BaseModel) for c in sections)


@pytest.mark.parametrize("name, value", [
    ("KNITWATCH_CAMERAS", "x"),  # on main: a traceback and exit 1
    ("KNITWATCH_API", "{not json"),
    ("KNITWATCH_ALERT__SEVERITY", "x"),
])
def test_unparsable_env_value_is_a_named_error(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as ei:
        load_settings(None, use_default_path=False)
    (problem,) = ei.value.problems
    assert name in problem.source and problem.value == value
    assert "JSON" in problem.message


def test_inf_from_env_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNITWATCH_STORE__MAX_GB", "inf")
    with pytest.raises(ConfigError) as ei:
        load_settings(None, use_default_path=False)
    (problem,) = ei.value.problems
    assert problem.key == "store.max_gb" and "KNITWATCH_STORE__MAX_GB" in problem.source


@pytest.mark.parametrize("env", [{"KNITWATCH_CAMERAS": "x"}, {"KNITWATCH_ALERT__PIXEL_THRESHOLD": "nan"},
                                 {"KNITWATCH_STORE__RETENTION_DAYS": "inf"}])
def test_config_check_names_a_bad_env_variable_and_exits_2(env: dict[str, str]) -> None:
    """`knitwatch config check` as a user runs it; on main KNITWATCH_CAMERAS=x ended in a traceback, exit 1."""
    from tests.helpers.cli import knitwatch

    r = knitwatch("config", "check", env=env, timeout=120)
    (name,) = env
    assert r.returncode == 2, r.stderr
    assert name in r.stderr and "Traceback" not in r.stderr
