"""What the ``knitwatch`` command modules share: errors and exit codes, the configuration, the model
summary, argparse helpers and text formatting.

Each subcommand is a function ``cmd_<name>(args) -> int``; problems the user can fix raise
:class:`CliError` (message on stderr, exit code 2 for bad input/config, 1 for failures) so no
traceback reaches the terminal for them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from knitwatch.config import ConfigError, Settings, load_settings

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


# ---------------------------------------------------------------- argparse


def add_group(sub: argparse._SubParsersAction, name: str, help: str, dest: str) -> argparse._SubParsersAction:
    """A command with subcommands (``knitwatch NAME SUBCOMMAND``); one of them is required."""
    group = sub.add_parser(name, help=help).add_subparsers(dest=dest, metavar="SUBCOMMAND")
    group.required = True
    return group


def add_config_option(p: argparse.ArgumentParser) -> None:
    """``--config`` after the subcommand too (it overrides the global one only when given)."""
    p.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS, help="TOML config file")


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


# ---------------------------------------------------------------- output


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


def write_report(result: dict[str, Any], as_json: bool, width: int) -> None:
    """A flat result on stdout: indented JSON, or one ``key value`` line each (keys padded to ``width``)."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        for k, v in result.items():
            sys.stdout.write(f"{k:{width}s} {v}\n")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def local_time(t_ns: int | None) -> str:
    """ns since the epoch as local ``YYYY-MM-DD HH:MM:SS`` (``-`` for none)."""
    if t_ns is None:
        return "-"
    return dt.datetime.fromtimestamp(t_ns / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def fmt_coverage(coverage: float | None) -> str:
    """Inspection coverage (inspected / captured) for people, rounded DOWN to 0.1 %: 185 of 188 frames
    reads 98.4 %, and 100 % only when every frame was inspected."""
    if coverage is None:
        return "-"
    return f"{math.floor(max(0.0, min(1.0, coverage)) * 1000) / 10:.1f}%"
