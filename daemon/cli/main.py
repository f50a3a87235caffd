"""The ``knitwatch`` command line.

Global options (``--config``, ``--log-format``, ``--log-level``) come before the subcommand. Each
command group lives in a module of its own with a ``register(sub)`` that adds its subcommands; what
they share (:class:`CliError`, the exit codes, the configuration) is in
:mod:`knitwatch.daemon.cli.common`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from knitwatch.daemon.bench import cli as cmd_bench
from knitwatch.daemon.cli import cameras as cmd_cameras
from knitwatch.daemon.cli import dataset as cmd_dataset
from knitwatch.daemon.cli import defects as cmd_defects
from knitwatch.daemon.cli import demo as cmd_demo
from knitwatch.daemon.cli import doctor as cmd_doctor
from knitwatch.daemon.cli import export as cmd_export
from knitwatch.daemon.cli import keys as cmd_keys
from knitwatch.daemon.cli import learn as cmd_learn
from knitwatch.daemon.cli import library as cmd_library
from knitwatch.daemon.cli import model as cmd_model
from knitwatch.daemon.cli import roll as cmd_roll
from knitwatch.daemon.cli import service as cmd_service
from knitwatch.daemon.cli import status as cmd_status
from knitwatch.daemon.cli.common import EXIT_OK, CliError, package_version
from knitwatch.daemon.logs import setup_logging


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

    # the order of --help's command list
    for module in (cmd_service, cmd_demo, cmd_dataset, cmd_model, cmd_export, cmd_bench, cmd_defects, cmd_status,
                   cmd_roll, cmd_doctor, cmd_keys, cmd_cameras, cmd_library, cmd_learn):
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
