"""CURVE security of the worker links: the tiles and results endpoints when they are ``tcp://``.

Over ``tcp://`` an inference worker on another host takes tiles from the tiler and sends results to
the alert stage, which may stop the machine. Without security any host that reaches those ports can
take tiles (frames then go uninspected) and send results (forged defects stop the machine). So a
``tcp://`` link is secured with ZeroMQ's CURVE mechanism (CurveZMQ: elliptic-curve key exchange,
every message encrypted and authenticated):

- the daemon side (the tiler and the alert stage, which *bind*) is the CURVE server with the
  daemon's key pair (``[inference] server_secret_key``); a ZAP authenticator thread in each of those
  processes admits a client only when its public key is one of the files in
  ``[inference] authorized_keys_dir`` (re-read when a file is added or removed there) or the
  daemon's own (the inference workers the daemon starts on its own host use the daemon's key pair);
- a worker (which *connects*) is a CURVE client with its own key pair
  (``[inference] worker_secret_key``, else the daemon's) and the daemon's public key
  (``[inference] server_public_key``, else the public half of ``server_secret_key``).

A peer without keys, or with a key that is not authorised, never completes the handshake: it gets
no tiles and nothing it sends reaches a stage. ``ipc://`` endpoints (one host; the socket files are
protected by the runtime folder's permissions) are never secured. A ``tcp://`` endpoint without keys
is refused (:class:`LinkSecurityError`) unless ``allow_insecure_tcp`` is set, which is logged as
insecure by every process that binds or connects such an endpoint.

Key files are ZeroMQ certificates (the format of czmq and pyzmq's ``zmq.auth``): ``NAME.key`` holds
the public key, ``NAME.key_secret`` the public and the secret key (mode 0600).
:func:`generate_keys` writes a pair (``knitwatch keys generate``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from knitwatch.config.settings import InferenceConfig

log = structlog.get_logger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY_LINE = re.compile(r'^\s*(public|secret)-key\s*=\s*"?([^"\s]*)"?\s*$')
_MAX_KEY_FILE = 64 * 1024


class LinkSecurityError(Exception):
    """A worker link cannot be secured as configured (missing or bad keys); the message says what to do."""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair read from a key file (Z85 text, as ZeroMQ's socket options take it)."""

    public: bytes
    secret: bytes | None
    path: Path


def _z85_key(text: str, what: str, path: Path) -> bytes:
    if not text.isascii():
        raise LinkSecurityError(f"key file {path}: the {what} key is not valid Z85 text")
    raw = text.encode("ascii")
    if len(raw) != 40:
        raise LinkSecurityError(f"key file {path}: the {what} key must be 40 Z85 characters, it has {len(raw)}")
    try:
        if len(z85.decode(raw)) != 32:
            raise ValueError
    except (ValueError, KeyError, IndexError):
        raise LinkSecurityError(f"key file {path}: the {what} key is not valid Z85 text") from None
    return raw


def read_key_file(path: Path | str, *, need_secret: bool = False) -> KeyPair:
    """The key(s) in a key file; :class:`LinkSecurityError` naming the file when it cannot be read,
    is not a key file, lacks the secret key (``need_secret``) or its secret and public keys differ."""
    path = Path(path)
    try:
        if path.is_dir():
            raise LinkSecurityError(f"key file {path} is a folder, not a key file")
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise LinkSecurityError(f"cannot read key file {path}: {e.strerror or e}") from None
    if len(data) > _MAX_KEY_FILE:
        raise LinkSecurityError(f"key file {path} is too large to be a key file")
    found: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        m = _KEY_LINE.match(line)
        if m:
            found[m.group(1)] = m.group(2)
    if "public" not in found:
        raise LinkSecurityError(f"{path} is not a key file (no 'public-key = ...' line; make keys with "
                                "'knitwatch keys generate')")
    public = _z85_key(found["public"], "public", path)
    secret = None
    if "secret" in found:
        secret = _z85_key(found["secret"], "secret", path)
        if zmq.curve_public(secret) != public:
            raise LinkSecurityError(f"key file {path}: its public key does not belong to its secret key")
    elif need_secret:
        raise LinkSecurityError(f"key file {path} holds no secret key: give the NAME{SECRET_SUFFIX} file of "
                                "'knitwatch keys generate', not the public NAME.key")
    return KeyPair(public, secret, path)


def read_secret_key_file(path: Path | str) -> KeyPair:
    """A key pair from a secret key file; refused when other users may read the file."""
    pair = read_key_file(path, need_secret=True)
    try:
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError as e:  # pragma: no cover - it was just read
        raise LinkSecurityError(f"cannot read key file {path}: {e.strerror or e}") from None
    if mode & 0o007:
        raise LinkSecurityError(f"secret key file {path} is readable by other users (mode {mode:04o}): "
                                f"run chmod 600 {path}")
    if mode & 0o070:
        log.warning("secret key file is readable by its group", file=str(path), mode=f"{mode:04o}")
    return pair


def read_authorized_keys(folder: Path | str) -> dict[bytes, str]:
    """The public keys of the ``*.key`` files in ``folder`` -> the file's name (without ``.key``).
    :class:`LinkSecurityError` when the folder cannot be read, a file is no key file, or a file there
    holds a secret key (only public keys belong in it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LinkSecurityError(f"authorized keys folder {folder} does not exist or is not a folder")
    try:
        files = sorted(p for p in folder.iterdir() if p.name.endswith((PUBLIC_SUFFIX, SECRET_SUFFIX)))
    except OSError as e:
        raise LinkSecurityError(f"cannot read authorized keys folder {folder}: {e.strerror or e}") from None
    keys: dict[bytes, str] = {}
    for p in files:
        pair = read_key_file(p)
        if pair.secret is not None or p.name.endswith(SECRET_SUFFIX):
            raise LinkSecurityError(f"{p} holds a secret key: only the workers' public NAME{PUBLIC_SUFFIX} files "
                                    "belong in the authorized keys folder (a secret key never leaves its host)")
        keys[pair.public] = p.name[: -len(PUBLIC_SUFFIX)]
    return keys


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` with ``mode`` (never replacing a file) and write ``text``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keys(out_dir: Path | str, name: str) -> tuple[Path, Path]:
    """Write a new key pair: ``out_dir/NAME.key`` (public, 0644) and ``out_dir/NAME.key_secret``
    (public and secret, 0600); ``out_dir`` is made (0700) when missing. Never overwrites a file:
    :class:`LinkSecurityError` when either exists."""
    if not KEY_NAME.match(name):
        raise LinkSecurityError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not starting "
                                "with '.', '_' or '-')")
    out = Path(out_dir)
    public_path, secret_path = out / f"{name}{PUBLIC_SUFFIX}", out / f"{name}{SECRET_SUFFIX}"
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise LinkSecurityError(f"cannot create folder {out}: {e.strerror or e}") from None
    for p in (public_path, secret_path):
        if p.exists() or p.is_symlink():
            raise LinkSecurityError(f"{p} exists: not overwritten (remove it first, or choose another --name)")
    public, secret = zmq.curve_keypair()
    when = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    body = f'metadata\n    name = "{name}"\ncurve\n    public-key = "{public.decode()}"\n'
    try:
        _write_new(secret_path, f"#   knitwatch CURVE key pair {name!r}, made {when}\n"
                                "#   SECRET: keep it on this host, mode 0600; give others only the .key file.\n\n"
                                f'{body}    secret-key = "{secret.decode()}"\n', 0o600)
        _write_new(public_path, f"#   knitwatch CURVE public key {name!r}, made {when}\n"
                                "#   Public: copy it to the other side (see README, 'Running the daemon').\n\n"
                                f"{body}", 0o644)
    except FileExistsError as e:
        raise LinkSecurityError(f"{e.filename} exists: not overwritten") from None
    except OSError as e:
        raise LinkSecurityError(f"cannot write key file in {out}: {e.strerror or e}") from None
    return public_path, secret_path


# ---------------------------------------------------------------- which keys a process uses


def _insecure_error(endpoint: str, needs: str) -> LinkSecurityError:
    return LinkSecurityError(
        f"insecure worker link: {endpoint} is tcp:// but {needs}; any host that reaches it could take tiles "
        "and send forged results that stop the machine. Make keys with 'knitwatch keys generate' (README, "
        "'Running the daemon'), or set [inference] allow_insecure_tcp = true on an isolated trusted network")


def server_keys(cfg: InferenceConfig, endpoint: str) -> tuple[KeyPair, dict[bytes, str]] | None:
    """The daemon's key pair and the authorised workers' keys for binding ``endpoint``; None when it
    needs no security (``ipc://``, or no keys and ``allow_insecure_tcp``)."""
    if not endpoint.startswith("tcp://"):
        return None
    if cfg.server_secret_key is None or cfg.authorized_keys_dir is None:
        if cfg.allow_insecure_tcp and cfg.server_secret_key is None:
            return None
        missing = [k for k in ("server_secret_key", "authorized_keys_dir") if getattr(cfg, k) is None]
        raise _insecure_error(endpoint, f"[inference] {' and '.join(missing)} not set")
    return read_secret_key_file(cfg.server_secret_key), read_authorized_keys(cfg.authorized_keys_dir)


def client_keys(cfg: InferenceConfig, endpoint: str) -> tuple[KeyPair, bytes] | None:
    """A worker's key pair and the daemon's public key for connecting to ``endpoint``; None when it
    needs no security (``ipc://``, or no keys and ``allow_insecure_tcp``)."""
    if not endpoint.startswith("tcp://"):
        return None
    own_path = cfg.worker_secret_key or cfg.server_secret_key
    server_path = cfg.server_public_key or cfg.server_secret_key
    if own_path is None or server_path is None:
        if cfg.allow_insecure_tcp and own_path is None and server_path is None:
            return None
        missing = ([] if own_path else ["worker_secret_key (this worker's key pair)"]) + (
            [] if server_path else ["server_public_key (the daemon's public key)"])
        raise _insecure_error(endpoint, f"[inference] {' and '.join(missing)} not set")
    return read_secret_key_file(own_path), read_key_file(server_path).public


def check_links(cfg: InferenceConfig, endpoints: list[str], *, bind: bool) -> str:
    """Check at start, before any process is spawned, that ``endpoints`` can be secured as configured
    (``bind``: the daemon's side, else a worker's); :class:`LinkSecurityError` if not. Returns a short
    description for the log: "curve", "insecure" or "local" (ipc only)."""
    tcp = [e for e in endpoints if e.startswith("tcp://")]
    if not tcp:
        return "local"
    secured = [server_keys(cfg, e) if bind else client_keys(cfg, e) for e in tcp]
    if all(s is None for s in secured):
        log.warning("INSECURE worker links: tcp:// without CURVE keys (allow_insecure_tcp); any host that reaches "
                    "them can take tiles and send results that stop the machine", endpoints=tcp)
        return "insecure"
    return "curve"


def check_daemon_links(cfg: InferenceConfig) -> str:
    """:func:`check_links` for the daemon: its tiles/results endpoints as the CURVE server and, when it
    starts inference workers itself, as their client too."""
    links = [e for e in (cfg.tiles_endpoint, cfg.results_endpoint) if e]
    mode = check_links(cfg, links, bind=True)
    if cfg.workers:  # this host's workers use the daemon's key pair (or worker_secret_key)
        check_links(cfg, links, bind=False)
    return mode


# ---------------------------------------------------------------- securing one process's sockets


class _KeyRing:
    """The ZAP credentials provider: admits the authorised keys (the folder, re-read when its list of
    files changes) and the daemon's own key; counts and logs what it refuses."""

    def __init__(self, folder: Path, keys: dict[bytes, str], own: bytes, counters: Counter[str], logger: Any) -> None:  # noqa: ANN401
        self.folder, self.keys, self.own = folder, keys, own
        self.counters, self.log = counters, logger
        self._mtime = self._folder_mtime()
        self._seen: set[bytes] = set()
        self._last_denied_log = 0.0
        self._lock = threading.Lock()

    def _folder_mtime(self) -> int | None:
        try:
            return self.folder.stat().st_mtime_ns
        except OSError:
            return None

    def _refresh(self) -> None:
        mtime = self._folder_mtime()
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self.keys = read_authorized_keys(self.folder)
            self.log.info("authorized worker keys re-read", folder=str(self.folder), keys=sorted(self.keys.values()))
        except LinkSecurityError as e:  # keep admitting no one rather than guessing
            self.keys = {}
            self.log.error("authorized worker keys cannot be read: no remote worker is admitted", error=str(e))

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            self._refresh()
            name = self.keys.get(key) or ("this daemon (a local worker)" if key == self.own else None)
            if name is not None:
                self.counters["links_authenticated"] += 1
                if key not in self._seen:
                    self._seen.add(key)
                    self.log.info("worker link authenticated", key_name=name)
                return True
            self.counters["links_refused"] += 1
            now = time.monotonic()
            if now - self._last_denied_log >= 1.0:
                self._last_denied_log = now
                self.log.warning("worker link refused: unknown CURVE key",
                                 key=key[:8].decode("ascii", "replace") + "...", refused=self.counters["links_refused"])
            return False


RETRY_REFUSED_S = 5.0
"""A worker whose handshake the daemon refused tries again this often (libzmq itself gives up on an
endpoint after an authentication or protocol failure; the daemon may authorise the key meanwhile)."""

_SERVER_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_CLIENT_EVENTS = _SERVER_EVENTS | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED


@dataclass
class _Watched:
    """A secured socket and its handshake monitor."""

    sock: zmq.Socket
    monitor: zmq.Socket
    endpoint: str
    bind: bool
    key_file: Path
    up: bool = False
    retry_at: float | None = None


class LinkGuard:
    """Secures the sockets of one process on ``tcp://`` endpoints (:meth:`apply`, before bind/connect);
    owns the ZAP authenticator thread of that process's context and watches the handshakes
    (:meth:`poll`, from the stage's loop). :meth:`close` before the context's ``term()``.

    Counters: ``links_refused`` (a client key not authorised), ``links_failed`` (a peer without keys,
    with the wrong server key, or not speaking ZMTP), ``links_authenticated``; on a worker
    ``links_refused_by_daemon`` and ``links_failed``."""

    def __init__(self, ctx: zmq.Context, *, counters: Counter[str] | None = None, logger: Any = None) -> None:  # noqa: ANN401
        self.ctx = ctx
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.log = logger if logger is not None else log
        self.auth: ThreadAuthenticator | None = None
        self.watched: list[_Watched] = []
        self._last_log = 0.0

    def apply(self, sock: zmq.Socket, endpoint: str, cfg: InferenceConfig | None, *, bind: bool) -> str:
        """Make ``sock`` a CURVE server (``bind``) or client for ``endpoint`` when it is ``tcp://``, with
        the keys of ``cfg`` (None: no keys). Returns "curve", "insecure" or "local";
        :class:`LinkSecurityError` when keys are missing or bad."""
        if not endpoint.startswith("tcp://"):
            return "local"
        cfg = cfg if cfg is not None else InferenceConfig()
        if bind:
            server = server_keys(cfg, endpoint)
            if server is None:
                self._insecure(endpoint)
                return "insecure"
            pair, keys = server
            self._start_auth(Path(str(cfg.authorized_keys_dir)), pair.public, keys)
            sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret or b"")
            sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
        else:
            client = client_keys(cfg, endpoint)
            if client is None:
                self._insecure(endpoint)
                return "insecure"
            pair, server_public = client
            sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret or b"")
            sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        monitor = sock.get_monitor_socket(_SERVER_EVENTS if bind else _CLIENT_EVENTS)
        self.watched.append(_Watched(sock, monitor, endpoint, bind, pair.path))
        self.log.info("worker link secured with CURVE", endpoint=endpoint, role="server" if bind else "client",
                      key_file=str(pair.path))
        return "curve"

    def poll(self) -> None:
        """Handle the handshake events since the last call (never blocks): count and log failures
        (at most once a second), and reconnect a refused worker link every ``RETRY_REFUSED_S``."""
        now = time.monotonic()
        for w in self.watched:
            while w.monitor.poll(0):
                try:
                    event = recv_monitor_message(w.monitor, zmq.NOBLOCK)
                except zmq.ZMQError:
                    break
                self._on_event(w, int(event["event"]), now)
            if w.retry_at is not None and now >= w.retry_at:
                w.retry_at = None
                try:
                    w.sock.disconnect(w.endpoint)
                except zmq.ZMQError:  # libzmq already dropped the endpoint after the failure
                    pass
                w.sock.connect(w.endpoint)

    def _on_event(self, w: _Watched, event: int, now: float) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if not w.up:
                self.log.info("worker link up: the daemon accepted this worker's key", endpoint=w.endpoint)
            w.up = True
            return
        w.up = False
        if w.bind:
            self.counters["links_failed"] += 1
            what = "a peer without CURVE keys, with the wrong server key, or not speaking ZeroMQ"
            self._log_failure("worker link handshake failed", endpoint=w.endpoint, peer=what,
                              failed=self.counters["links_failed"])
            return
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.counters["links_refused_by_daemon"] += 1
            self._log_failure("the daemon refused this worker's key: its public key file must be in the daemon's "
                              "[inference] authorized_keys_dir", endpoint=w.endpoint, key_file=str(w.key_file),
                              retry_in_s=RETRY_REFUSED_S)
        else:
            self.counters["links_failed"] += 1
            self._log_failure("worker link handshake failed: is server_public_key (--server-key) the daemon's "
                              "public key, and does the daemon use CURVE keys?", endpoint=w.endpoint)
        if event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # libzmq retries those itself
            w.retry_at = now + RETRY_REFUSED_S

    def _log_failure(self, message: str, **kw: Any) -> None:  # noqa: ANN401
        now = time.monotonic()
        if now - self._last_log >= 1.0:
            self._last_log = now
            self.log.warning(message, **kw)

    def _insecure(self, endpoint: str) -> None:
        self.counters["insecure_links"] += 1
        self.log.warning("INSECURE worker link: tcp:// without CURVE keys (allow_insecure_tcp); any host that "
                         "reaches it can take tiles and send results that stop the machine", endpoint=endpoint)

    def _start_auth(self, folder: Path, own: bytes, keys: dict[bytes, str]) -> None:
        """One ZAP handler per context, running before the first CURVE server socket binds (without
        one, libzmq would admit every client key)."""
        if self.auth is not None:
            return
        if not keys:
            self.log.warning("no authorized worker keys: only this host's own workers can connect", folder=str(folder))
        ring = _KeyRing(folder, keys, own, self.counters, self.log)
        auth = ThreadAuthenticator(self.ctx)
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=ring)
        self.auth = auth

    def close(self) -> None:
        """Close the monitors and stop the authenticator (after the stage's sockets are closed)."""
        for w in self.watched:
            w.monitor.close(0)
        self.watched = []
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
