"""``/metrics``: Prometheus metrics read from the daemon's stats and the store at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from knitwatch.daemon.api.deps import DaemonView, StoreHandle
from knitwatch.pipeline.actions.latch import current_latch, read_view
from knitwatch.pipeline.store.database import StoreError


class DaemonCollector:
    """Prometheus metrics read from the daemon's stats at scrape time."""

    def __init__(self, view: DaemonView, stores: StoreHandle, latch_dir: Path | None = None) -> None:
        self.view = view
        self.stores = stores
        self.latch_dir = latch_dir

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        snap = self.view.stats_snapshot() or {}
        health = self.view.health()

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"knitwatch_{name}", doc, labels=labels or [])

        def counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(f"knitwatch_{name}", doc, labels=labels or [])

        degraded = list(health.get("degraded") or [])
        up = gauge("healthy", "1 when every stage is alive, ready and sending heartbeats, and nothing is degraded")
        up.add_metric([], 1.0 if health.get("healthy") and not degraded else 0.0)
        yield up
        parts = gauge("degraded", "1 per part that is degraded (PLC, store, latch file ...): /healthz says why",
                      ["part"])
        for part in sorted({r.split(":", 1)[0] for r in degraded}):
            parts.add_metric([part], 1.0)
        yield parts
        ready = gauge("ready", "1 once the model is loaded and the cameras run")
        ready.add_metric([], 1.0 if health.get("ready") else 0.0)
        yield ready
        if "uptime_s" in snap:
            g = gauge("uptime_seconds", "seconds since the daemon started")
            g.add_metric([], float(snap["uptime_s"]))
            yield g

        cams = snap.get("cameras") or {}
        fams = {
            "fps": gauge("camera_fps", "frames captured per second (recent window)", ["camera"]),
            "coverage": gauge("inspection_coverage_ratio", "frames inspected / captured (recent window)", ["camera"]),
            "captured": counter("frames_captured", "frames captured", ["camera"]),
            "inspected": counter("frames_inspected", "frames inspected", ["camera"]),
            "dropped": counter("frames_dropped", "frames dropped at capture (inspection behind)", ["camera"]),
            "events": counter("defect_events", "defect events since the daemon started", ["camera"]),
            "latency": gauge("latency_seconds", "capture -> decision latency percentiles", ["camera", "quantile"]),
        }
        for cam, c in sorted(cams.items()):
            if c.get("fps") is not None:
                fams["fps"].add_metric([cam], float(c["fps"]))
            if c.get("coverage") is not None:
                fams["coverage"].add_metric([cam], float(c["coverage"]))
            for key in ("captured", "inspected", "dropped", "events"):
                if c.get(key) is not None:
                    fams[key].add_metric([cam], float(c[key]))
            for q, v in (c.get("latency_ms") or {}).items():
                if q.startswith("p") and q[1:].isdigit():
                    fams["latency"].add_metric([cam, f"{int(q[1:]) / 100:g}"], float(v) / 1000.0)
        yield from fams.values()

        stages = snap.get("stages") or {}
        restarts = counter("stage_restarts", "restarts of a stage process", ["stage"])
        alive = gauge("stage_up", "1 while the stage process is alive", ["stage"])
        model = gauge("model_batch_seconds", "model time per batch (p50/p99) of an inference worker",
                      ["stage", "quantile"])
        lost = counter("frames_lost_in_flight", "frames a stage process held when it died (a lower bound)", ["stage"])
        lost_by_stage = (snap.get("lost_in_flight") or {}).get("by_stage") or {}
        for name, s in sorted(stages.items()):
            restarts.add_metric([name], float(s.get("restarts", 0)))
            lost.add_metric([name], float(lost_by_stage.get(name, 0)))
            alive.add_metric([name], 1.0 if s.get("alive") else 0.0)
            for q, v in (s.get("model_ms") or {}).items():
                if q.startswith("p") and q[1:].isdigit():
                    model.add_metric([name, f"{int(q[1:]) / 100:g}"], float(v) / 1000.0)
        yield restarts
        yield lost
        yield alive
        yield model
        yield from _industrial_camera_metrics(stages, gauge, counter)

        actions = (stages.get("alert") or {}).get("actions") or {}
        if actions:
            plc = gauge("plc_connected", "1 while the PLC answers", ["driver"])
            plc.add_metric([str(actions.get("driver", ""))], 1.0 if actions.get("plc_connected") else 0.0)
            yield plc
            fails = counter("plc_failures", "failed PLC requests (retried)")
            fails.add_metric([], float(actions.get("failures", 0)))
            yield fails
        store = self.stores.peek()
        index: dict[str, list[str]] | None = None
        st: dict[str, Any] | None = None
        if store is not None:
            try:
                index = store.latched()
                st = store.stats()
            except StoreError:
                index, st = None, None
        latched = current_latch(read_view(self.latch_dir) if self.latch_dir is not None else {}, actions or None,
                                index)
        lat = gauge("alarm_latched", "1 while a camera has an unacknowledged stop / alarm (camera '*': a stop of "
                    "unknown origin)", ["camera", "action"])
        for cam in sorted(set(cams) | set(latched["stop"]) | set(latched["alarm"])):
            for action in ("stop", "alarm"):
                lat.add_metric([cam, action], 1.0 if cam in latched[action] else 0.0)
        yield lat
        if st is not None and st.get("events", -1) >= 0:
            g = gauge("store_events", "events in the defect store")
            g.add_metric([], float(st["events"]))
            yield g
            g = gauge("store_bytes", "bytes of event pictures in the defect store")
            g.add_metric([], float(st["bytes"]))
            yield g

        gpu = snap.get("gpu") or {}
        devices = [d for d in gpu.get("devices", []) if "error" not in d]
        if devices:
            util = gauge("gpu_utilization_ratio", "GPU utilisation (NVML)", ["gpu", "name"])
            used = gauge("gpu_memory_used_bytes", "GPU memory used, all processes (NVML)", ["gpu", "name"])
            total = gauge("gpu_memory_total_bytes", "GPU memory (NVML)", ["gpu", "name"])
            for d in devices:
                labels = [str(d["index"]), str(d.get("name", ""))]
                if "utilization_percent" in d:
                    util.add_metric(labels, d["utilization_percent"] / 100.0)
                used.add_metric(labels, float(d["memory_used_bytes"]))
                total.add_metric(labels, float(d["memory_total_bytes"]))
            yield util
            yield used
            yield total
        cuda = gpu.get("cuda_memory_allocated_bytes") or {}
        if cuda:
            g = gauge("cuda_memory_allocated_bytes", "CUDA memory allocated by PyTorch in an inference worker",
                      ["stage"])
            for name, b in sorted(cuda.items()):
                g.add_metric([name], float(b))
            yield g


def metrics_registry(view: DaemonView, stores: StoreHandle, latch_dir: Path | None = None) -> CollectorRegistry:
    """A registry of its own per app (not the process-wide default one); ``latch_dir``: the latch file's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(view, stores, latch_dir))
    return registry


def _industrial_camera_metrics(stages: dict[str, Any], gauge: Any, counter: Any) -> Iterator[Any]:  # noqa: ANN401
    """The SDK counters, rates and temperature of the industrial cameras (a capture stage's ``camera_info``)."""
    infos = {s.get("camera", n.split(".", 1)[-1]): s["camera_info"] for n, s in stages.items()
             if n.startswith("capture.") and isinstance(s.get("camera_info"), dict)}
    if not infos:
        return
    fams = {
        "incomplete": counter("camera_frames_incomplete", "incomplete frames from the camera SDK", ["camera"]),
        "lost": counter("camera_frames_lost", "frames the camera made that never arrived (frame id gaps)",
                        ["camera"]),
        "buffer_underruns": counter("camera_buffer_underruns", "SDK buffer underruns", ["camera"]),
        "disconnects": counter("camera_disconnects", "camera removed or link broken (then reconnected)", ["camera"]),
        "frame_rate": gauge("camera_frame_rate", "frames delivered per second, measured", ["camera"]),
        "trigger_rate": gauge("camera_trigger_rate", "frames started per second (triggers), measured", ["camera"]),
        "temperature_c": gauge("camera_temperature_celsius", "camera temperature where it has one", ["camera"]),
    }
    for cam, info in sorted(infos.items()):
        for key, fam in fams.items():
            if isinstance(info.get(key), int | float):
                fam.add_metric([cam], float(info[key]))
    yield from fams.values()
