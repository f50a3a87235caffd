"""The ``knitwatch`` command line.

Global options (``--config``, ``--log-format``, ``--log-level``) come before the subcommand. Each
subcommand is a function ``cmd_<name>(args) -> int``; problems the user can fix raise
:class:`CliError` (message on stderr, exit code 2 for bad input/config, 1 for failures) so no
traceback reaches the terminal for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import structlog

from knitwatch.config import ConfigError, Settings, load_settings
from knitwatch.daemon.logs import setup_logging

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem to report in one line, without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def package_version() -> str:
    try:
        return version("knitwatch")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def load_config(args: argparse.Namespace) -> Settings:
    """Settings from ``--config`` (or the system default) plus the environment; exit 2 on problems."""
    try:
        return load_settings(args.config)
    except ConfigError as e:
        where = f" in {e.path}" if e.path else ""
        lines = [f"knitwatch: configuration is invalid{where} ({len(e.problems)} problem(s)):"]
        lines += [f"  - {p}" for p in e.problems]
        raise CliError("\n".join(lines), EXIT_USAGE) from None


# ---------------------------------------------------------------- config check


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Render settings (nested dicts, lists of dicts) as TOML; ``None`` values are shown as comments."""
    scalars, tables, arrays = [], [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            arrays.append((key, value))
        elif value is None:
            scalars.append(f"# {key} = (not set)")
        else:
            scalars.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(scalars) + ("\n" if scalars else "")
    for key, value in tables:
        name = f"{prefix}{key}"
        out += f"\n[{name}]\n" + to_toml(value, f"{name}.")
    for key, items in arrays:
        name = f"{prefix}{key}"
        for item in items:
            nested = {k: v for k, v in item.items() if isinstance(v, dict)}
            flat = {k: v for k, v in item.items() if not isinstance(v, dict)}
            out += f"\n[[{name}]]\n" + to_toml(flat)
            for nk, nv in nested.items():
                out += f"\n[{name}.{nk}]\n" + to_toml(nv, f"{name}.{nk}.")
    return out


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


def checkpoint_summary(path: Path | None) -> dict:
    """What the supervisor needs from the checkpoint (its preprocessing and thresholds)."""
    from knitwatch.models.checkpoint import CheckpointError, load_checkpoint

    if path is None:
        raise CliError("no model: set [model] checkpoint in the config or pass --checkpoint PATH "
                       "(make one with 'knitwatch train')")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise CliError(str(e)) from None
    return {"path": str(path), "preprocess": ckpt.preprocess, "thresholds": ckpt.thresholds, "kind": ckpt.kind,
            "id": str(ckpt.provenance.get("id", Path(path).name))}


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
        store = Store(settings.store.path, create=False, fsync=settings.store.fsync)
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
                     device=settings.inference.device, max_batch_tiles=settings.inference.max_batch_tiles,
                     max_wait_ms=settings.inference.max_wait_ms, backend=settings.inference.backend)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knitwatch",
        description="Inspect knitted fabric on circular knitting machines, stop the machine on defects, "
        "and keep a picture of every defect.",
        epilog="Settings: defaults < TOML file (--config, else /etc/knitwatch/knitwatch.toml) < "
        "environment KNITWATCH_<SECTION>__<KEY>. Run 'knitwatch COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"knitwatch {package_version()}")
    parser.add_argument("--config", type=Path, metavar="PATH", help="TOML config file")
    parser.add_argument(
        "--log-format",
        choices=["auto", "console", "json"],
        default=None,
        help="log output: console (human), json (lines); auto = console on a terminal (default: config)",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (default: config)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    cfg = sub.add_parser("config", help="inspect the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    cfg_sub.required = True
    check = cfg_sub.add_parser(
        "check",
        help="validate the config file plus environment and print the effective settings",
        description="Validate the config file plus environment and print the effective settings "
        "(like 'nginx -t'). Exit code 2 when anything is wrong.",
    )
    check.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help="TOML config file")
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    check.set_defaults(func=cmd_config_check)

    run = sub.add_parser(
        "run",
        help="run the inspection daemon (capture -> tiler -> infer -> alert)",
        description="Run the inspection daemon with the configured cameras and model until SIGTERM/Ctrl-C.",
    )
    run.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help="TOML config file")
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
    wk.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help="TOML config file")
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
    ack.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help="TOML config file")
    ack.add_argument("--by", metavar="NAME", help="who acknowledges (default: the login name)")
    ack.add_argument("--camera", metavar="ID", help="acknowledge only this camera's events (default: all)")
    ack.add_argument("--note", metavar="TEXT", default="", help="why, what was done (kept with the acknowledge)")
    ack.add_argument("--wait", type=float, metavar="S", default=5.0,
                     help="wait up to S seconds for the daemon to apply it (0: do not wait; default 5)")
    ack.set_defaults(func=cmd_ack)

    from knitwatch.daemon.bench import pipeline as bench
    from knitwatch.daemon.cli import dataset as cmd_dataset
    from knitwatch.daemon.cli import demo as cmd_demo
    from knitwatch.daemon.cli import export as cmd_export
    from knitwatch.daemon.cli import model as cmd_model
    from knitwatch.daemon.cli import ops as cmd_ops

    for module in (cmd_demo, cmd_dataset, cmd_model, cmd_export, bench, cmd_ops):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Logging first from the command line (the config might be what is broken), then from the config.
    level = args.log_level or "INFO"
    fmt = args.log_format or "auto"
    try:
        setup_logging("cli", level=level, fmt=fmt)
    except ValueError as e:
        parser.error(str(e))
    try:
        return int(args.func(args) or EXIT_OK)
    except CliError as e:
        sys.stderr.write(f"{e}\n" if str(e).startswith("knitwatch:") else f"knitwatch: error: {e}\n")
        return e.code
    except KeyboardInterrupt:
        sys.stderr.write("knitwatch: interrupted\n")
        return 130


def run() -> None:
    sys.exit(main())
