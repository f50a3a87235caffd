"""The key files named in the configuration, read as the daemon and a worker will read them: for
``knitwatch config check`` (a problem is a named error, exit 2) and ``knitwatch doctor`` (a FAIL line).

- ``[inference] server_secret_key`` and ``worker_secret_key``: readable, a key pair (a public ``NAME.key``
  where the secret ``NAME.key_secret`` belongs is an error), not readable by other users (mode 0600;
  readable by the group: a warning);
- ``[inference] server_public_key``: readable, a public key; a file that holds a secret key is an error
  (a worker needs only the daemon's public key: its secret never leaves the daemon's host);
- ``[inference] authorized_keys_dir``: a folder of public worker keys only;
- ``[api] token_file``: readable, a usable token; readable by other users: a warning;
- the tiles/results endpoints: ``tcp://`` needs the keys above (or ``allow_insecure_tcp``).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knitwatch.pipeline.security import (
    SECRET_SUFFIX,
    LinkSecurityError,
    check_daemon_links,
    read_authorized_keys,
    read_key_file,
    read_secret_key_file,
)


@dataclass(frozen=True)
class KeyCheck:
    field: str  # the setting, e.g. inference.server_secret_key
    status: str  # OK | WARN | FAIL
    detail: str
    fix: str = ""


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _secret(field: str, path: Path) -> KeyCheck:
    try:
        read_secret_key_file(path)
    except LinkSecurityError as e:
        fix = (f"chmod 600 {path}" if "readable by other users" in str(e) else
               f"give the secret NAME{SECRET_SUFFIX} file made by 'knitwatch keys generate', readable by user "
               "knitwatch")
        return KeyCheck(field, "FAIL", str(e), fix)
    mode = _mode(path) or 0
    if mode & 0o070:
        return KeyCheck(field, "WARN", f"secret key file {path} is readable by its group (mode {mode:04o})",
                        f"chmod 600 {path}")
    return KeyCheck(field, "OK", f"{path}: key pair, mode {mode:04o}")


def _public(field: str, path: Path) -> KeyCheck:
    try:
        pair = read_key_file(path)
    except LinkSecurityError as e:
        return KeyCheck(field, "FAIL", str(e),
                        "give the daemon's public NAME.key file made by 'knitwatch keys generate'")
    if pair.secret is not None or path.name.endswith(SECRET_SUFFIX):
        return KeyCheck(field, "FAIL", f"{path} holds a secret key where the daemon's public key belongs",
                        "copy only the daemon's public NAME.key to the worker (its secret never leaves the daemon)")
    return KeyCheck(field, "OK", f"{path}: public key")


def key_file_checks(settings: Any) -> list[KeyCheck]:  # noqa: ANN401 - knitwatch.config.Settings
    """One check per key file the configuration names (none: an empty list), and one for the worker links'
    security when a tiles/results endpoint is configured."""
    inf = settings.inference
    out: list[KeyCheck] = []
    for name in ("server_secret_key", "worker_secret_key"):
        path = getattr(inf, name)
        if path is not None:
            out.append(_secret(f"inference.{name}", Path(path)))
    if inf.server_public_key is not None:
        out.append(_public("inference.server_public_key", Path(inf.server_public_key)))
    if inf.authorized_keys_dir is not None:
        try:
            keys = read_authorized_keys(inf.authorized_keys_dir)
        except LinkSecurityError as e:
            out.append(KeyCheck("inference.authorized_keys_dir", "FAIL", str(e),
                                "a folder of the workers' public NAME.key files, readable by user knitwatch"))
        else:
            out.append(KeyCheck("inference.authorized_keys_dir", "OK",
                                f"{inf.authorized_keys_dir}: {len(keys)} worker key(s)"))
    if inf.tiles_endpoint or inf.results_endpoint:
        try:
            mode = check_daemon_links(inf)
        except LinkSecurityError as e:
            out.append(KeyCheck("inference links", "FAIL", str(e), "see README 'Running the daemon' (worker keys)"))
        else:
            out.append(KeyCheck("inference links", "WARN" if mode == "insecure" else "OK", f"worker links: {mode}",
                                "make keys with 'knitwatch keys generate'" if mode == "insecure" else ""))
    if settings.api.token_file is not None:
        out.append(_token_file(Path(settings.api.token_file), settings.api))
    return out


def _token_file(path: Path, api: Any) -> KeyCheck:  # noqa: ANN401
    from knitwatch.daemon.api.security import ApiError, load_token

    try:
        load_token(api)
    except ApiError as e:
        return KeyCheck("api.token_file", "FAIL", str(e), "a file readable by user knitwatch holding the token")
    mode = _mode(path) or 0
    if mode & 0o007:
        return KeyCheck("api.token_file", "WARN", f"token file {path} is readable by other users (mode {mode:04o})",
                        f"chmod 600 {path}")
    return KeyCheck("api.token_file", "OK", f"{path}: token, mode {mode:04o}")
