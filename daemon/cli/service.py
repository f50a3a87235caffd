"""``knitwatch config check|run|worker|ack``: the daemon itself, a remote inference worker, the
configuration check and the acknowledge of a latched stop/alarm."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

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
from knitwatch.pipeline.security import LinkSecurityError, check_daemon_links, check_links

log = structlog.get_logger(__name__)


# ---------------------------------------------------------------- config check


def cmd_config_check(args: argparse.Namespace) -> int:
    from knitwatch.daemon.cli.keyfiles import key_file_checks

    settings = load_config(args)
    keys = key_file_checks(settings)  # the key files it names, read as the daemon/worker will: named errors, exit 2
    bad = [k for k in keys if k.status == "FAIL"]
    if bad:
        raise CliError("\n".join([f"knitwatch: key files named in the configuration are unusable ({len(bad)} "
                                   "problem(s)):"] + [f"  - {k.field}: {k.detail} (fix: {k.fix})" for k in bad]))
    for k in keys:
        if k.status == "WARN":
            sys.stderr.write(f"knitwatch: warning: {k.field}: {k.detail} (fix: {k.fix})\n")
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
    try:  # tcp:// worker links without keys: refused before anything starts (exit 2)
        check_daemon_links(settings.inference)
    except LinkSecurityError as e:
        raise CliError(str(e)) from None
    ckpt = checkpoint_summary(settings.model.checkpoint)
    level = args.log_level or settings.logging.level
    fmt = args.log_format or settings.logging.format
    setup_logging("supervisor", level=level, fmt=fmt)
    sup = Supervisor(settings, checkpoint=ckpt, log_level=level, log_format="json" if fmt == "auto" else fmt)
    return sup.run()


# ---------------------------------------------------------------- ack (reset the latched stop/alarm)


def _latched_text(latched: dict[str, list[str]]) -> str:
    return f"stop {', '.join(latched['stop']) or 'none'}, alarm {', '.join(latched['alarm']) or 'none'}"


def _union(*views: dict[str, Any]) -> dict[str, list[str]]:
    return {a: sorted({c for v in views for c in v.get(a, [])}) for a in ("stop", "alarm")}


def cmd_ack(args: argparse.Namespace) -> int:
    """Record an acknowledge; the alert stage applies it (resets the latch, clears the stop). Recorded in
    the store's index; when that is unusable (corrupt, read-only, full, missing), in the latch folder's
    mailbox, which the alert stage reads as well."""
    import getpass

    from knitwatch.pipeline.actions.latch import latch_dir_of, read_view
    from knitwatch.pipeline.store.database import Store, StoreError

    settings = load_config(args)
    if args.camera is not None and args.camera not in {c.id for c in settings.cameras}:
        raise CliError(f"unknown camera {args.camera!r} (configured: {', '.join(c.id for c in settings.cameras)})")
    try:
        by = args.by or getpass.getuser()
    except (KeyError, OSError):
        by = "unknown"
    latch_dir = latch_dir_of(settings.store)
    view = read_view(latch_dir)  # the latch as the daemon last wrote it
    if not view["ok"]:
        log.error("the latch file is unreadable: the daemon treats it as a latched stop", problem=view["problem"])
    scope = f"camera {args.camera}" if args.camera else "all cameras"
    try:
        store = Store.from_config(settings.store, create=False)
    except StoreError as e:
        return _ack_by_mailbox(args, by, scope, latch_dir, view, str(e))
    try:
        before = _union(store.latched(), view)
        ack_id = store.request_ack(by, camera=args.camera, note=args.note or "")
    except StoreError as e:
        store.close()
        return _ack_by_mailbox(args, by, scope, latch_dir, view, str(e))
    try:
        log.info("acknowledge requested", ack_id=ack_id, by=by, camera=args.camera or "all", note=args.note or "",
                 latched=before)
        sys.stdout.write(f"acknowledge #{ack_id} by {by} ({scope}); latched before: {_latched_text(before)}\n")
        if args.wait <= 0:
            return EXIT_OK
        deadline = time.monotonic() + args.wait
        ack = store.get_ack(ack_id)
        while time.monotonic() < deadline and ack is not None and ack["cleared_ns"] is None:
            time.sleep(0.1)
            ack = store.get_ack(ack_id)
        after = _union(store.latched(), read_view(latch_dir))
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
                     f"({ack['events_acked']} event(s) acknowledged); still latched: {_latched_text(after)}\n")
    return EXIT_OK


def _ack_by_mailbox(args: argparse.Namespace, by: str, scope: str, latch_dir: Path, view: dict[str, Any],
                    store_problem: str) -> int:
    """The store's index cannot take the acknowledge: the latch folder's mailbox does (in place, so a
    full disk takes it too); the daemon reports it back in the latch file."""
    from knitwatch.pipeline.actions.latch import LatchFileError, post_ack_request, read_view
    from knitwatch.pipeline.store.database import iso_utc

    try:
        req = post_ack_request(latch_dir, by=by, camera=args.camera, note=args.note or "",
                               covers_seq=view["latch_seq"] if view["ok"] else None)
    except (OSError, LatchFileError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CliError(f"cannot record the acknowledge: the store's index is unusable ({store_problem}) and the "
                       f"latch folder {latch_dir} cannot take it either ({why})", EXIT_FAIL) from None
    token = req["token"]
    log.warning("acknowledge recorded in the latch folder's mailbox (the store's index is unusable)", ack=token,
                by=by, camera=args.camera or "all", store_problem=store_problem)
    sys.stdout.write(f"acknowledge {token} by {by} ({scope}), recorded in the latch folder {latch_dir} (the store's "
                     f"index is unusable: {store_problem}); latched before: {_latched_text(_union(view))}\n")
    if args.wait <= 0:
        return EXIT_OK
    deadline = time.monotonic() + args.wait
    entry: dict[str, Any] | None = None
    while True:
        now_view = read_view(latch_dir)
        entry = next((a for a in now_view["acks"] if isinstance(a, dict) and a.get("token") == token), None)
        if (entry is not None and entry.get("cleared_ns")) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if entry is None:
        raise CliError(f"acknowledge {token} is recorded in the latch folder but was not applied within "
                       f"{args.wait:g} s (is the daemon running?); the alert stage applies it when it runs", EXIT_FAIL)
    released = len(entry.get("released") or [])
    if not entry.get("cleared_ns"):
        raise CliError(f"acknowledge {token} reset the latch ({released} event(s)), but the PLC has not confirmed "
                       f"the reset within {args.wait:g} s; it is retried", EXIT_FAIL)
    sys.stdout.write(f"applied at {iso_utc(entry.get('handled_ns')) or '-'}, "
                     f"outputs reset at {iso_utc(entry['cleared_ns']) or '-'} "
                     f"({released} event(s) acknowledged); still latched: {_latched_text(_union(now_view))}\n")
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    """An inference worker on another host, pulling tiles from a daemon's tcp:// endpoints."""
    settings = load_config(args)
    tiles = args.tiles or settings.inference.tiles_endpoint
    results = args.results or settings.inference.results_endpoint
    if not (tiles and results) or not (tiles.startswith("tcp://") and results.startswith("tcp://")):
        raise CliError("a remote worker needs tcp:// endpoints: --tiles and --results (or [inference] "
                       "tiles_endpoint/results_endpoint), the addresses the daemon's host binds")
    if args.key is not None:
        settings.inference.worker_secret_key = args.key
    if args.server_key is not None:
        settings.inference.server_public_key = args.server_key
    try:  # before the model loads: keys missing or bad is a usage error (exit 2)
        check_links(settings.inference, [tiles, results], bind=False)
    except LinkSecurityError as e:
        raise CliError(str(e)) from None
    from knitwatch.pipeline.stages import infer  # torch: after the quick checks

    ckpt = checkpoint_summary(args.checkpoint or settings.model.checkpoint)
    level = args.log_level or settings.logging.level
    setup_logging(f"worker.{args.name}", level=level, fmt=args.log_format or settings.logging.format)
    return infer.run(name=f"worker.{args.name}", control_endpoint=args.control or "ipc:///nonexistent-knitwatch",
                     tiles_endpoint=tiles, results_endpoint=results, checkpoint=ckpt["path"],
                     inference=settings.inference, model_id=ckpt["id"])


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
        "results_endpoint, e.g. tcp://0.0.0.0:5601 and tcp://0.0.0.0:5602). The link is encrypted and "
        "authenticated with CURVE keys: --key (this worker's NAME.key_secret, whose NAME.key is in the daemon's "
        "[inference] authorized_keys_dir) and --server-key (the daemon's public key file); see 'knitwatch keys'.",
    )
    add_config_option(wk)
    wk.add_argument("--checkpoint", type=Path, metavar="CKPT", help="the same model file the daemon uses")
    wk.add_argument("--tiles", metavar="tcp://HOST:PORT", help="the daemon's tiles endpoint")
    wk.add_argument("--results", metavar="tcp://HOST:PORT", help="the daemon's results endpoint")
    wk.add_argument("--control", metavar="tcp://HOST:PORT", help="where to send heartbeats (optional)")
    wk.add_argument("--key", type=Path, metavar="FILE",
                    help="this worker's key pair, NAME.key_secret (overrides [inference] worker_secret_key)")
    wk.add_argument("--server-key", type=Path, metavar="FILE",
                    help="the daemon's public key, NAME.key (overrides [inference] server_public_key)")
    wk.add_argument("--name", default="remote", help="worker name in logs and results (default remote)")
    wk.set_defaults(func=cmd_worker)

    ack = sub.add_parser(
        "ack",
        help="acknowledge the latched stop/alarm (resets it and clears the PLC's stop output)",
        description="Acknowledge the latched stop/alarm: recorded in the store ([store] path) with who and when "
        "- or, when the store's index is unusable (corrupt, read-only, full disk, removed), in the latch folder's "
        "mailbox ([store] latch_dir, default the store folder); the running daemon's alert stage applies it within "
        "about half a second (resets the latch, clears the stop output, records it). Exit code 0 once the PLC "
        "confirmed the reset, 1 if not within --wait or when neither place can take it.",
    )
    add_config_option(ack)
    ack.add_argument("--by", metavar="NAME", help="who acknowledges (default: the login name)")
    ack.add_argument("--camera", metavar="ID", help="acknowledge only this camera's events (default: all)")
    ack.add_argument("--note", metavar="TEXT", default="", help="why, what was done (kept with the acknowledge)")
    ack.add_argument("--wait", type=float, metavar="S", default=5.0,
                     help="wait up to S seconds for the daemon to apply it (0: do not wait; default 5)")
    ack.set_defaults(func=cmd_ack)
