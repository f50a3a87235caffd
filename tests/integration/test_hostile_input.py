"""Hostile input on the sockets of a running daemon: random and type-confused messages (a fixed-seed
fuzz loop) sent to the supervisor's control socket and to the tiler's, the inference workers' and
the alert stage's sockets. Every stage and the supervisor must stay alive (no restart), count what
they dropped, and go on inspecting.

On main, one heartbeat whose stage name was a list raised in the supervisor and stopped the whole
daemon; type-confused frames, credits, tiles and results crashed the stage that received them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from knitwatch.config import Settings
from knitwatch.config.settings import InferenceConfig
from knitwatch.daemon.cli.common import to_toml
from knitwatch.daemon.supervisor import Supervisor
from knitwatch.pipeline import wire
from knitwatch.pipeline.preprocess import PreprocessParams, preprocess
from tests.helpers.cli import KNITWATCH, clean_env
from tests.helpers.hostile import confused, encode_raw, frame_header, fuzz_parts, valid
from tests.helpers.models import untrained_checkpoint
from tests.helpers.net import free_port, wait_for
from tests.helpers.procs import read_json_lines
from tests.helpers.stages import GARBAGE, StageUnderTest

SEED = 15_04


def send_all(sock: zmq.Socket, messages: list[list[bytes]], prefix: list[bytes] | None = None) -> int:
    """Send without blocking (a full pipe skips the message); how many went out."""
    sent = 0
    for parts in messages:
        try:
            sock.send_multipart([*(prefix or []), *parts], flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.005)
    return sent


def test_supervisor_counts_and_drops_bad_control_messages(tmp_path: Path) -> None:
    """The supervisor's control socket (real ZeroMQ, no stage started): type-confused heartbeats and
    other kinds are counted by reason; on main the first of them raised out of the main loop."""
    settings = Settings()
    settings.api.enabled = False
    sup = Supervisor(settings, checkpoint={"path": "unused.ckpt", "preprocess": {}, "thresholds": {"image": 1.0}},
                     run_dir=tmp_path)
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PULL)
    ctl.bind(sup.endpoints["control"])
    push = ctx.socket(zmq.PUSH)
    push.connect(sup.endpoints["control"])
    try:
        bad = [
            confused("heartbeat", "stage", ["alert"]),
            confused("heartbeat", "stage", {"alert": 1}),
            confused("heartbeat", "pid", "1"),
            confused("heartbeat", "stats", "x"),
            confused("heartbeat", "stats", {"captured": "many"}),
            confused("heartbeat", "stats", {"cameras": {"cam0": {"inspected": None}}}),
            confused("heartbeat", "stage", "nobody"),  # well-formed, unknown stage
            encode_raw("credit", *valid("credit")),  # well-formed, the wrong kind
            *GARBAGE,
        ]
        for parts in bad:
            push.send_multipart(parts)
        sup._collect(ctl, 1500)  # the main loop's read of the control socket (on main: TypeError out of it)
        assert sup.bad_control == {"heartbeat.stage": 2, "heartbeat.pid": 1, "heartbeat.stats": 3,
                                   "heartbeat.unknown_stage": 1, "unexpected.credit": 1, "json": 1, "version": 1,
                                   "frame.bufs": 1, "kind": 1}
        stats = sup._stats()  # the stats still compute, and show the count
        assert stats["bad_control_messages"]["heartbeat.stats"] == 3
        assert all(sp.stats == {} for sp in sup.procs.values())
    finally:
        push.close(0)
        ctl.close(0)
        ctx.term()


def test_infer_worker_survives_fuzz(tmp_path: Path) -> None:
    """The inference worker's socket is reached only through the tiler, so the test plays the tiler:
    a fixed-seed fuzz loop of random and type-confused messages, then valid tiles are answered."""
    ckpt = untrained_checkpoint(tmp_path / "u.ckpt")
    ctx = zmq.Context()
    tiler = ctx.socket(zmq.ROUTER)
    tiler.setsockopt(zmq.LINGER, 0)
    tiler.bind(f"ipc://{tmp_path}/t.sock")
    st = StageUnderTest(tmp_path, "knitwatch.pipeline.stages.infer", "infer.0",
                        tiles_endpoint=f"ipc://{tmp_path}/t.sock", results_endpoint=f"ipc://{tmp_path}/r.sock",
                        checkpoint=str(ckpt),
                        inference=InferenceConfig(device="cpu", backend="torch", max_batch_tiles=8, max_wait_ms=5))
    try:
        results = st.socket(zmq.PULL, f"ipc://{tmp_path}/r.sock", bind=True)
        assert tiler.poll(120000), "the worker never asked for tiles"
        peer, _ = wire.recv_routed(tiler)
        rng = np.random.default_rng(SEED)
        fuzz = [fuzz_parts(rng, ("tiles", "frame", "credit")) for _ in range(400)]
        sent = send_all(tiler, fuzz, [peer])
        st.wait_stats(lambda s: s.get("bad_messages", 0) + s.get("frames", 0) >= sent * 0.9, timeout=120)
        frame = np.random.default_rng(1).integers(0, 255, (48, 96), dtype=np.uint8)
        tiles, grid = preprocess(frame, PreprocessParams(tile=48, stride=48))
        while tiler.poll(0):
            tiler.recv_multipart()  # the credits of the fuzz phase
        wire.send_routed(tiler, peer, "tiles", {**frame_header(4242), "grid": grid.to_dict()}, [tiles, frame])
        deadline = time.monotonic() + 60
        res = None
        while time.monotonic() < deadline and res is None:
            assert results.poll(60000), "no result after the fuzz"
            msg = wire.recv(results)
            if msg["seq"] == 4242:
                res = msg
        assert res is not None and res.arrays[0].shape == frame.shape
        stats = st.wait_stats(lambda s: s.get("frames", 0) >= 1)
        assert stats["bad_messages"] > 200 and len(stats["bad_message_reasons"]) > 10
    finally:
        assert st.stop() == 0
        tiler.close(0)
        ctx.term()


@pytest.fixture
def daemon(tmp_path: Path) -> Any:  # noqa: ANN401 - (process, paths)
    ckpt = untrained_checkpoint(tmp_path / "u.ckpt", tile=48)
    port = free_port()
    cfg = {
        "cameras": [{"id": "sim", "source": "simulator", "fps": 4.0, "width": 96, "height": 48,
                     "simulator": {"pitch_px": 6.0, "speed_px": 20.0, "seed": 4}}],
        "inference": {"device": "cpu", "backend": "torch", "max_batch_tiles": 16, "max_wait_ms": 10},
        "store": {"path": str(tmp_path / "store")},
        "api": {"port": port},
        "daemon": {"runtime_dir": str(tmp_path / "run"), "stats_interval_s": 1.0,
                   "stall_s": 30.0},  # a stage's first heartbeat may come late on a busy 2-core machine
    }
    path = tmp_path / "knitwatch.toml"
    path.write_text(to_toml(cfg))
    decisions = tmp_path / "decisions.jsonl"
    log = tmp_path / "daemon.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen([*KNITWATCH, "--log-format", "json", "run", "--config", str(path), "--checkpoint",
                                 str(ckpt), "--decisions-log", str(decisions)],
                                stdout=logf, stderr=subprocess.STDOUT, env=clean_env())
    try:
        yield proc, tmp_path / "run", decisions, log, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_daemon_survives_fuzz_on_every_socket(daemon: Any) -> None:  # noqa: ANN401
    proc, run, decisions, log, url = daemon
    wait_for(lambda: len(read_json_lines(decisions)) >= 3, 180, 0.2, what="3 inspected frames", proc=proc)
    pids = {r["stage_name"]: r["child_pid"] for r in read_json_lines(log) if r.get("event") == "stage spawned"}
    rng = np.random.default_rng(SEED)
    ctx = zmq.Context()
    socks = {
        "control": (ctx.socket(zmq.PUSH), ("heartbeat", "credit", "frame")),
        "frames": (ctx.socket(zmq.DEALER), ("frame", "credit", "tiles")),
        "tiles": (ctx.socket(zmq.DEALER), ("credit", "tiles", "result")),
        "results": (ctx.socket(zmq.PUSH), ("result", "frame", "heartbeat")),
    }
    sent = 0
    try:
        for name, (sock, _) in socks.items():
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 50)
            sock.connect(f"ipc://{run}/{name}.sock")
        # forged heartbeats with the real stage names and pids, with stats of the wrong types
        forged = [confused("heartbeat", "stats", v) for v in ("x", {"captured": "9"}, {"cameras": {"sim": {}}})]
        forged = [[json.dumps({**json.loads(p[0]), "stage": s, "pid": pid}).encode()] for p in forged
                  for s, pid in pids.items()]
        sent += send_all(socks["control"][0], forged)
        for _ in range(6):  # rounds over every socket, with the daemon inspecting meanwhile
            for sock, kinds in socks.values():
                sent += send_all(sock, [fuzz_parts(rng, kinds) for _ in range(60)])
            time.sleep(0.2)
    finally:
        for sock, _ in socks.values():
            sock.close(0)
        ctx.term()
    assert sent > 1000
    n_after = len(read_json_lines(decisions))
    wait_for(lambda: len(read_json_lines(decisions)) >= n_after + 8, 120, 0.2,
             what="8 more frames inspected after the fuzz", proc=proc)
    with urllib.request.urlopen(f"{url}/api/stats", timeout=10) as r:
        stats = json.loads(r.read())
    assert proc.poll() is None and stats["healthy"]
    stages = stats["stages"]
    assert {n: s["restarts"] for n, s in stages.items()} == dict.fromkeys(stages, 0)
    assert all(s["alive"] for s in stages.values())
    for name in ("tiler", "alert"):
        assert stages[name]["bad_messages"] > 50, (name, stages[name])
        assert stages[name]["bad_message_reasons"]
    assert sum(stats["bad_control_messages"].values()) > 50
    assert stats["cameras"]["sim"]["inspected"] > n_after
    spawned = [r for r in read_json_lines(log) if r.get("event") == "stage spawned"]
    assert len(spawned) == len(pids), "a stage was restarted"
    assert not [r for r in read_json_lines(log) if r.get("event") == "stage crashed"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
