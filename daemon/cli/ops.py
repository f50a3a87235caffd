"""Operations commands: ``knitwatch defects list|show|export``, ``knitwatch status``, ``knitwatch doctor``.

``defects`` reads the store directly (``[store] path``; the daemon need not run), ``status`` asks the
running daemon's HTTP API, ``doctor`` checks an installation piece by piece and says how to fix what
is wrong (exit code 1 when anything failed).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from knitwatch.daemon.cli.main import EXIT_FAIL, EXIT_OK, CliError, load_config

log = structlog.get_logger(__name__)

_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_AGE_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: dt.datetime | None = None) -> int:
    """A point in time as ns since the epoch, from what a person types:

    - an age: ``90s``, ``15m``, ``2h``, ``3d``, ``1w`` (that long before now);
    - ``now``, ``today`` (local midnight), ``yesterday``;
    - an ISO 8601 date or time (``2024-05-01``, ``2024-05-01T14:30``, ``...Z``, ``...+02:00``;
      without a zone it is local time);
    - epoch seconds (``1714550000``, fractions allowed).

    ValueError with a hint otherwise."""
    now = now or dt.datetime.now().astimezone()
    s = str(text).strip()
    if not s:
        raise ValueError("empty time")
    m = _AGE_RE.match(s)
    if m:
        return int((now.timestamp() - float(m.group(1)) * _AGE_S[m.group(2).lower()]) * 1e9)
    low = s.lower()
    if low == "now":
        return int(now.timestamp() * 1e9)
    if low in ("today", "yesterday"):
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if low == "yesterday":
            midnight -= dt.timedelta(days=1)
        return int(midnight.timestamp() * 1e9)
    if re.fullmatch(r"\d{9,11}(\.\d+)?", s):
        return int(float(s) * 1e9)
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith(("Z", "z")) else s)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time: use an age (30m, 2h, 7d), today, an ISO date/time "
                         "(2024-05-01T14:30) or epoch seconds") from None
    if t.tzinfo is None:
        t = t.astimezone()  # local time
    return int(t.timestamp() * 1e9)


def _local(t_ns: int | None) -> str:
    if t_ns is None:
        return "-"
    return dt.datetime.fromtimestamp(t_ns / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _open_store(args: argparse.Namespace) -> Any:  # noqa: ANN401 - a Store
    from knitwatch.pipeline.store.database import Store, StoreError

    settings = load_config(args)
    try:
        return settings, Store(settings.store.path, create=False, fsync=settings.store.fsync)
    except StoreError as e:
        raise CliError(f"{e}; is [store] path right, and did the daemon run once?", EXIT_FAIL) from None


def _filters(args: argparse.Namespace, settings: Any) -> dict[str, Any]:  # noqa: ANN401
    cams = [c.id for c in settings.cameras]
    if args.camera is not None and args.camera not in cams:
        log.warning("camera is not in the configuration (listing its stored events anyway)", camera=args.camera,
                    configured=cams)
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as e:
        raise CliError(str(e)) from None
    out: dict[str, Any] = {"camera": args.camera, "since_ns": since, "until_ns": until, "severity": args.severity,
                           "action": args.action}
    if getattr(args, "kept", False):
        out["keep"] = True
    if getattr(args, "false_positive", False):
        out["false_positive"] = True
    if getattr(args, "unacknowledged", False):
        out["acknowledged"] = False
    return out


def _iter_events(store: Any, filters: dict[str, Any], limit: int | None = None) -> list[dict[str, Any]]:  # noqa: ANN401
    from knitwatch.pipeline.store.database import MAX_PAGE

    items: list[dict[str, Any]] = []
    offset = 0
    while limit is None or len(items) < limit:
        page = store.list_events(**filters, limit=MAX_PAGE if limit is None else min(MAX_PAGE, limit - len(items)),
                                 offset=offset)
        items += page["items"]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            break
    return items


def _flags(e: dict[str, Any]) -> str:
    f = []
    if e["action"] in ("stop", "alarm"):
        f.append("acked" if e["acknowledged"] else "LATCHED")
    if e["keep"]:
        f.append("keep")
    if e["false_positive"]:
        f.append("false-positive")
    if e["state"] != "complete":
        f.append(e["state"])
    return ",".join(f)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- defects


def cmd_defects_list(args: argparse.Namespace) -> int:
    settings, store = _open_store(args)
    try:
        filters = _filters(args, settings)
        page = store.list_events(**filters, limit=args.limit, offset=args.offset)
    finally:
        store.close()
    if args.json:
        sys.stdout.write(json.dumps(page, indent=2) + "\n")
        return EXIT_OK
    rows = [[str(e["id"]), _local(e["t_wall_ns"]), e["camera"], e["severity"], e["action"], f"{e['image_score']:.3f}",
             str(e["max_area_px"]), _flags(e)] for e in page["items"]]
    if rows:
        sys.stdout.write(table(rows, ["ID", "TIME", "CAMERA", "SEVERITY", "ACTION", "SCORE", "AREA_PX", "FLAGS"]))
    shown = len(rows)
    more = f" (--offset {page['offset'] + shown} for more)" if page["offset"] + shown < page["total"] else ""
    sys.stdout.write(f"{shown} of {page['total']} event(s){more}\n")
    return EXIT_OK


def cmd_defects_show(args: argparse.Namespace) -> int:
    settings, store = _open_store(args)
    try:
        try:
            e = store.get_event(args.id)
        except ValueError as err:
            raise CliError(f"{args.id!r}: {err}") from None
        if e is None:
            raise CliError(f"no event {args.id} in {settings.store.path}", EXIT_FAIL)
        paths = {k: store.file_path(e["id"], k) for k in e["files"]}
    finally:
        store.close()
    if args.json:
        e["paths"] = {k: str(p) if p else None for k, p in paths.items()}
        sys.stdout.write(json.dumps(e, indent=2) + "\n")
        return EXIT_OK
    rec = e.get("record", {})
    out = [
        f"event {e['id']}  {_local(e['t_wall_ns'])} ({e['time']})",
        f"  camera      {e['camera']}, frame {e['seq']}",
        f"  severity    {e['severity']} -> action {e['action']} ({e['action_state']})",
        f"  score       {e['image_score']:.4f} (image threshold {rec.get('thresholds', {}).get('image', '?')})",
        f"  largest     {e['max_area_px']} px, {rec.get('n_regions', '?')} region(s)",
        f"  flags       {_flags(e) or '-'}",
    ]
    if e["acknowledged"]:
        out.append(f"  acknowledged {_local(e['acked_ns'])} (ack #{e['ack_id']})")
    if e["false_positive"]:
        out.append(f"  false positive: by {e['fp_by'] or '?'}: {e['fp_note'] or ''}")
    for r in rec.get("regions", [])[:10]:
        out.append(f"  region      area {r.get('area')} px, bbox {r.get('bbox')}, peak {r.get('peak', 0):.3f}")
    for a in rec.get("actions", [])[:10]:
        out.append(f"  action      {json.dumps(a)}")
    if rec.get("model"):
        out.append(f"  model       {rec['model'].get('kind')} {rec['model'].get('id')}")
    for k, p in paths.items():
        out.append(f"  {k:<11} {p if p else '(missing)'}")
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK


INDEX_FIELDS = ["id", "time", "camera", "seq", "severity", "action", "image_score", "max_area_px", "acknowledged",
                "keep", "false_positive", "fp_by", "fp_note", "state", "files"]


def cmd_defects_export(args: argparse.Namespace) -> int:
    from knitwatch.pipeline.store.database import FILE_KINDS

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FILE_KINDS]
    if bad:
        raise CliError(f"unknown picture kind(s) {', '.join(bad)}; known: {', '.join(FILE_KINDS)}")
    out = Path(args.out)
    as_zip = out.suffix.lower() == ".zip"
    if as_zip and out.exists() and not args.force:
        raise CliError(f"{out} exists (--force to replace it)")
    if not as_zip and out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CliError(f"{out} exists and is not an empty folder (--force to write into it)")
    settings, store = _open_store(args)
    try:
        events = _iter_events(store, _filters(args, settings), args.limit)
        files: list[tuple[str, Path | bytes]] = []  # (name in the export, source path or content)
        index = []
        for e in events:
            full = store.get_event(e["id"])
            if full is None:  # deleted by retention meanwhile
                continue
            names = {}
            for k in kinds:
                p = store.file_path(e["id"], k)
                if p is not None:
                    name = f"events/{e['id']:08d}/{p.name}"
                    files.append((name, p))
                    names[k] = name
            rec_name = f"events/{e['id']:08d}/event.json"
            full["exported_files"] = names
            index.append(full)
            files.append((rec_name, json.dumps(full.get("record", {}), indent=2).encode()))
    finally:
        store.close()
    csv_buf = io.StringIO()
    w = csv.writer(csv_buf)
    w.writerow([*INDEX_FIELDS, *kinds])
    for e in index:
        row = [e.get(f) if f != "files" else ";".join(k for k, ok in e["files"].items() if ok) for f in INDEX_FIELDS]
        w.writerow([*("" if v is None else v for v in row), *(e["exported_files"].get(k, "") for k in kinds)])
    meta = {"exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "store": str(settings.store.path),
            "filters": {k: v for k, v in vars(args).items() if k in ("since", "until", "camera", "severity", "action",
                                                                     "kept", "false_positive") and v},
            "kinds": kinds, "count": len(index), "events": index}
    extra = {"index.csv": csv_buf.getvalue().encode(), "index.json": json.dumps(meta, indent=2).encode()}
    if as_zip:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w") as z:
                for name, src in files:
                    if isinstance(src, bytes):
                        z.writestr(name, src, compress_type=zipfile.ZIP_DEFLATED)
                    else:  # PNG/JPEG are compressed already
                        z.write(src, name, compress_type=zipfile.ZIP_STORED)
                for name, data in extra.items():
                    z.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        for name, src in files:
            dst = out / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dst.write_bytes(src)
            else:
                shutil.copy2(src, dst)
        for name, data in extra.items():
            (out / name).write_bytes(data)
    n_pics = sum(1 for _, s in files if not isinstance(s, bytes))
    sys.stdout.write(f"exported {len(index)} event(s), {n_pics} picture(s) to {out}\n")
    log.info("defects exported", out=str(out), events=len(index), pictures=n_pics)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- status


def api_base_url(settings: Any) -> str:  # noqa: ANN401
    host = settings.api.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api.port}"


def api_get(url: str, token: str | None, timeout: float = 5.0) -> tuple[int, Any]:
    """GET a JSON document from the daemon's API: (status code, body). OSError when unreachable."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - http(s) URL from config/CLI
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read() or b"null")
        except ValueError:
            body = None
        return e.code, body


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def _fmt_age(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def render_status(st: dict[str, Any], url: str) -> str:
    out = [f"knitwatch at {url}: {'healthy' if st.get('healthy') else 'NOT HEALTHY'}, "
           f"{'inspecting' if st.get('ready') else 'starting'}, up {_fmt_age(st.get('uptime_s'))}"]
    alarm = st.get("alarm") or {}
    if alarm.get("latched"):
        out.append(f"ALARM LATCHED: stop {', '.join(alarm.get('stop') or []) or 'none'}, alarm "
                   f"{', '.join(alarm.get('alarm') or []) or 'none'} (acknowledge: knitwatch ack, or the web page)")
    rows = []
    for cam, c in (st.get("cameras") or {}).items():
        lat = c.get("latency_ms") or {}
        last = c.get("last_event") or {}
        latched = c.get("latched") or {}
        rows.append([
            cam,
            "-" if c.get("fps") is None else f"{c['fps']:.2f}",
            "-" if c.get("coverage") is None else f"{100 * c['coverage']:.1f}%",
            str(c.get("captured", "-")), str(c.get("inspected", "-")), str(c.get("dropped", "-")),
            f"{lat['p50']:.0f}/{lat['p99']:.0f} ms" if "p50" in lat and "p99" in lat else "-",
            str(c.get("events", "-")),
            "STOP" if latched.get("stop") else ("ALARM" if latched.get("alarm") else "-"),
            f"#{last['id']} {last.get('severity', '')} {_local(last.get('t_wall_ns'))}" if last else "-",
        ])
    if rows:
        out.append(table(rows, ["CAMERA", "FPS", "COVERAGE", "CAPTURED", "INSPECTED", "DROPPED", "LATENCY p50/p99",
                                "EVENTS", "LATCHED", "LAST DEFECT"]).rstrip())
    stages = st.get("stages") or {}
    if stages:
        parts = []
        for name, s in stages.items():
            flag = "" if s.get("alive") else " DOWN"
            parts.append(f"{name}{flag}" + (f" ({s['restarts']} restarts)" if s.get("restarts") else ""))
        out.append("stages: " + ", ".join(parts))
    actions = (stages.get("alert") or {}).get("actions") or {}
    if actions:
        outputs = actions.get("outputs") or {}
        out.append(f"PLC: {actions.get('driver')} {'connected' if actions.get('plc_connected') else 'NOT CONNECTED'}"
                   + (f", stop output {'ON' if outputs.get('stop') else 'off'}" if outputs else "")
                   + (f", last error: {actions['last_error']}" if actions.get("last_error") else ""))
    store = st.get("store") or {}
    if store:
        out.append(f"store: {store.get('events', '?')} event(s), {_fmt_bytes(store.get('bytes'))}"
                   + (f", errors {store['errors']}" if store.get("errors") else ""))
    for d in (st.get("gpu") or {}).get("devices", []):
        if "error" in d:
            out.append(f"GPU {d['index']}: {d['error']}")
            continue
        util = f"{d['utilization_percent']}% busy, " if "utilization_percent" in d else ""
        out.append(f"GPU {d['index']} {d.get('name', '')}: {util}memory {_fmt_bytes(d['memory_used_bytes'])} of "
                   f"{_fmt_bytes(d['memory_total_bytes'])}")
    for name, b in ((st.get("gpu") or {}).get("cuda_memory_allocated_bytes") or {}).items():
        out.append(f"CUDA memory allocated by {name}: {_fmt_bytes(b)}")
    return "\n".join(out) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    from knitwatch.daemon.api.app import ApiError, load_token

    settings = load_config(args)
    url = (args.url or api_base_url(settings)).rstrip("/")
    try:
        token = args.token or load_token(settings.api)
    except ApiError as e:
        raise CliError(str(e)) from None
    try:
        code, body = api_get(f"{url}/api/stats", token, timeout=args.timeout)
    except (OSError, ValueError) as e:
        raise CliError(f"no knitwatch daemon answers at {url} ({getattr(e, 'reason', e)}); is it running? "
                       "(systemctl status knitwatch; journalctl -u knitwatch)", EXIT_FAIL) from None
    if code == 401:
        raise CliError(f"{url} wants an API token: set [api] token/token_file or pass --token", EXIT_FAIL)
    if code != 200 or not isinstance(body, dict):
        raise CliError(f"{url}/api/stats answered {code}: {body}", EXIT_FAIL)
    if args.json:
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
    else:
        sys.stdout.write(render_status(body, url))
    return EXIT_OK if body.get("healthy") else EXIT_FAIL


# ---------------------------------------------------------------------------------------------- doctor


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
        det = load_detector(path, "cpu")
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
    }
    src = make_source(cam.model_dump(mode="json"))
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
    names = ", ".join(f"{d['index']}: {d.get('name', '?')} ({_fmt_bytes(d.get('memory_total_bytes'))})"
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

    drv = build_driver(plc.model_dump(mode="json"))
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
    from knitwatch.pipeline.store.database import Store, StoreError

    path = Path(settings.store.path)
    limit = settings.store.max_gb * 1e9
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as e:
        return Check("store", "FAIL", f"{path}: {e}", "fix [store] path")
    free = f"{_fmt_bytes(usage.free)} free of {_fmt_bytes(usage.total)}"
    if not path.exists():
        if not os.access(probe, os.W_OK):
            return Check("store", "FAIL", f"{path} does not exist and {probe} is not writable",
                         f"create it: install -d -o knitwatch -g knitwatch {path} (systemd's StateDirectory does)")
        return Check("store", "WARN", f"{path} does not exist yet (created at the first start); {free}",
                     "start the daemon once, or create it")
    if not os.access(path, os.W_OK):
        return Check("store", "FAIL", f"{path} is not writable by this user", f"chown -R knitwatch: {path}")
    try:
        store = Store(path, create=False, fsync=False)
        st = store.stats()
        latched = store.latched()
        store.close()
    except StoreError as e:
        return Check("store", "FAIL", str(e), "check the file permissions; move a damaged events.sqlite3 away")
    used = st["bytes"]
    detail = f"{path}: {st['events']} event(s), {_fmt_bytes(used)}; {free}"
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
    from knitwatch.daemon.api.app import ApiError, load_token

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


def cmd_doctor(args: argparse.Namespace) -> int:
    settings, cfg = _check_config(args)
    checks = [cfg]
    if settings is not None:
        api_check, running = _check_api(settings)
        checks.append(_check_model(settings))
        for cam in settings.cameras:
            live = (running or {}).get("cameras", {}).get(cam.id) if running else None
            if live is not None and cam.source == "opencv":
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


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", metavar="WHEN", help="from this time: an age (30m, 2h, 7d), today, ISO time, epoch s")
    p.add_argument("--until", metavar="WHEN", help="before this time (same forms)")
    p.add_argument("--camera", metavar="ID", help="only this camera")
    p.add_argument("--severity", metavar="NAME", help="only this severity class")
    p.add_argument("--action", choices=["stop", "alarm", "log"], help="only events with this action")
    p.add_argument("--kept", action="store_true", help="only events marked keep")
    p.add_argument("--false-positive", action="store_true", help="only events marked as false alarms")


def register(sub: argparse._SubParsersAction) -> None:
    cfg_help = "TOML config file"
    de = sub.add_parser("defects", help="look up stored defect events (reads the store; no daemon needed)")
    dsub = de.add_subparsers(dest="defects_command", metavar="SUBCOMMAND")
    dsub.required = True

    ls = dsub.add_parser("list", help="list events, newest first",
                         description="List stored defect events, newest first, from the store at [store] path.")
    ls.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help=cfg_help)
    _filter_args(ls)
    ls.add_argument("--unacknowledged", action="store_true", help="only stops/alarms not yet acknowledged")
    ls.add_argument("--limit", type=int, default=50, help="at most this many (default 50, max 500)")
    ls.add_argument("--offset", type=int, default=0, help="skip this many (paging)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_defects_list)

    sh = dsub.add_parser("show", help="one event: record, regions, actions, picture paths")
    sh.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help=cfg_help)
    sh.add_argument("id", metavar="ID", help="event id")
    sh.add_argument("--json", action="store_true", help="print JSON")
    sh.set_defaults(func=cmd_defects_show)

    ex = dsub.add_parser("export", help="copy events' pictures and an index (CSV + JSON) to a folder or a .zip",
                         description="Export events (filtered) to OUT: events/<id>/{frame.png,overlay.jpg,mask.png,"
                         "event.json} plus index.csv and index.json. OUT ending in .zip writes one zip file. "
                         "Events marked false positive (--false-positive) are normal fabric for retraining.")
    ex.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help=cfg_help)
    _filter_args(ex)
    ex.add_argument("--out", type=Path, required=True, metavar="DIR|FILE.zip", help="where to write")
    ex.add_argument("--kinds", default="frame,overlay,mask", help="pictures: frame,overlay,mask,thumb "
                    "(default frame,overlay,mask)")
    ex.add_argument("--limit", type=int, default=None, help="at most this many events (newest first)")
    ex.add_argument("--force", action="store_true", help="replace an existing zip / write into a non-empty folder")
    ex.set_defaults(func=cmd_defects_export)

    st = sub.add_parser("status", help="ask the running daemon how it is (its HTTP API)",
                        description="Print the running daemon's health, per-camera fps/coverage/latency, the latch, "
                        "the PLC, the store and the GPU, from its HTTP API ([api] host/port/token). Exit code 0 "
                        "when healthy, 1 when not healthy or not reachable.")
    st.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help=cfg_help)
    st.add_argument("--url", help="the API's base URL (default from [api]: http://127.0.0.1:8080)")
    st.add_argument("--token", help="API token (default from [api] token/token_file)")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    st.add_argument("--json", action="store_true", help="print the raw stats JSON")
    st.set_defaults(func=cmd_status)

    dr = sub.add_parser("doctor", help="check the installation: config, cameras, model, GPU, PLC, store, API",
                        description="Check the configuration, open each camera briefly, load the model, look for a "
                        "GPU, connect to the PLC (read only), check the store's disk space and the API. Prints a "
                        "table with a fix for each problem; exit code 1 when something failed.")
    dr.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help=cfg_help)
    dr.add_argument("--camera-timeout", type=float, default=5.0, help="seconds to wait for a camera's first frame")
    dr.add_argument("--json", action="store_true", help="print JSON")
    dr.set_defaults(func=cmd_doctor)
