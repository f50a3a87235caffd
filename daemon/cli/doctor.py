"""``knitwatch doctor``: check an installation piece by piece and say how to fix what is wrong (exit
code 1 when anything failed)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from knitwatch.daemon.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    CliError,
    add_config_option,
    fmt_bytes,
    load_config,
    table,
)
from knitwatch.daemon.cli.status import api_base_url, api_get

log = structlog.get_logger(__name__)


@dataclass
class Check:
    name: str
    status: str  # OK | WARN | FAIL | SKIP
    detail: str
    fix: str = ""


def _check_config(args: argparse.Namespace) -> tuple[Any, Check]:  # noqa: ANN401
    from knitwatch.config.settings import resolve_config_path

    path = resolve_config_path(args.config)
    where = str(path) if path else "built-in defaults + environment (no /etc/knitwatch/knitwatch.toml)"
    try:
        settings = load_config(args)
    except CliError as e:
        return None, Check("config", "FAIL", str(e).splitlines()[0] if str(e) else "invalid",
                           "fix the keys named above; check with: knitwatch config check --config PATH")
    if path is None:
        return settings, Check("config", "WARN", f"valid, but {where}",
                               "copy config/knitwatch.example.toml to /etc/knitwatch/knitwatch.toml and edit it")
    return settings, Check("config", "OK", f"{where} is valid ({len(settings.cameras)} camera(s))")


def _check_model(settings: Any) -> Check:  # noqa: ANN401
    path = settings.model.checkpoint
    if path is None:
        return Check("model", "FAIL", "no model configured ([model] checkpoint)",
                     "train one (knitwatch train ...) and set [model] checkpoint = PATH in the config")
    if not Path(path).is_file():
        return Check("model", "FAIL", f"{path}: no such file", "copy the checkpoint there or fix [model] checkpoint")
    if not os.access(path, os.R_OK):
        return Check("model", "FAIL", f"{path}: not readable by this user",
                     "chown knitwatch: the file, or chmod o+r (the service runs as user knitwatch)")
    try:
        from knitwatch.pipeline.detector import load_detector

        t0 = time.monotonic()
        det = load_detector(path, "cpu", "auto")
        det.warm_up(batch=1)
        ms = (time.monotonic() - t0) * 1000
    except Exception as e:  # noqa: BLE001 - any load error is the finding
        return Check("model", "FAIL", f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                     "use a checkpoint written by 'knitwatch train' with this knitwatch version")
    return Check("model", "OK", f"{path}: {det.kind}, tile {det.preprocess.get('tile')} px, image threshold "
                 f"{det.image_threshold:.4g} (loaded and ran in {ms:.0f} ms on the CPU)")


def _check_camera(cam: Any, timeout_s: float) -> Check:  # noqa: ANN401
    from knitwatch.pipeline.sources.base import SourceError, make_source

    name = f"camera {cam.id}"
    what = f"{cam.source} {cam.uri}" if cam.uri else cam.source
    fixes = {
        "opencv": "check the cable/URL and that user knitwatch can open it (group video for /dev/video*); "
                  "stop a running daemon first, it holds the camera",
        "folder": "check that the folder exists and holds images readable by user knitwatch",
        "simulator": "the simulator needs nothing: report this as a bug",
        "pylon": "see 'knitwatch cameras list' for the serials pylon sees and 'knitwatch cameras check' for the "
                 "settings; check the cable/power (GigE: the NIC's address and MTU); stop a running daemon first",
        "genicam": "check industrial.gentl_producer (the vendor's .cti), 'knitwatch cameras list' and the cable",
    }
    src = make_source(cam)
    t0 = time.monotonic()
    try:
        src.open()
        img = None
        while img is None and time.monotonic() - t0 < timeout_s:
            img = src.read()
            if img is None:
                time.sleep(0.05)
    except (SourceError, OSError, ValueError) as e:
        return Check(name, "FAIL", f"{what}: {e}", fixes[cam.source])
    finally:
        try:
            src.close()
        except Exception:  # noqa: BLE001, S110 - closing a broken source
            pass
    if img is None:
        return Check(name, "FAIL", f"{what}: opened, but no frame within {timeout_s:g} s", fixes[cam.source])
    shape = "x".join(str(v) for v in (img.shape[1], img.shape[0]))
    ch = "gray" if img.ndim == 2 else f"{img.shape[2]} channels"
    if cam.source in ("pylon", "genicam"):  # an industrial camera: which one, its settings as read back
        what = f"{cam.source} {getattr(src, 'model', '')} {getattr(src, 'serial', '')}".rstrip()
        applied = getattr(src, "settings", {})
        ch += "; " + ", ".join(f"{k}={v}" for k, v in applied.items()
                               if v is not None and k in ("pixel_format", "exposure_us", "gain_db", "trigger"))
    return Check(name, "OK", f"{what}: frame {shape} {ch} in {time.monotonic() - t0:.2f} s")


def _check_gpu(settings: Any) -> Check:  # noqa: ANN401
    from knitwatch.daemon.telemetry import GpuTelemetry

    tel = GpuTelemetry()
    devices = tel.read()
    tel.close()
    try:
        import torch

        cuda = torch.cuda.is_available()
        torch_cuda = torch.version.cuda
    except Exception:  # noqa: BLE001
        cuda, torch_cuda = False, None
    names = ", ".join(f"{d['index']}: {d.get('name', '?')} ({fmt_bytes(d.get('memory_total_bytes'))})"
                      for d in devices if "error" not in d)
    want = settings.inference.device
    if want == "cuda" and not cuda:
        return Check("GPU", "FAIL", f"[inference] device = 'cuda' but PyTorch sees no GPU (NVML: "
                     f"{names or tel.reason}; torch built for CUDA {torch_cuda})",
                     "install the NVIDIA driver and a CUDA build of torch; in the service allow the NVIDIA devices "
                     "(see systemd/knitwatch.service); or set device = 'auto'")
    if devices and not cuda:
        return Check("GPU", "WARN", f"NVML sees {names} but PyTorch cannot use it (torch CUDA {torch_cuda})",
                     "install a torch wheel built for this driver's CUDA version")
    if not devices and not cuda:
        return Check("GPU", "WARN", f"none ({tel.reason}): inference runs on the CPU",
                     "fine for the demo and small frames; a production camera needs a GPU")
    return Check("GPU", "OK", f"{names or 'CUDA device'}; PyTorch CUDA {torch_cuda}")


def _check_plc(settings: Any) -> Check:  # noqa: ANN401
    plc = settings.plc
    if plc.driver == "log":
        return Check("PLC", "WARN", "driver 'log': defects are only logged, nothing stops the machine",
                     "wire the machine: [plc] driver = \"modbus\" (or opcua/command) with its address")
    if plc.driver == "command":
        prog = plc.command[0]
        found = shutil.which(prog)
        if found is None:
            return Check("PLC", "FAIL", f"command {prog!r} not found or not executable",
                         "install it or fix [plc] command (a full path)")
        return Check("PLC", "OK", f"command {found} exists (not run: it would act)")
    from knitwatch.pipeline.actions import ActionError, build_driver

    drv = build_driver(plc)
    try:
        drv.connect()
        stop, alarm = drv.read_outputs()
    except ActionError as e:
        where = f"{plc.host}:{plc.port}" if plc.driver == "modbus" else plc.opcua_url
        return Check("PLC", "FAIL", f"{plc.driver} {where}: {e}",
                     "check the PLC's address/port and the network; the PLC must accept Modbus TCP from this host"
                     if plc.driver == "modbus" else "check the OPC UA URL, node ids and the network")
    finally:
        try:
            drv.shutdown()
        except Exception:  # noqa: BLE001, S110
            pass
    desc = drv.describe()
    state = "ON (a stop is latched: acknowledge with knitwatch ack)" if stop else "off"
    return Check("PLC", "OK", f"{desc.get('plc', desc.get('url', plc.driver))} answers; stop output {state}"
                 + (", alarm output on" if alarm and not stop else ""))


def _check_store(settings: Any) -> Check:  # noqa: ANN401
    from knitwatch.pipeline.store.database import DB_NAME, Store, StoreError

    path = Path(settings.store.path)
    limit = settings.store.max_gb * 1e9
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as e:
        return Check("store", "FAIL", f"{path}: {e}", "fix [store] path")
    free = f"{fmt_bytes(usage.free)} free of {fmt_bytes(usage.total)}"
    if not path.exists():
        if not os.access(probe, os.W_OK):
            return Check("store", "FAIL", f"{path} does not exist and {probe} is not writable",
                         f"create it: install -d -o knitwatch -g knitwatch {path} (systemd's StateDirectory does)")
        return Check("store", "WARN", f"{path} does not exist yet (created at the first start); {free}",
                     "start the daemon once, or create it")
    if not os.access(path, os.W_OK):
        return Check("store", "FAIL", f"{path} is not writable by this user", f"chown -R knitwatch: {path}")
    if not (path / DB_NAME).exists():
        return Check("store", "WARN", f"{path} holds no event index yet (created at the first start); {free}",
                     "start the daemon once")
    try:
        store = Store(path, retention_days=settings.store.retention_days, max_gb=settings.store.max_gb, fsync=False,
                      create=False)
        st = store.stats()
        latched = store.latched()
        store.close()
    except StoreError as e:
        return Check("store", "FAIL", str(e), "check the file permissions; move a damaged events.sqlite3 away")
    used = st["bytes"]
    detail = f"{path}: {st['events']} event(s), {fmt_bytes(used)}; {free}"
    if latched["stop"] or latched["alarm"]:
        detail += (f"; latched: stop {', '.join(latched['stop']) or '-'}, "
                   f"alarm {', '.join(latched['alarm']) or '-'}")
    if usage.free < 1e9:
        return Check("store", "FAIL", detail, "free disk space (under 1 GB left: event pictures cannot be written)")
    if usage.free < limit - used:
        return Check("store", "WARN", detail + f"; less free space than [store] max_gb = {settings.store.max_gb:g}",
                     "lower [store] max_gb or free space: the disk fills before retention deletes anything")
    return Check("store", "OK", detail)


def _check_api(settings: Any) -> tuple[Check, dict[str, Any] | None]:  # noqa: ANN401
    from knitwatch.daemon.api.security import ApiError, load_token

    if not settings.api.enabled:
        return Check("API", "SKIP", "[api] enabled = false"), None
    try:
        token = load_token(settings.api)
    except ApiError as e:
        return Check("API", "FAIL", str(e), "make the token file readable by user knitwatch and non-empty"), None
    url = api_base_url(settings)
    try:
        code, body = api_get(f"{url}/api/stats", token, timeout=2.0)
    except (OSError, ValueError):
        return Check("API", "OK", f"{url}: no daemon running (port free for it)"
                     + ("; token required" if token else "")), None
    if code == 200 and isinstance(body, dict):
        state = "healthy" if body.get("healthy") else "NOT healthy"
        return Check("API", "OK" if body.get("healthy") else "WARN", f"{url}: a daemon answers, {state}",
                     "" if body.get("healthy") else "see knitwatch status and journalctl -u knitwatch"), body
    return Check("API", "WARN", f"{url} answered {code} (another program on this port, or a wrong token?)",
                 "set [api] port to a free port, or the right token"), None


def _check_key_files(settings: Any) -> list[Check]:  # noqa: ANN401
    """The key files named in the configuration (CURVE keys, the API token file): readable, the right kind,
    secrets mode 0600."""
    from knitwatch.daemon.cli.keyfiles import key_file_checks

    return [Check(k.field, k.status, k.detail, k.fix) for k in key_file_checks(settings)]


def cmd_doctor(args: argparse.Namespace) -> int:
    settings, cfg = _check_config(args)
    checks = [cfg]
    if settings is not None:
        api_check, running = _check_api(settings)
        checks.append(_check_model(settings))
        checks += _check_key_files(settings)
        for cam in settings.cameras:
            live = (running or {}).get("cameras", {}).get(cam.id) if running else None
            if live is not None and cam.source in ("opencv", "pylon", "genicam"):  # a camera opens once
                fps = live.get("fps")
                checks.append(Check(f"camera {cam.id}", "OK" if fps else "WARN",
                                    f"held by the running daemon: {fps or 0:.2f} fps"))
            else:
                checks.append(_check_camera(cam, args.camera_timeout))
        checks.append(_check_gpu(settings))
        checks.append(_check_plc(settings))
        checks.append(_check_store(settings))
        checks.append(api_check)
    if args.json:
        sys.stdout.write(json.dumps([c.__dict__ for c in checks], indent=2) + "\n")
    else:
        rows = [[c.name, c.status, c.detail] for c in checks]
        text = table(rows, ["CHECK", "STATUS", "DETAIL"])
        fixes = [f"  {c.name}: {c.fix}" for c in checks if c.fix and c.status in ("FAIL", "WARN")]
        if fixes:
            text += "\nto fix:\n" + "\n".join(fixes) + "\n"
        sys.stdout.write(text)
    failed = [c.name for c in checks if c.status == "FAIL"]
    if failed:
        log.error("doctor found problems", failed=failed)
        return EXIT_FAIL
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- parser


def register(sub: argparse._SubParsersAction) -> None:
    dr = sub.add_parser("doctor", help="check the installation: config, cameras, model, GPU, PLC, store, API",
                        description="Check the configuration, open each camera briefly, load the model, look for a "
                        "GPU, connect to the PLC (read only), check the store's disk space and the API. Prints a "
                        "table with a fix for each problem; exit code 1 when something failed.")
    add_config_option(dr)
    dr.add_argument("--camera-timeout", type=float, default=5.0, help="seconds to wait for a camera's first frame")
    dr.add_argument("--json", action="store_true", help="print JSON")
    dr.set_defaults(func=cmd_doctor)
