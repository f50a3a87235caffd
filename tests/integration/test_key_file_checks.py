"""``knitwatch config check`` and ``knitwatch doctor`` read the key files the configuration names as the
daemon and a worker will: a public key where the secret belongs, a secret key readable by other users, a
secret key where the daemon's public key belongs, a missing file - each a named error (config check: exit
2, nothing on stdout; doctor: a FAIL line with the fix)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from knitwatch.pipeline.security import generate_keys
from tests.helpers.cli import knitwatch


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    pub, sec = generate_keys(tmp_path / "keys", "daemon")
    wpub, wsec = generate_keys(tmp_path / "keys", "w1")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "w1.key").write_bytes(wpub.read_bytes())
    return {"pub": pub, "sec": sec, "wpub": wpub, "wsec": wsec, "authorized": authorized}


def config(tmp_path: Path, **inference: Path | str) -> Path:
    path = tmp_path / "knitwatch.toml"
    lines = ["[inference]", 'tiles_endpoint = "tcp://127.0.0.1:5601"', 'results_endpoint = "tcp://127.0.0.1:5602"']
    lines += [f'{k} = "{v}"' for k, v in inference.items()]
    path.write_text("\n".join(lines) + f'\n[store]\npath = "{tmp_path / "store"}"\n')
    return path


def test_good_keys_pass(tmp_path: Path, keys: dict[str, Path]) -> None:
    cfg = config(tmp_path, server_secret_key=keys["sec"], authorized_keys_dir=keys["authorized"])
    r = knitwatch("config", "check", "--config", str(cfg), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "server_secret_key" in r.stdout and "warning" not in r.stderr


@pytest.mark.parametrize(("case", "expect"), [
    ("public_as_secret", "holds no secret key"),
    ("secret_world_readable", "readable by other users"),
    ("missing", "cannot read key file"),
])
def test_bad_server_secret_is_a_named_error(tmp_path: Path, keys: dict[str, Path], case: str, expect: str) -> None:
    path = {"public_as_secret": keys["pub"], "secret_world_readable": keys["sec"],
            "missing": tmp_path / "nope.key_secret"}[case]
    if case == "secret_world_readable":
        os.chmod(keys["sec"], 0o644)
    cfg = config(tmp_path, server_secret_key=path, authorized_keys_dir=keys["authorized"])
    r = knitwatch("config", "check", "--config", str(cfg), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "inference.server_secret_key" in r.stderr and expect in r.stderr and str(path) in r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    if case == "secret_world_readable":
        assert f"chmod 600 {path}" in r.stderr


def test_worker_side_keys(tmp_path: Path, keys: dict[str, Path]) -> None:
    # the daemon's secret key given to a worker as "the daemon's public key"; a worker key pair readable by its group
    os.chmod(keys["wsec"], 0o640)
    cfg = config(tmp_path, worker_secret_key=keys["wsec"], server_public_key=keys["sec"],
                 server_secret_key=keys["sec"], authorized_keys_dir=keys["authorized"])
    r = knitwatch("config", "check", "--config", str(cfg), timeout=60)
    assert r.returncode == 2
    assert "inference.server_public_key" in r.stderr and "holds a secret key" in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("  - ")]
    assert len(errors) == 1 and "inference.server_public_key" in errors[0]  # group-readable: only a warning
    cfg = config(tmp_path, worker_secret_key=keys["wsec"], server_public_key=keys["pub"],
                 server_secret_key=keys["sec"], authorized_keys_dir=keys["authorized"])
    r = knitwatch("config", "check", "--config", str(cfg), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "warning: inference.worker_secret_key" in r.stderr and "readable by its group" in r.stderr


def test_secret_key_in_authorized_folder_and_doctor(tmp_path: Path, keys: dict[str, Path]) -> None:
    (keys["authorized"] / "daemon.key_secret").write_bytes(keys["sec"].read_bytes())
    cfg = config(tmp_path, server_secret_key=keys["pub"], authorized_keys_dir=keys["authorized"])
    r = knitwatch("config", "check", "--config", str(cfg), timeout=60)
    assert r.returncode == 2 and "inference.authorized_keys_dir" in r.stderr and "holds a secret key" in r.stderr
    r = knitwatch("doctor", "--config", str(cfg), "--json", "--camera-timeout", "2", timeout=120)
    assert r.returncode == 1
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert checks["inference.server_secret_key"]["status"] == "FAIL"
    assert "holds no secret key" in checks["inference.server_secret_key"]["detail"]
    assert checks["inference.server_secret_key"]["fix"]
    assert checks["inference.authorized_keys_dir"]["status"] == "FAIL"
    assert checks["inference links"]["status"] == "FAIL"
