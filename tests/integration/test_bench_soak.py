"""``knitwatch bench soak``: a short run of the real daemon (capture, tiler, inference, alert processes, the
simulated PLC's pymodbus server, SQLite store) with acknowledges and a tiny store cap; the report and the
samples file it writes as it goes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knitwatch.config.settings import StoreConfig
from knitwatch.daemon.bench.soak import soak_report, soak_schedule
from knitwatch.pipeline.store.database import Store
from tests.helpers.cli import knitwatch
from tests.helpers.models import untrained_checkpoint

STAGES = {"alert", "tiler", "infer.0", "capture.soak", "supervisor"}
CAP_MB = 0.5  # about three events' pictures: retention has to delete within the run


@pytest.fixture(scope="module")
def soak_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict], Path, str]:
    """One short soak: an untrained model with thresholds no frame stays under (every frame is a defect,
    events come every few frames), a 0.5 MB store cap, an acknowledge every 2 s."""
    tmp = tmp_path_factory.mktemp("soak")
    ckpt = untrained_checkpoint(tmp / "u.ckpt", tile=64)
    cfg = tmp / "fast.toml"
    cfg.write_text("[alert]\nimage_threshold = 0.001\npixel_threshold = 0.001\nmin_area_px = 1\nconfirm_k = 1\n"
                   "confirm_n = 1\ncooldown_frames = 0\n"
                   "[daemon]\nstall_s = 60\n")  # a CPU shared with other jobs must not look like a stalled stage
    work = tmp / "work"
    r = knitwatch("bench", "soak", str(ckpt), "--config", str(cfg), "--hours", "0.02", "--store-cap-mb", str(CAP_MB),
                  "--defect-every", "10", "--ack-every-s", "2", "--interval-s", "5", "--warmup-s", "15",
                  "--device", "cpu", "--workdir", str(work), "--json", timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    samples_path = work / "soak" / "soak-samples.jsonl"
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    return report, samples, work, r.stdout


def test_soak_samples_memory_latency_and_store_as_it_goes(soak_run: tuple[dict, list[dict], Path, str]) -> None:
    report, samples, work, stdout = soak_run
    # a sample every 5 s over 72 s of inspection, each one written to the file as it was taken
    assert report["samples"] == len(samples) >= 10
    assert all(b["elapsed_s"] > a["elapsed_s"] for a, b in zip(samples, samples[1:], strict=False))
    assert samples[-1]["elapsed_s"] >= 0.02 * 3600 - 1
    assert stdout.count("[soak ") == len(samples), "progress: a line per sample"
    assert report["restarts"] == 0, samples
    for s in samples:  # every stage process measured, from /proc of its real pid
        assert set(s["rss_mb"]) == STAGES and all(v and v > 50 for v in s["rss_mb"].values()), s["rss_mb"]
        assert set(s["pids"]) == STAGES - {"supervisor"} and len(set(s["pids"].values())) == 4
    assert set(report["stages"]) == STAGES
    for st in report["stages"].values():
        assert st["rss_mb_after_warmup"] > 0 and st["growth_pct"] is not None
        assert st["rss_mb_max"] >= max(st["rss_mb_after_warmup"], st["rss_mb_end"])
    lat = report["latency_ms_p99"]
    assert lat["intervals"] >= 5 and 0 < lat["min"] <= lat["median"] <= lat["max"]
    assert sum(s["frames"] for s in samples) >= 10, "frames were decided, their latencies read from the decisions log"
    assert report["restarts"] == 0
    cov = report["coverage"]
    assert 0 < cov["inspected"] <= cov["captured"] and 0 < cov["total"] <= 1


def test_soak_acknowledges_stops_and_holds_the_store_under_its_cap(
        soak_run: tuple[dict, list[dict], Path, str]) -> None:
    report, samples, work, _ = soak_run
    # stops reached the simulated PLC; the periodic acknowledges were applied by the alert stage
    assert report["plc_stops"] >= 2
    assert 1 <= report["acks_applied"] <= report["acks_requested"]
    store = Store.from_config(StoreConfig(path=work / "soak" / "store", fsync=False), create=False)
    try:
        acks = store.list_acks(limit=100)
        # (the daemon may apply the last request while it stops, after the last sample)
        assert report["acks_applied"] <= sum(a["handled_ns"] is not None for a in acks) <= report["acks_requested"]
        assert all(a["by"] == "bench soak" for a in acks)
        # retention deleted old events: more events were made than the store keeps, and it is under its cap
        st = report["store"]
        assert st["cap_bytes"] == int(CAP_MB * 1e6)
        assert st["events_total"] > st["events_in_store_end"] >= 1
        assert store.list_events(limit=1)["total"] < st["events_total"]
        assert st["samples_over_cap"] == 0 and 0 < st["max_bytes"] <= st["cap_bytes"]
    finally:
        store.close()
    assert report["verdict"] in ("PASS", "FAIL") and (report["verdict"] == "PASS") == (not report["failed"])
    assert json.loads((work / "soak" / "soak-report.json").read_text())["samples"] == report["samples"]


def _sample(t: float, rss: dict[str, float], *, p99: float = 100.0, store: int = 1000, restarts: int = 0) -> dict:
    return {"elapsed_s": t, "rss_mb": dict(rss), "pids": {k: 1 for k in rss if k != "supervisor"},
            "latency_ms_p99": p99, "store_bytes": store, "store_disk_bytes": store, "coverage": 1.0,
            "restarts": {"alert": restarts}, "captured": 10, "inspected": 10, "events_in_store": 1,
            "events_total": 2, "plc_stops": 1, "acks_requested": 1, "acks_applied": 1}


def test_soak_verdict_names_what_fails() -> None:
    flat = [_sample(t, {"alert": 100.0, "supervisor": 200.0}) for t in range(0, 100, 10)]
    assert soak_report(flat, warmup_s=20, cap_bytes=2000)["verdict"] == "PASS"
    # memory grown by 10 % after the warm-up (growth during the warm-up does not count)
    grow = [_sample(t, {"alert": 50.0 if t < 20 else 100.0 + (t - 20) / 7, "supervisor": 200.0})
            for t in range(0, 100, 10)]
    rep = soak_report(grow, warmup_s=20, cap_bytes=2000)
    assert rep["verdict"] == "FAIL" and rep["stages"]["alert"]["growth_pct"] == 10.0
    assert rep["stages"]["supervisor"]["growth_pct"] == 0.0 and "alert" in rep["failed"][0]
    # a store over its cap once, a restart, p99 drifting up
    bad = [_sample(t, {"alert": 100.0}, store=3000 if t == 50 else 1000, restarts=1 if t >= 80 else 0,
                   p99=100.0 + 10 * t) for t in range(0, 100, 10)]
    failed = " | ".join(soak_report(bad, warmup_s=0, cap_bytes=2000)["failed"])
    assert "cap in 1 sample" in failed and "1 stage restart" in failed and "p99 not stable" in failed
    assert soak_report([], warmup_s=0, cap_bytes=1)["verdict"] == "FAIL"


def test_soak_schedule_spreads_defects_over_the_whole_run() -> None:
    sched = soak_schedule(7300, 40)
    assert len(sched) == 7300 // 40 and sched[0]["frame"] == 20 and sched[-1]["frame"] < 7300
    assert len({d["kind"] for d in sched}) >= 5


def test_soak_bad_arguments_and_environment_are_named_errors(tmp_path: Path) -> None:
    r = knitwatch("bench", "soak", "--hours", "0", "--workdir", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "--hours" in r.stderr and "Traceback" not in r.stderr
    r = knitwatch("bench", "soak", str(tmp_path / "missing.ckpt"), "--workdir", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "missing.ckpt" in r.stderr
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"x")
    r = knitwatch("bench", "soak", str(ckpt), "--workdir", str(tmp_path), env={"KNITWATCH_CAMERAS": "x"}, timeout=60)
    assert r.returncode == 2 and "KNITWATCH_CAMERAS" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "soak").exists(), "nothing written before the settings are checked"
