"""``knitwatch bench model``: how fast a model runs, per variant, tile size, batch size and precision.

What is timed: one batch of uint8 tiles in, anomaly maps and scores out - the input normalisation,
the host-to-device copy and the copy of the maps back included, as in the inference worker. Tiles are
synthetic fabric-like images (speed does not depend on their content).

Variants (``--variants``, comma separated): a precision ``fp32``, ``bf16`` (autocast; CPU and CUDA) or
``fp16`` (autocast; CUDA only), optionally ``-cl`` (channels_last memory format) and optionally the
prefix ``compile-`` (``torch.compile``); or ``ort`` (the ONNX export run by ONNX Runtime, fp32). Defaults:
CPU ``fp32,fp32-cl,bf16-cl,ort``; CUDA ``fp32-cl,fp16-cl,bf16-cl,compile-fp16-cl``.

How it is measured:

* every variant runs in its own process (so its peak memory is its own: RSS from ``getrusage``, and
  ``torch.cuda.max_memory_allocated`` on a GPU); a process imports torch, loads the model, runs
  ``--warmup`` batches (not timed; ``torch.compile`` compiles in the first, its time is reported) and
  then waits;
* the timed repetitions run round-robin over the variants of one (model, tile, batch) group, one batch
  each in turn, ``--reps`` rounds: a change of background load hits all variants alike, so their
  ratios stay fair; tiles/s = batch / median batch latency; p50 and p99 of the batch latency;
* FLOPs per tile are counted once per model and tile with ``torch.utils.flop_counter.FlopCounterMode``
  (convolutions and matrix products, 2 FLOPs per multiply-add; element-wise work is not counted); the
  achieved fraction of the device's peak is FLOPs/tile x tiles/s / peak. CPU peak: physical cores x
  clock x FP32 FLOPs per cycle per core (32 with AVX2+FMA or AMD's AVX-512, 64 with Intel's AVX-512,
  an assumption printed with the table) unless ``--peak-gflops`` is given; CUDA: a datasheet table for
  H100/H200/A100 (dense), else ``--peak-gflops``;
* ``Δmap``: max |map - map of the fp32 variant| / range of the fp32 maps, on the first tiles of the batch.

Without a checkpoint (``--model KIND``) the weights are random (seeded): speed does not depend on them,
and the output says so. Results: a table on the terminal and JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from knitwatch.daemon.cli.common import CliError, add_device_option
from knitwatch.daemon.logs import setup_logging

log = structlog.get_logger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_VARIANTS = {"cpu": "fp32,fp32-cl,bf16-cl,ort", "cuda": "fp32-cl,fp16-cl,bf16-cl,compile-fp16-cl"}
DEFAULT_BATCHES = {"cpu": "8", "cuda": "64,256"}
DEFAULT_REPS = {"cpu": 5, "cuda": 20}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
CANONICAL_TILE = {"efficientad": 256, "msflow": 128}  # the papers'/seed's tile sizes (used on GPUs)
CPU_DEFAULT_TILE = 128
# Dense peak GFLOP/s from NVIDIA's datasheets (SXM unless named): (fp32, fp16/bf16 tensor cores).
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 51_200.0, 756_000.0),
    ("H100", 66_900.0, 989_400.0),
    ("H200", 66_900.0, 989_400.0),
    ("A100", 19_500.0, 312_000.0),
)


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str  # torch | compile | onnxruntime
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool

    @property
    def label(self) -> str:
        if self.backend == "onnxruntime":
            return "onnxruntime fp32"
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{'torch.compile' if self.backend == 'compile' else 'torch'} {self.precision} {layout}"


def parse_variant(name: str) -> Variant:
    """'fp32', 'bf16-cl', 'compile-fp16-cl', 'ort' ... -> Variant; ValueError naming the problem."""
    n = name.strip().lower()
    if n in ("ort", "onnxruntime", "ort-fp32"):
        return Variant("ort", "onnxruntime", "fp32", False)
    tokens = n.split("-")
    backend = "torch"
    if tokens and tokens[0] == "compile":
        backend, tokens = "compile", tokens[1:]
    cl = bool(tokens) and tokens[-1] == "cl"
    if cl:
        tokens = tokens[:-1]
    if len(tokens) != 1 or tokens[0] not in PRECISIONS:
        raise ValueError(f"unknown variant {name!r}: use [compile-]fp32|bf16|fp16[-cl] or ort")
    return Variant(n, backend, tokens[0], cl)


# ---------------------------------------------------------------------------------------------- the device


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def cpu_peak_gflops(threads: int) -> tuple[float, str]:
    """(estimated FP32 peak GFLOP/s of the cores used, the assumption in words)."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    vendor = info.get("vendor_id", "")
    try:
        per_core_threads = max(1, int(info["siblings"]) // max(1, int(info["cpu cores"])))
    except (KeyError, ValueError):
        per_core_threads = 1
    cores = max(1, threads // per_core_threads)
    ghz, source = None, "maximum (cpufreq)"
    with contextlib.suppress(OSError, ValueError):
        ghz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    if ghz is None:
        source = "nominal (/proc/cpuinfo)"
        with contextlib.suppress(KeyError, ValueError):
            ghz = float(info["cpu MHz"]) / 1000.0
    if ghz is None:
        ghz, source = 2.5, "assumed (unknown)"
    if "avx512f" in flags and vendor == "GenuineIntel":
        per_cycle, why = 64, "2 AVX-512 FMA units"
    elif "avx512f" in flags or ("avx2" in flags and "fma" in flags):
        per_cycle, why = 32, "2 x 256-bit FMA units (AVX2, or AMD's double-pumped AVX-512)"
    elif "avx" in flags:
        per_cycle, why = 16, "AVX without FMA"
    else:
        per_cycle, why = 8, "SSE"
    peak = cores * ghz * per_cycle
    words = (f"{cores} core(s) x {ghz:.2f} GHz x {per_cycle} FP32 FLOP/cycle ({why}) = {peak:.0f} GFLOP/s; "
             f"the clock is the {source} one, a turbo clock above it makes the fractions read high; "
             "bf16 figures are also given as a fraction of this FP32 peak")
    return peak, words


def gpu_peak_gflops(name: str, precision: str) -> float | None:
    for key, fp32, tensor in GPU_PEAKS:
        if key in name:
            return fp32 if precision == "fp32" else tensor
    return None


# ---------------------------------------------------------------------------------------------- the worker process


def _worker_setup(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Load the variant's model and return (run_one_batch, facts). Runs in the worker process."""
    import torch

    from knitwatch.models.export import example_tiles

    v = Variant(**spec["variant"])
    threads = int(spec.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    device = spec["device"]
    from knitwatch.pipeline.offline.evaluate import process_memory_mb

    facts: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                             "rss_baseline_mb": round(process_memory_mb("VmRSS"), 1)}
    tiles = example_tiles(int(spec["batch"]), int(spec["tile"]), bool(spec["grayscale"]), seed=3)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if v.backend == "onnxruntime":
        from knitwatch.pipeline.detector import OnnxTileModel

        ort_model = OnnxTileModel(spec["onnx"], device, threads=threads)

        def run() -> tuple[np.ndarray, np.ndarray]:
            return ort_model.predict(tiles)

        return run, facts

    from knitwatch.models.base import tiles_to_tensor
    from knitwatch.models.registry import build_model

    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    model = build_model(spec["checkpoint"]).to(device).eval().to(memory_format=fmt)
    fwd = model
    if v.backend == "compile":
        fwd = torch.compile(model)
    x_host = tiles_to_tensor(tiles)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(v.precision)

    def run() -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            x = model.normalize_input(x_host.to(device, non_blocking=True)).contiguous(memory_format=fmt)
            with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
                m, s = fwd(x)
            return m[:, 0].float().cpu().numpy(), s.float().cpu().numpy()

    return run, facts


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main() -> int:
    """The worker process: a JSON spec on the first stdin line, then commands 'rep' and 'finish'."""
    from knitwatch.pipeline.offline.evaluate import process_memory_mb

    setup_logging("bench.worker", level="ERROR", fmt="json")
    spec = json.loads(sys.stdin.readline())
    t0 = time.perf_counter()
    try:
        run, facts = _worker_setup(spec)
        warm = []
        for _ in range(max(1, int(spec["warmup"]))):
            t = time.perf_counter()
            maps, scores = run()
            warm.append(time.perf_counter() - t)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as the variant's note
        _send({"event": "error", "message": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
        return 1
    facts.update(setup_s=round(time.perf_counter() - t0, 2), first_batch_s=round(warm[0], 3))
    _send({"event": "ready", **facts})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "rep":
            t = time.perf_counter()
            run()
            _send({"event": "rep", "s": time.perf_counter() - t})
        elif cmd == "finish":
            k = min(4, maps.shape[0])
            np.savez(spec["sample_path"], maps=maps[:k], scores=scores[:k])
            out: dict[str, Any] = {"event": "done", "peak_rss_mb": round(process_memory_mb("VmHWM"), 1)}
            if spec["device"] == "cuda":
                import torch

                out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            _send(out)
            return 0
    return 0


class Worker:
    """A worker process seen from the parent (JSON lines over its stdin/stdout)."""

    def __init__(self, spec: dict[str, Any], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "knitwatch.daemon.bench.model"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, bufsize=1,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()

    def ask(self, cmd: str | None, timeout: float) -> dict[str, Any]:
        """Send ``cmd`` (None: only read) and return the reply; TimeoutError / RuntimeError otherwise."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if cmd is not None:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        if not self._sel.select(timeout):
            raise TimeoutError(f"no answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"worker exited (code {self.proc.poll()}): {' | '.join(tail) or 'no output'}")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._sel.close()
        self._log.close()


# ---------------------------------------------------------------------------------------------- the parent


@dataclass
class ModelCase:
    kind: str
    tile: int
    checkpoint: Path
    grayscale: bool
    random_weights: bool
    gflop_per_tile: float = float("nan")
    onnx: Path | None = None
    onnx_note: str | None = None
    notes: list[str] = field(default_factory=list)


def count_gflops(checkpoint: Path) -> float:
    """GFLOPs per tile (FlopCounterMode, batch 1, fp32)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from knitwatch.models.registry import build_model

    model = build_model(checkpoint).to("cpu").eval()
    x = torch.full((1, 1, model.tile_size, model.tile_size), 128, dtype=torch.uint8)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() / 1e9


def random_checkpoint(kind: str, tile: int, folder: Path) -> Path:
    """A seeded random-weight model of ``kind`` saved as a checkpoint (timing only)."""
    import torch

    from knitwatch.models.base import save_model
    from knitwatch.models.efficientad.model import EfficientAD

    torch.manual_seed(0)
    if kind.startswith("efficientad-"):
        model: Any = EfficientAD(kind.split("-", 1)[1], tile)
    elif kind.startswith("msflow-"):
        from knitwatch.models.export import example_tiles
        from knitwatch.models.msflow.model import MSFlow

        model = MSFlow(kind.split("-", 1)[1], tile, pretrained=False)
        # Standardise the random backbone's features on fabric-like tiles, so the flows and maps see
        # values of a real model's magnitude (a random backbone's deep features are tiny).
        x = torch.from_numpy(example_tiles(8, tile, True, seed=5))[:, None]
        with torch.no_grad():
            feats = model.extract(model.normalize_input(x))
        model.set_feature_stats([f.mean(dim=(0, 2, 3)) for f in feats], [f.std(dim=(0, 2, 3)) for f in feats])
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return save_model(folder / f"{kind}-{tile}.ckpt", model, preprocess={"tile": tile, "grayscale": True},
                      provenance={"id": f"random-{kind}-{tile}"})


def default_kinds() -> list[str]:
    """EfficientAD-S and MSFlow on every backbone whose pretrained weights are available offline."""
    from knitwatch.models.backbones.extractor import backbone_weights_available
    from knitwatch.models.registry import MSFLOW_BACKBONES

    out = ["efficientad-s"]
    for b in MSFLOW_BACKBONES:
        with contextlib.suppress(Exception):
            if backbone_weights_available(b):
                out.append(f"msflow-{b}")
    return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(t) for t in _split(text)]
    except ValueError:
        raise CliError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise CliError(f"{what} must be positive integers, got {text!r}")
    return vals


def _ort_available() -> str | None:
    """None when ONNX export and ONNX Runtime are usable, else why not."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(missing)} (pip install 'knitwatch[onnx]')" if missing else None


def prepare_cases(args: argparse.Namespace, device: str, workdir: Path, want_ort: bool) -> list[ModelCase]:
    from knitwatch.models.checkpoint import CheckpointError, load_checkpoint
    from knitwatch.models.registry import known_kinds

    cases: list[ModelCase] = []
    tiles_arg = _ints(args.tile, "--tile") if args.tile else None
    if args.checkpoint is not None:
        try:
            ckpt = load_checkpoint(args.checkpoint)
        except CheckpointError as e:
            raise CliError(str(e)) from None
        tile = int(ckpt.preprocess.get("tile") or ckpt.hparams["tile_size"])
        if tiles_arg and tiles_arg != [tile]:
            raise CliError(f"{args.checkpoint} is a {tile}x{tile} model; --tile cannot change that "
                           "(use --model KIND for other tile sizes, with random weights)")
        cases.append(ModelCase(ckpt.kind, tile, Path(args.checkpoint), bool(ckpt.preprocess.get("grayscale", True)),
                               False))
    else:
        kinds = _split(",".join(args.model)) if args.model else default_kinds()
        if kinds == ["all"]:
            kinds = known_kinds()
        unknown = [k for k in kinds if k not in known_kinds()]
        if unknown:
            raise CliError(f"unknown model kind(s) {unknown}; known: {', '.join(known_kinds())}")
        for kind in kinds:
            family = kind.split("-", 1)[0]
            for tile in tiles_arg or [CPU_DEFAULT_TILE if device == "cpu" else CANONICAL_TILE[family]]:
                try:
                    path = random_checkpoint(kind, tile, workdir)
                except ValueError as e:
                    raise CliError(f"{kind} at tile {tile}: {e}") from None
                cases.append(ModelCase(kind, tile, path, True, True))
    for case in cases:
        case.gflop_per_tile = count_gflops(case.checkpoint)
        if want_ort:
            why = _ort_available()
            if why is None:
                from knitwatch.models.export import ExportError, export_checkpoint

                try:
                    rep = export_checkpoint(case.checkpoint, workdir / f"{case.kind}-{case.tile}.onnx", check=False)
                    case.onnx = rep.path
                    case.notes.append(f"ONNX export took {rep.seconds:.1f} s")
                except ExportError as e:
                    why = str(e)
            case.onnx_note = why
    return cases


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_group(case: ModelCase, batch: int, variants: list[Variant], args: argparse.Namespace, device: str,
              workdir: Path, peak: dict[str, float | None]) -> list[dict[str, Any]]:
    """Time ``variants`` for one model and batch size, round-robin; one result row per variant."""
    rows: dict[str, dict[str, Any]] = {}
    workers: dict[str, Worker] = {}
    base = {"model": case.kind, "tile": case.tile, "batch": batch, "random_weights": case.random_weights,
            "gflop_per_tile": round(case.gflop_per_tile, 4)}
    try:
        for v in variants:
            row = {**base, "variant": v.name, "label": v.label, "status": "skipped"}
            rows[v.name] = row
            if v.precision == "fp16" and device != "cuda":
                row["note"] = "fp16 autocast needs CUDA"
                continue
            if v.backend == "onnxruntime" and case.onnx is None:
                row["note"] = f"onnxruntime skipped: {case.onnx_note}"
                continue
            spec = {"variant": asdict(v), "device": device, "batch": batch, "tile": case.tile,
                    "grayscale": case.grayscale, "checkpoint": str(case.checkpoint),
                    "onnx": str(case.onnx) if case.onnx else None, "warmup": args.warmup, "threads": args.threads,
                    "sample_path": str(workdir / f"sample-{case.kind}-{case.tile}-{batch}-{v.name}.npz")}
            w = Worker(spec, workdir / f"worker-{case.kind}-{case.tile}-{batch}-{v.name}.log")
            try:
                ready = w.ask(None, args.timeout)
            except (TimeoutError, RuntimeError) as e:
                w.proc.kill()
                w.close()
                what = "torch.compile" if v.backend == "compile" else "set-up"
                row["note"] = f"{what} failed: {e}"
                continue
            if ready.get("event") != "ready":
                w.close()
                row["note"] = f"failed: {ready.get('message')}"
                continue
            row.update({k: ready[k] for k in ("setup_s", "first_batch_s", "torch_threads", "rss_baseline_mb")})
            row["latencies_ms"] = []
            workers[v.name] = w
        for _ in range(args.reps):
            for name, w in list(workers.items()):
                try:
                    rows[name]["latencies_ms"].append(w.ask("rep", args.timeout)["s"] * 1000.0)
                except (TimeoutError, RuntimeError) as e:
                    rows[name]["note"] = f"stopped: {e}"
                    w.proc.kill()
                    w.close()
                    del workers[name]
        for name, w in workers.items():
            try:
                done = w.ask("finish", args.timeout)
                rows[name].update({k: v for k, v in done.items() if k != "event"})
                rows[name]["status"] = "ok"
            except (TimeoutError, RuntimeError) as e:
                rows[name]["note"] = f"no final report: {e}"
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.close()
    ref = None
    for v in variants:
        if v.backend == "torch" and v.precision == "fp32" and rows[v.name]["status"] == "ok":
            ref = np.load(workdir / f"sample-{case.kind}-{case.tile}-{batch}-{v.name}.npz")
            break
    for v in variants:
        row = rows[v.name]
        lat = row.get("latencies_ms") or []
        if row["status"] != "ok" or not lat:
            row["status"] = "skipped"
            continue
        p50 = _percentile(lat, 50)
        row.update(p50_ms=round(p50, 2), p99_ms=round(_percentile(lat, 99), 2),
                   tiles_per_s=round(batch / p50 * 1000, 2), latencies_ms=[round(x, 2) for x in lat])
        row["gflops"] = round(case.gflop_per_tile * row["tiles_per_s"], 2)
        pk = peak.get(v.precision) if device == "cuda" else peak.get("fp32")
        row["peak_fraction"] = round(row["gflops"] / pk, 4) if pk else None
        if ref is not None:
            s = np.load(workdir / f"sample-{case.kind}-{case.tile}-{batch}-{v.name}.npz")
            span = float(ref["maps"].max() - ref["maps"].min()) or 1.0
            row["map_max_rel_diff"] = float(np.abs(s["maps"] - ref["maps"]).max() / span)
    return [rows[v.name] for v in variants]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("model", "tile", "batch", "variant", "tiles/s", "p50 ms", "p99 ms", "peak MB", "GFLOP/tile", "% peak",
            "Δmap", "note")
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        mem = r.get("cuda_max_allocated_mb") if r.get("cuda_max_allocated_mb") is not None else r.get("peak_rss_mb")
        note = r.get("note", "")
        if ok and r.get("first_batch_s") is not None and r["variant"].startswith("compile"):
            note = f"first call (compile) {r['first_batch_s']:.1f} s"
        lines.append((
            r["model"], str(r["tile"]), str(r["batch"]), r["label"],
            f"{r['tiles_per_s']:.1f}" if ok else "-",
            f"{r['p50_ms']:.1f}" if ok else "-",
            f"{r['p99_ms']:.1f}" if ok else "-",
            f"{mem:.0f}" if ok and mem is not None else "-",
            f"{r['gflop_per_tile']:.2f}",
            f"{100 * r['peak_fraction']:.1f}" if ok and r.get("peak_fraction") is not None else "-",
            f"{r['map_max_rel_diff']:.1e}" if ok and r.get("map_max_rel_diff") is not None else "-",
            note,
        ))
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines]
    return "\n".join(out)


def machine_info(device: str, threads: int) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": device,
        "cpu": _cpuinfo().get("model name", platform.processor()),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cmd_bench_model(args: argparse.Namespace) -> int:
    from knitwatch.pipeline.detector import resolve_device

    setup_logging("bench", level=args.log_level or "ERROR", fmt=args.log_format or "auto")
    if args.checkpoint is not None and args.model:
        raise CliError("give either CKPT or --model, not both")
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        raise CliError(str(e)) from None
    try:
        variants = [parse_variant(v) for v in _split(args.variants or DEFAULT_VARIANTS[device])]
    except ValueError as e:
        raise CliError(str(e)) from None
    batches = _ints(args.batch or DEFAULT_BATCHES[device], "--batch")
    args.reps = args.reps or DEFAULT_REPS[device]
    args.warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[device]
    threads = args.threads or len(os.sched_getaffinity(0))
    args.threads = threads
    info = machine_info(device, threads)
    if args.peak_gflops:
        peak: dict[str, float | None] = dict.fromkeys(PRECISIONS, args.peak_gflops)
        info["peak"] = f"{args.peak_gflops:.0f} GFLOP/s (given with --peak-gflops)"
    elif device == "cpu":
        p, words = cpu_peak_gflops(threads)
        peak = dict.fromkeys(PRECISIONS, p)
        info["peak"] = words
    else:
        peak = {p: gpu_peak_gflops(info["gpu"], p) for p in PRECISIONS}
        info["peak"] = (f"{info['gpu']}: datasheet dense peak fp32 {peak['fp32']} / fp16-bf16 {peak['fp16']} GFLOP/s"
                        if peak["fp32"] else f"{info['gpu']}: peak unknown, pass --peak-gflops")
    workdir = Path(tempfile.mkdtemp(prefix="knitwatch-bench-model-"))
    rows: list[dict[str, Any]] = []
    try:
        cases = prepare_cases(args, device, workdir, any(v.backend == "onnxruntime" for v in variants))
        for case in cases:
            for batch in batches:
                log.info("benchmarking", model=case.kind, tile=case.tile, batch=batch)
                rows += run_group(case, batch, variants, args, device, workdir, peak)
                if not args.json:
                    sys.stderr.write(f"done: {case.kind} tile {case.tile} batch {batch}\n")
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    notes = []
    if any(c.random_weights for c in cases):
        notes.append("random-initialised weights (no checkpoint given): timing only, speed does not depend on them")
    notes += [f"{c.kind} {c.tile}: {n}" for c in cases for n in c.notes]
    busy = max(info["load_average_before"][0], info["load_average_after"][0])
    if device == "cpu" and busy > 0.5 * info["cpus_usable"]:
        notes.append(f"the CPU was busy with other work (load average up to {busy:.1f} on {info['cpus_usable']} "
                     "CPUs): absolute figures are low; ratios between variants stay fair (interleaved repetitions)")
    result = {"machine": info, "settings": {"reps": args.reps, "warmup": args.warmup, "batches": batches,
                                            "variants": [v.name for v in variants]},
              "notes": notes, "results": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(f"device: {device} ({info.get('gpu') or info['cpu']}), {threads} thread(s), torch "
                         f"{info['torch']}, onnxruntime {info.get('onnxruntime', '-')}\n")
        sys.stdout.write(f"peak: {info['peak']}\n")
        sys.stdout.write(f"timing: {args.warmup} warm-up batch(es), then {args.reps} repetitions per variant "
                         "round-robin; medians\n\n")
        sys.stdout.write(format_table(rows) + "\n")
        for n in notes:
            sys.stdout.write(f"note: {n}\n")
        if args.out:
            sys.stdout.write(f"JSON: {args.out}\n")
    return 0


def register(bsub: argparse._SubParsersAction) -> None:
    """Add ``model`` to the ``bench`` subcommands."""
    p = bsub.add_parser("model", help="model speed per variant, tile, batch and precision (tiles/s, latency, "
                        "memory, FLOPs)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="?", metavar="CKPT", help="a checkpoint (else --model)")
    p.add_argument("--model", action="append", metavar="KIND",
                   help="model kind(s) with random weights, e.g. efficientad-s,msflow-resnet18 or 'all' "
                   "(default: efficientad-s and MSFlow on each backbone whose weights are available offline)")
    p.add_argument("--tile", metavar="N[,N...]", help="tile sizes (default: the checkpoint's; else 128 on a CPU, "
                   "256 for EfficientAD and 128 for MSFlow on a GPU)")
    p.add_argument("--batch", metavar="N[,N...]", help="batch sizes (default 8 on a CPU, 64,256 on a GPU)")
    p.add_argument("--variants", metavar="V[,V...]",
                   help="[compile-]fp32|bf16|fp16[-cl] or ort (default CPU: fp32,fp32-cl,bf16-cl,ort; "
                   "GPU: fp32-cl,fp16-cl,bf16-cl,compile-fp16-cl)")
    p.add_argument("--reps", type=int, metavar="N", help="timed batches per variant (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, metavar="N", help="untimed batches first (default 1 CPU, 3 GPU)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads (default: all usable CPUs)")
    add_device_option(p)
    p.add_argument("--peak-gflops", type=float, metavar="X", help="the device's peak GFLOP/s (default: estimated)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="give up on a variant that does not answer within S seconds (set-up incl. torch.compile, "
                   "or one batch; default 600)")
    p.add_argument("--out", type=Path, default=Path("bench-model.json"), metavar="FILE",
                   help="JSON results (default bench-model.json)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--keep-workdir", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench_model)


if __name__ == "__main__":
    sys.exit(worker_main())
