"""A real alert-stage process fed result messages over ZeroMQ, for the alerting and fault-injection
tests; the PLC is the real pymodbus server of :class:`SimulatedPlc`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from knitwatch.config.settings import AlertConfig, CameraConfig, PlcConfig, SeverityClassConfig, StoreConfig
from knitwatch.pipeline import wire
from tests.helpers.cli import knitwatch
from tests.helpers.stages import StageUnderTest

CAM = CameraConfig(id="c")
# two of three frames confirm; a region of 50 px or more is a stop ("major"), smaller ones an alarm
ALERT = AlertConfig(confirm_k=2, confirm_n=3, min_area_px=4, cooldown_frames=10,
                    severity=[SeverityClassConfig(name="major", action="stop", min_area_px=50),
                              SeverityClassConfig(name="minor", action="alarm")])


def plc_cfg(port: int, **kw: Any) -> PlcConfig:  # noqa: ANN401
    """The simulated PLC on ``port`` with fast heartbeats and retries (``kw`` overrides)."""
    return PlcConfig(**{"driver": "modbus", "host": "127.0.0.1", "port": port, "stop_address": 0,
                        "heartbeat_address": 1, "heartbeat_s": 0.1, "heartbeat_idle_s": 0, "retry_initial_s": 0.05,
                        "retry_max_s": 0.3, "timeout_s": 0.5, **kw})


class AlertUnderTest:
    """A running alert stage and a PUSH socket to feed it results of ``shape`` (rows, columns) frames."""

    def __init__(self, run_dir: Path, store: StoreConfig | Path, plc: PlcConfig, *,
                 shape: tuple[int, int] = (480, 640), defect_at: tuple[int, int] = (100, 200)) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        ep = f"ipc://{run_dir}/r.sock"
        if not isinstance(store, StoreConfig):
            store = StoreConfig(path=store, fsync=False)
        self.stage = StageUnderTest(run_dir, "knitwatch.pipeline.stages.alert", "alert", results_endpoint=ep,
                                    thresholds={"image": 1.0, "pixel": 0.5}, alert=ALERT, cameras=[CAM], plc=plc,
                                    store=store, model={"kind": "efficientad", "id": "ckpt-test-1"})
        self.push = self.stage.socket(zmq.PUSH, ep, bind=False)
        self.shape = shape
        self.defect_at = defect_at
        self.frame = np.random.default_rng(0).integers(60, 200, shape, dtype=np.uint8)

    def send(self, seq: int, defect: bool, area: tuple[int, int] = (20, 30), *, at: tuple[int, int] | None = None,
             more: tuple[tuple[int, int], ...] = (), pos: dict | None = None, epoch: int = 1) -> None:
        """A result whose anomaly map holds a defect of ``area`` (rows, columns) at ``at`` (row, column;
        default ``defect_at``) and at each of ``more``; ``pos``: the frame's fabric position header."""
        amap = np.zeros(self.shape, np.float32)
        if defect:
            for y, x in (at or self.defect_at, *more):
                amap[y : y + area[0], x : x + area[1]] = 2.0
        head = {"cam": "c", "seq": seq, "epoch": epoch, "t_wall_ns": time.time_ns(), "t_mono_ns": time.monotonic_ns(),
                "image_score": float(amap.max()), "tile_scores": [float(amap.max())]}
        if pos is not None:
            head["pos"] = pos
        wire.send(self.push, "result", head, [amap, self.frame])

    def defect(self, epoch: int) -> None:
        """A confirmed major defect (two defective frames of three): a stop event."""
        for seq in range(3):
            self.send(seq, seq > 0, epoch=epoch)

    def stats(self, pred: Any, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ANN401
        return self.stage.wait_stats(pred, timeout)

    def actions(self, pred: Any, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ANN401
        return self.stats(lambda s: bool(s.get("actions")) and pred(s["actions"]), timeout)["actions"]

    def kill(self) -> None:
        """SIGKILL: the process dies where it stands (the PLC keeps what it holds)."""
        os.kill(self.stage.proc.pid, signal.SIGKILL)
        self.stage.proc.join(10)
        self.stage.stop()


def knitwatch_ack(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``knitwatch ack`` command with ``config``."""
    return knitwatch("--config", str(config), "ack", *args, timeout=60)
