"""``knitwatch config check|run|worker|ack``: the daemon itself, a remote inference worker, the
configuration check and the acknowledge of a latched stop/alarm."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import structlog

from knitwatch.daemon.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    CliError,
    add_config_option,
    add_group,
    checkpoint_summary,
    load_config,
    to_toml,
)
from knitwatch.daemon.logs import setup_logging

log = structlog.get_logger(__name__)


# ---------------------------------------------------------------- config check


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = load_config(args)
    data = settings.model_dump(mode="json")
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(to_toml(data).lstrip("\n"))
    log.info("configuration is valid", config=str(args.config) if args.config else "defaults/environment")
    return EXIT_OK


# ---------------------------------------------------------------- run (the daemon)


def cmd_run(args: argparse.Namespace) -> int:
    from knitwatch.daemon.supervisor import Supervisor

    settings = load_config(args)
    if args.checkpoint is not None:
        settings.model.checkpoint = args.checkpoint
    if args.decisions_log is not None:
        settings.alert.decisions_log = args.decisions_log
    ckpt = checkpoint_summary(settings.model.checkpoint)
    level = args.log_level or settings.logging.level
    fmt = args.log_format or settings.logging.format
    setup_logging("supervisor", level=level, fmt=fmt)
    sup = Supervisor(settings, checkpoint=ckpt, log_level=level, log_format="json" if fmt == "auto" else fmt)
    return sup.run()


# ---------------------------------------------------------------- ack (reset the latched stop/alarm)


def cmd_ack(args: argparse.Namespace) -> int:
    """Record an acknowledge in the store; the alert stage applies it (resets the latch, clears the stop)."""
    import getpass
    import time

    from knitwatch.pipeline.store.database import Store, StoreError

    settings = load_config(args)
    if args.camera is not None and args.camera not in {c.id for c in settings.cameras}:
        raise CliError(f"unknown camera {args.camera!r} (configured: {', '.join(c.id for c in settings.cameras)})")
    try:
        by = args.by or getpass.getuser()
    except (KeyError, OSError):
        by = "unknown"
    try:
        store = Store.from_config(settings.store, create=False)
    except StoreError as e:
        raise CliError(str(e), EXIT_FAIL) from None
    try:
        before = store.latched()
        ack_id = store.request_ack(by, camera=args.camera, note=args.note or "")
        scope = f"camera {args.camera}" if args.camera else "all cameras"
        log.info("acknowledge requested", ack_id=ack_id, by=by, camera=args.camera or "all", note=args.note or "",
                 latched=before)
        sys.stdout.write(f"acknowledge #{ack_id} by {by} ({scope}); latched before: "
                         f"stop {before['stop'] or 'none'}, alarm {before['alarm'] or 'none'}\n")
        if args.wait <= 0:
            return EXIT_OK
        deadline = time.monotonic() + args.wait
        ack = store.get_ack(ack_id)
        while time.monotonic() < deadline and ack is not None and ack["cleared_ns"] is None:
            time.sleep(0.1)
            ack = store.get_ack(ack_id)
        after = store.latched()
    except StoreError as e:
        raise CliError(str(e), EXIT_FAIL) from None
    finally:
        store.close()
    if ack is None or ack["handled_ns"] is None:
        raise CliError(f"acknowledge #{ack_id} is recorded but was not applied within {args.wait:g} s "
                       "(is the daemon running?); the alert stage applies it when it runs", EXIT_FAIL)
    if ack["cleared_ns"] is None:
        raise CliError(f"acknowledge #{ack_id} reset the latch ({ack['events_acked']} event(s)), but the PLC has not "
                       f"confirmed the reset within {args.wait:g} s; it is retried", EXIT_FAIL)
    sys.stdout.write(f"applied at {ack['handled']}, outputs reset at {ack['cleared']} "
                     f"({ack['events_acked']} event(s) acknowledged); still latched: "
                     f"stop {after['stop'] or 'none'}, alarm {after['alarm'] or 'none'}\n")
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    """An inference worker on another host, pulling tiles from a daemon's tcp:// endpoints."""
    from knitwatch.pipeline.stages import infer

    settings = load_config(args)
    tiles = args.tiles or settings.inference.tiles_endpoint
    results = args.results or settings.inference.results_endpoint
    if not (tiles and results) or not (tiles.startswith("tcp://") and results.startswith("tcp://")):
        raise CliError("a remote worker needs tcp:// endpoints: --tiles and --results (or [inference] "
                       "tiles_endpoint/results_endpoint), the addresses the daemon's host binds")
    ckpt = checkpoint_summary(args.checkpoint or settings.model.checkpoint)
    level = args.log_level or settings.logging.level
    setup_logging(f"worker.{args.name}", level=level, fmt=args.log_format or settings.logging.format)
    return infer.run(name=f"worker.{args.name}", control_endpoint=args.control or "ipc:///nonexistent-knitwatch",
                     tiles_endpoint=tiles, results_endpoint=results, checkpoint=ckpt["path"],
                     inference=settings.inference)


# ---------------------------------------------------------------- parser


def register(sub: argparse._SubParsersAction) -> None:
    cfg_sub = add_group(sub, "config", "inspect the configuration", "config_command")
    check = cfg_sub.add_parser(
        "check",
        help="validate the config file plus environment and print the effective settings",
        description="Validate the config file plus environment and print the effective settings "
        "(like 'nginx -t'). Exit code 2 when anything is wrong.",
    )
    add_config_option(check)
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    check.set_defaults(func=cmd_config_check)

    run = sub.add_parser(
        "run",
        help="run the inspection daemon (capture -> tiler -> infer -> alert)",
        description="Run the inspection daemon with the configured cameras and model until SIGTERM/Ctrl-C.",
    )
    add_config_option(run)
    run.add_argument("--checkpoint", type=Path, metavar="CKPT", help="model checkpoint (overrides [model])")
    run.add_argument("--decisions-log", type=Path, metavar="FILE", help="append every frame's decision as JSON")
    run.set_defaults(func=cmd_run)

    wk = sub.add_parser(
        "worker",
        help="run an extra inference worker on this host for a daemon on another host (tcp://)",
        description="Pull tiles from a daemon's tiles endpoint, run the model (GPU when there is one), push "
        "results to its alert stage. The daemon must bind tcp:// endpoints ([inference] tiles_endpoint and "
        "results_endpoint, e.g. tcp://0.0.0.0:5601 and tcp://0.0.0.0:5602).",
    )
    add_config_option(wk)
    wk.add_argument("--checkpoint", type=Path, metavar="CKPT", help="the same model file the daemon uses")
    wk.add_argument("--tiles", metavar="tcp://HOST:PORT", help="the daemon's tiles endpoint")
    wk.add_argument("--results", metavar="tcp://HOST:PORT", help="the daemon's results endpoint")
    wk.add_argument("--control", metavar="tcp://HOST:PORT", help="where to send heartbeats (optional)")
    wk.add_argument("--name", default="remote", help="worker name in logs and results (default remote)")
    wk.set_defaults(func=cmd_worker)

    ack = sub.add_parser(
        "ack",
        help="acknowledge the latched stop/alarm (resets it and clears the PLC's stop output)",
        description="Acknowledge the latched stop/alarm: recorded in the store ([store] path) with who and when; "
        "the running daemon's alert stage applies it within about half a second (resets the latch, clears the "
        "stop output, records it). Exit code 0 once the PLC confirmed the reset, 1 if not within --wait.",
    )
    add_config_option(ack)
    ack.add_argument("--by", metavar="NAME", help="who acknowledges (default: the login name)")
    ack.add_argument("--camera", metavar="ID", help="acknowledge only this camera's events (default: all)")
    ack.add_argument("--note", metavar="TEXT", default="", help="why, what was done (kept with the acknowledge)")
    ack.add_argument("--wait", type=float, metavar="S", default=5.0,
                     help="wait up to S seconds for the daemon to apply it (0: do not wait; default 5)")
    ack.set_defaults(func=cmd_ack)
