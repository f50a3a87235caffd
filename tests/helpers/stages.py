"""Run one real stage process and talk to its real ZeroMQ sockets (helpers for the stage tests)."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import zmq

from knitwatch.daemon.supervisor import run_stage
from knitwatch.pipeline import wire

SEND_TIMEOUT_MS = 10_000  # test sockets: a send that finds no peer raises zmq.Again instead of hanging the suite


class StageUnderTest:
    def __init__(self, tmp: Path, module: str, name: str, **kwargs: Any) -> None:
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.PULL)
        self.control_ep = f"ipc://{tmp}/control.sock"
        self.control.bind(self.control_ep)
        self.proc = mp.get_context("spawn").Process(
            target=run_stage, args=(module, name, {"control_endpoint": self.control_ep, **kwargs}, "WARNING", "json")
        )
        self.proc.start()
        self.stats: dict[str, Any] = {}
        self.sockets: list[zmq.Socket] = [self.control]

    def socket(self, kind: int, endpoint: str, bind: bool) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)  # a send to a peer that is gone raises, never hangs
        (s.bind if bind else s.connect)(endpoint)
        self.sockets.append(s)
        return s

    def wait_stats(self, pred: Any, timeout: float = 60.0) -> dict[str, Any]:  # noqa: ANN401
        """Read heartbeats until ``pred(stats)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.control.poll(200):
                msg = wire.recv(self.control)
                self.stats = msg["stats"]
                if pred(self.stats):
                    return self.stats
            assert self.proc.is_alive(), f"stage died with exit code {self.proc.exitcode}"
        raise AssertionError(f"condition not met within {timeout} s; last stats {self.stats}")

    def stop(self) -> int | None:
        self.proc.terminate()
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        for s in self.sockets:
            s.close(0)
        self.ctx.term()
        return self.proc.exitcode


GARBAGE: list[list[bytes]] = [
    [b"not json"],
    [b'{"v": 99, "kind": "frame"}'],
    [b'{"v": 1, "kind": "frame", "cam": "c", "seq": 0, "t_wall_ns": 0, "t_mono_ns": 0, '
     b'"bufs": [{"shape": [4, 4], "dtype": "uint8"}]}', b"\0" * 3],
    [b'{"v": 1, "kind": "alien"}', b"x"],
]
