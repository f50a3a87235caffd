"""``knitwatch status``: ask the running daemon's HTTP API how it is."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from knitwatch.daemon.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    CliError,
    add_config_option,
    fmt_bytes,
    fmt_coverage,
    load_config,
    local_time,
    table,
)


def api_base_url(settings: Any) -> str:  # noqa: ANN401
    """The configured API's URL from this machine."""
    from knitwatch.daemon.api.app import base_url

    return base_url(settings.api.host, settings.api.port)


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
    for reason in st.get("degraded") or []:  # PLC unreachable, store or latch file unusable ...
        out.append(f"DEGRADED: {reason}")
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
            fmt_coverage(c.get("coverage")),
            str(c.get("captured", "-")), str(c.get("inspected", "-")), str(c.get("dropped", "-")),
            f"{lat['p50']:.0f}/{lat['p99']:.0f} ms" if "p50" in lat and "p99" in lat else "-",
            str(c.get("events", "-")),
            "STOP" if latched.get("stop") else ("ALARM" if latched.get("alarm") else "-"),
            f"#{last['id']} {last.get('severity', '')} {local_time(last.get('t_wall_ns'))}" if last else "-",
            str(c.get("model") or "-"),
        ])
    if rows:
        out.append(table(rows, ["CAMERA", "FPS", "COVERAGE", "CAPTURED", "INSPECTED", "DROPPED", "LATENCY p50/p99",
                                "EVENTS", "LATCHED", "LAST DEFECT", "MODEL"]).rstrip())
    stages = st.get("stages") or {}
    if stages:
        parts = []
        for name, s in stages.items():
            flag = "" if s.get("alive") else " DOWN"
            parts.append(f"{name}{flag}" + (f" ({s['restarts']} restarts)" if s.get("restarts") else ""))
        out.append("stages: " + ", ".join(parts))
    lost = st.get("lost_in_flight") or {}
    if lost.get("total"):  # frames a stage died with: never inspected, not in the coverage's drops either
        out.append(f"frames lost in flight when a stage died: {lost['total']} ("
                   + ", ".join(f"{k} {v}" for k, v in sorted((lost.get("by_stage") or {}).items())) + ")")
    actions = (stages.get("alert") or {}).get("actions") or {}
    if actions:
        outputs = actions.get("outputs") or {}
        out.append(f"PLC: {actions.get('driver')} {'connected' if actions.get('plc_connected') else 'NOT CONNECTED'}"
                   + (f", stop output {'ON' if outputs.get('stop') else 'off'}" if outputs else "")
                   + (f", last error: {actions['last_error']}" if actions.get("last_error") else ""))
    store = st.get("store") or {}
    if store:
        out.append(f"store: {store.get('events', '?')} event(s), {fmt_bytes(store.get('bytes'))}"
                   + (f", errors {store['errors']}" if store.get("errors") else ""))
    for d in (st.get("gpu") or {}).get("devices", []):
        if "error" in d:
            out.append(f"GPU {d['index']}: {d['error']}")
            continue
        util = f"{d['utilization_percent']}% busy, " if "utilization_percent" in d else ""
        out.append(f"GPU {d['index']} {d.get('name', '')}: {util}memory {fmt_bytes(d['memory_used_bytes'])} of "
                   f"{fmt_bytes(d['memory_total_bytes'])}")
    for name, b in ((st.get("gpu") or {}).get("cuda_memory_allocated_bytes") or {}).items():
        out.append(f"CUDA memory allocated by {name}: {fmt_bytes(b)}")
    return "\n".join(out) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    from knitwatch.daemon.api.security import ApiError, load_token

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


# ---------------------------------------------------------------------------------------------- parser


def register(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("status", help="ask the running daemon how it is (its HTTP API)",
                        description="Print the running daemon's health, per-camera fps/coverage/latency, the latch, "
                        "the PLC, the store and the GPU, from its HTTP API ([api] host/port/token). Exit code 0 "
                        "when healthy, 1 when not healthy or not reachable.")
    add_config_option(st)
    st.add_argument("--url", help="the API's base URL (default from [api]: http://127.0.0.1:8080)")
    st.add_argument("--token", help="API token (default from [api] token/token_file)")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    st.add_argument("--json", action="store_true", help="print the raw stats JSON")
    st.set_defaults(func=cmd_status)
