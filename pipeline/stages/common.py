"""What every stage process shares: sockets, heartbeats with stats, signals, bad-message counting.

Every message is checked on receipt (:func:`knitwatch.pipeline.wire.decode`: each field's type and
range by its kind's schema); one that fails is counted in ``bad_messages`` and, by reason, in
``bad_message_reasons`` of the stage's stats, logged at most once a second, and dropped.

A stage runs a loop of ``step()`` calls; between steps it sends a heartbeat (with its counters) to
the supervisor's control socket at most every ``heartbeat_s``. SIGTERM asks it to stop: the source
stage stops at once, the others *drain* (keep working until their input has been idle for
``drain_idle_s``) so frames in flight are still inspected. SIGINT is ignored: the supervisor orders
the shutdown. When the supervisor dies, Linux sends the stage SIGTERM (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections import Counter
from typing import Any

import numpy as np
import structlog
import zmq

from knitwatch.config.settings import InferenceConfig
from knitwatch.pipeline import wire
from knitwatch.pipeline.security import LinkGuard

log = structlog.get_logger(__name__)

PR_SET_PDEATHSIG = 1
TAKEN_KINDS = ("frame", "tiles", "result")  # the messages that carry a frame (counted in the ``taken`` stat)

MIN_MESSAGE_BYTES = 16 * 2**20
BYTES_PER_PIXEL = 64
_max_message_bytes = 256 * 2**20  # a process that was told nothing (a remote worker): 256 MiB


def max_message_bytes(cameras: Any) -> int:  # noqa: ANN401 - CameraConfig objects (or any with width, height)
    """The largest message part (ZeroMQ ``MAXMSGSIZE``) a stage takes, from the largest frame the cameras'
    settings allow: 64 bytes a pixel - a frame of 4 channels, its float32 anomaly map or its tiles (overlapping,
    rescaled) need at most 16, so a margin of 4 - and never below 16 MiB (heartbeats, credits)."""
    px = max((int(c.width) * int(c.height) for c in cameras), default=0)
    return max(MIN_MESSAGE_BYTES, BYTES_PER_PIXEL * px)


def set_max_message_bytes(n: int) -> None:
    """The limit of every socket this process's stage makes from now on (see :func:`max_message_bytes`)."""
    global _max_message_bytes
    _max_message_bytes = int(n)


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies (no orphans). With
    ``parent_pid`` (the parent as this process first saw it): exit at once when the parent is already
    gone, i.e. it died before the request took effect."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's shutdown still stops us
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def percentiles(values: list[float] | np.ndarray, qs: tuple[float, ...] = (50, 99)) -> dict[str, float]:
    if len(values) == 0:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{int(q)}": float(np.percentile(arr, q)) for q in qs}


class Stage:
    """Base of the stage processes; subclasses implement ``step()`` (and may override ``on_stop``)."""

    drains = True  # keep consuming after SIGTERM until input is idle

    def __init__(self, name: str, control_endpoint: str, *, heartbeat_s: float = 0.5, drain_idle_s: float = 0.5,
                 drain_max_s: float = 8.0) -> None:
        self.name = name
        self.zctx = zmq.Context()
        self.control = self.zctx.socket(zmq.PUSH)
        self.control.setsockopt(zmq.SNDHWM, 20)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(control_endpoint)
        self.heartbeat_s = heartbeat_s
        self.drain_idle_s = drain_idle_s
        self.drain_max_s = drain_max_s
        self.counters: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}
        self.bad_reasons: Counter[str] = Counter()  # bad messages by reason (WireError.reason)
        self._warned: dict[str, float] = {}  # event -> when last logged (warn_sometimes)
        self.stopping = False
        self.stop_requested_at = 0.0
        self.last_input = time.monotonic()
        self._last_beat = 0.0
        self._sockets: list[zmq.Socket] = [self.control]
        self._monitors: list[tuple[zmq.Socket, zmq.Socket, str]] = []  # (socket, its monitor, endpoint)
        self.max_message_bytes = _max_message_bytes
        self.log = log.bind(stage_name=name)
        self.links = LinkGuard(self.zctx, counters=self.counters, logger=self.log)  # CURVE on tcp:// endpoints

    # -- sockets
    def socket(self, kind: int, endpoint: str, *, bind: bool, hwm: int = 2, linger_ms: int | None = None,
               inference: InferenceConfig | None = None) -> zmq.Socket:
        """``linger_ms``: how long closing waits for unsent messages (default 0 for PULL, else 2000 ms);
        0 for sockets that only send credits upstream - their peer has stopped before this stage.
        A ``tcp://`` endpoint is secured with CURVE by ``inference``'s keys (:mod:`knitwatch.pipeline.security`;
        without keys, refused unless ``allow_insecure_tcp``).

        No message part larger than ``max_message_bytes`` is taken (ZeroMQ ``MAXMSGSIZE``): a peer that sends
        one is disconnected by ZeroMQ before the stage allocates it; dropped links are counted
        (``links_dropped``) and logged."""
        s = self.zctx.socket(kind)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        if kind == zmq.ROUTER:
            s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone peer raises instead of vanishing
        if linger_ms is None:
            linger_ms = 0 if kind == zmq.PULL else 2000
        s.setsockopt(zmq.LINGER, linger_ms)
        try:
            self.links.apply(s, endpoint, inference, bind=bind)
        except Exception:
            s.close(0)
            raise
        if not any(w.sock is s for w in self.links.watched):  # a CURVE socket's monitor is the LinkGuard's
            self._monitors.append((s, s.get_monitor_socket(zmq.EVENT_DISCONNECTED), endpoint))
        if bind:
            if endpoint.startswith("ipc://"):
                path = endpoint[len("ipc://") :]
                if os.path.exists(path):
                    os.unlink(path)  # a leftover of a killed predecessor
            s.bind(endpoint)
        else:
            s.connect(endpoint)
        self._sockets.append(s)
        return s

    def receive(self, sock: zmq.Socket, timeout_ms: float, expect: tuple[str, ...] = ()) -> wire.Message | None:
        """One message or None (timeout); malformed messages, and with ``expect`` messages of other
        kinds, are counted, logged and dropped."""
        if not sock.poll(max(0, int(timeout_ms))):
            return None
        return self._checked(lambda: self._expect(wire.recv(sock), expect))

    def receive_routed(self, sock: zmq.Socket, expect: tuple[str, ...] = ()) -> tuple[bytes, wire.Message] | None:
        """One message waiting on a ROUTER socket, with its sender; None if malformed (counted)."""
        def get() -> tuple[bytes, wire.Message]:
            peer, msg = wire.recv_routed(sock, zmq.NOBLOCK)
            return peer, self._expect(msg, expect)

        return self._checked(get)

    @staticmethod
    def _expect(msg: wire.Message, kinds: tuple[str, ...]) -> wire.Message:
        if kinds and msg.kind not in kinds:
            raise wire.WireError(f"a {msg.kind} message where {' or '.join(kinds)} belongs", f"unexpected.{msg.kind}")
        return msg

    def bad_message(self, reason: str, detail: str) -> None:
        """Count a message that cannot be used (by reason) and log it - at most once a second, with the
        count, so a flood of garbage cannot flood the log too."""
        self.counters["bad_messages"] += 1
        self.bad_reasons[reason] += 1
        self.warn_sometimes("dropped malformed message", reason=reason, detail=detail[:300],
                            count=self.counters["bad_messages"])

    def warn_sometimes(self, event: str, **fields: Any) -> None:  # noqa: ANN401
        """Log a warning about input at most once a second per ``event`` (what is counted anyway)."""
        now = time.monotonic()
        if now - self._warned.get(event, -1e9) >= 1.0:
            self._warned[event] = now
            self.log.warning(event, **fields)

    def _checked(self, fn: Any) -> Any:  # noqa: ANN401
        try:
            out = fn()
        except wire.WireError as e:
            self.bad_message(e.reason, str(e))
            return None
        self.last_input = time.monotonic()
        msg = out[1] if isinstance(out, tuple) else out
        if msg.kind in TAKEN_KINDS:  # a frame this stage now holds: the supervisor counts it lost if we die with it
            self.counters["taken"] += 1
        return out

    def send_blocking(self, sock: zmq.Socket, kind: str, header: dict, arrays: list[np.ndarray]) -> bool:
        """Send, waiting while downstream is full (heartbeats go on). False if given up while stopping."""
        parts = wire.encode(kind, header, arrays)
        while True:
            if sock.poll(100, zmq.POLLOUT):
                sock.send_multipart(parts, copy=False)
                return True
            self.heartbeat()
            if self.stopping and time.monotonic() - self.stop_requested_at > self.drain_max_s:
                self.counters["lost_at_shutdown"] += 1
                return False

    # -- heartbeat
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.counters, **self.extra}
        if self.bad_reasons:
            out["bad_message_reasons"] = dict(self.bad_reasons)
        return out

    def _poll_monitors(self) -> None:
        """Count the links ZeroMQ dropped since the last call: a peer gone (a restart), or one that sent a
        message part over ``max_message_bytes``."""
        for _s, mon, endpoint in self._monitors:
            while mon.poll(0):
                try:
                    mon.recv_multipart(zmq.NOBLOCK)
                except zmq.ZMQError:
                    break
                self.counters["links_dropped"] += 1
                self.warn_sometimes("a peer link was dropped (the peer went away, or sent a message over the size "
                                    "limit)", endpoint=endpoint, max_message_bytes=self.max_message_bytes,
                                    count=self.counters["links_dropped"])

    def heartbeat(self, force: bool = False) -> None:
        self.links.poll()  # worker link handshakes: counted, logged, a refused one retried
        self._poll_monitors()
        now = time.monotonic()
        if not force and now - self._last_beat < self.heartbeat_s:
            return
        self._last_beat = now
        try:
            wire.send(self.control, "heartbeat", {"stage": self.name, "pid": os.getpid(), "stats": self.stats()},
                      flags=zmq.NOBLOCK)
        except zmq.Again:  # supervisor busy: the next beat carries the same counters
            pass

    # -- lifecycle
    def _on_sigterm(self, _signum: int, _frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_requested_at = time.monotonic()

    def step(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_stop(self) -> None:
        """Called once after the loop ends (flush what is pending)."""

    def done(self) -> bool:
        if not self.stopping:
            return False
        if not self.drains:
            return True
        now = time.monotonic()
        idle = now - max(self.last_input, self.stop_requested_at) > self.drain_idle_s
        return idle or now - self.stop_requested_at > self.drain_max_s

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        die_with_parent()
        self.log.info("stage started")
        try:
            while not self.done():
                self.step()
                self.heartbeat()
            self.on_stop()
        finally:
            self.heartbeat(force=True)
            for s, mon, _ep in self._monitors:
                try:
                    s.disable_monitor()
                except zmq.ZMQError:
                    pass
                mon.close(0)
            for s in self._sockets:
                s.close()
            self.links.close()
            self.zctx.term()
        self.log.info("stage stopped", **{k: v for k, v in self.counters.items()})
        return 0
