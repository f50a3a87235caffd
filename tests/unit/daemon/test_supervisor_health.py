"""The supervisor's health names a camera that delivers no frames (its coverage alone says nothing)."""

from __future__ import annotations

from knitwatch.config import Settings
from knitwatch.config.settings import CameraConfig, DaemonConfig
from knitwatch.daemon.supervisor import Supervisor


def _supervisor(tmp_path) -> Supervisor:
    settings = Settings(cameras=[CameraConfig(id="cam0"), CameraConfig(id="cam1")],
                        daemon=DaemonConfig(stall_s=5.0, runtime_dir=tmp_path))
    return Supervisor(settings, checkpoint={"path": "model.ckpt", "preprocess": {}, "thresholds": {"image": 1.0}})


def test_a_camera_without_frames_makes_health_degraded(tmp_path) -> None:
    sup = _supervisor(tmp_path)
    sup.ready_at = 100.0
    sup.procs["capture.cam0"].stats = {"captured": 0}
    sup.procs["capture.cam1"].stats = {"captured": 10}
    assert sup._silent_cameras(101.0) == []  # within stall_s of the start
    sup.procs["capture.cam1"].stats = {"captured": 60}
    problems = sup._silent_cameras(107.0)
    assert problems == ["camera cam0: no frame for 6 s (none since the start)"]
    sup.procs["capture.cam0"].stats = {"captured": 3}
    assert sup._silent_cameras(108.0) == []  # it delivers again
    sup.procs["capture.cam1"].stats = {"captured": 60}  # cam1 stalls from 107 on
    assert sup._silent_cameras(113.0) == ["camera cam1: no frame for 6 s"]


def test_no_camera_is_silent_before_the_daemon_inspects(tmp_path) -> None:
    sup = _supervisor(tmp_path)
    sup.procs["capture.cam0"].stats = {"captured": 0}
    assert sup._silent_cameras(1000.0) == []  # still loading the model: cameras start when it is ready


def test_a_stage_still_starting_gets_the_startup_grace_not_the_stall_limit(tmp_path) -> None:
    """Under load a worker importing torch sent no heartbeat within stall_s and was killed."""
    import time

    from knitwatch.daemon.supervisor import StageProc, StageSpec

    settings = Settings(daemon=DaemonConfig(stall_s=0.5, startup_grace_s=60.0, runtime_dir=tmp_path))
    sup = Supervisor(settings, checkpoint={"path": "model.ckpt", "preprocess": {}, "thresholds": {"image": 1.0}})
    sp = StageProc(StageSpec("infer.0", "infer", "tests.helpers.slow_stage", {"pid_file": str(tmp_path / "pid")}))
    sup.procs = {"infer.0": sp}
    sup._start(sp)
    try:
        time.sleep(1.5)  # three stall limits without a heartbeat
        sup._watch()
        assert sp.process.is_alive() and sp.restart_count == 0
        sp.stats = {"ready": True}  # its first heartbeat: from now on the stall limit applies
        sp.last_beat = time.monotonic() - 1.0
        sup._watch()
        assert sp.restart_count == 1
    finally:
        if sp.process.is_alive():
            sp.process.kill()
        sp.process.join(5)
