"""``knitwatch model list|use|rollback``: the model library (one model per article, with versions) and
which model each camera uses.

``use`` and ``rollback`` write the library's selection (``active.json``); a running daemon polls it and
switches the camera at a frame boundary by itself (no restart); a daemon started later starts with it.
The library is ``[learn] library_dir`` (default ``<store.path>/models``); models get into it with
``knitwatch learn train``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from knitwatch.daemon.cli.common import EXIT_OK, CliError, add_config_option, add_group, load_config, table

SWITCH_NOTE = ("a running daemon switches to it by itself at a frame boundary within a few seconds (no restart); "
               "a daemon started later starts with it")


def _library(args: argparse.Namespace) -> Any:  # noqa: ANN401 - (Settings, Library)
    from knitwatch.models.articles import Library, library_dir

    settings = load_config(args)
    return settings, Library(library_dir(settings))


def _camera(settings: Any, camera: str) -> str:  # noqa: ANN401 - Settings
    known = [c.id for c in settings.cameras]
    if camera not in known:
        raise CliError(f"--camera {camera!r}: no such camera in the configuration (cameras: {', '.join(known)})")
    return camera


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def cmd_model_list(args: argparse.Namespace) -> int:
    from knitwatch.daemon.library import describe
    from knitwatch.models.articles import LibraryError

    settings, library = _library(args)
    try:
        info = describe(library, [c.id for c in settings.cameras], settings.model.checkpoint)
    except LibraryError as e:
        raise CliError(str(e)) from None
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return EXIT_OK
    out = [f"model library: {info['library']}\n\n"]
    rows = []
    for cam, c in info["cameras"].items():
        if c["configured"]:
            rows.append([cam, f"configured checkpoint ({c['checkpoint'] or 'not set'})", "-", "-"])
        else:
            rows.append([cam, c["model"], c["since"] or "-", c["history"][-1] if c["history"] else
                         "configured checkpoint"])
    out.append(table(rows, ["CAMERA", "MODEL IN USE", "SINCE", "ROLLBACK TO"]))
    out.append("\n")
    vrows = []
    for a in info["articles"]:
        for v in a["versions"]:
            vrows.append([v["id"], v["created"] or "-", v["kind"] or "-", _num(v["false_stops_per_hour"], 2),
                          _num(v["recall"], 3), ", ".join(v["used_by"]) or "-"])
    if vrows:
        out.append(table(vrows, ["MODEL", "CREATED", "KIND", "FALSE STOPS/H", "RECALL", "USED BY"]))
    else:
        out.append("no models in the library yet: learn one with 'knitwatch learn record' and "
                   "'knitwatch learn train'\n")
    for p in info["problems"]:
        out.append(f"problem: {p}\n")
    sys.stdout.write("".join(out))
    return EXIT_OK


def cmd_model_use(args: argparse.Namespace) -> int:
    from knitwatch.models.articles import LibraryError

    settings, library = _library(args)
    camera = _camera(settings, args.camera)
    try:
        m = library.use(camera, args.model, who=_who())
    except LibraryError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write the model selection {library.selection_path}: {e}", 1) from None
    sys.stdout.write(f"{camera} now uses {m.id} ({m.meta.get('kind', '?')}, created {m.meta.get('created', '?')}): "
                     f"{SWITCH_NOTE}\n")
    return EXIT_OK


def cmd_model_rollback(args: argparse.Namespace) -> int:
    from knitwatch.models.articles import LibraryError

    settings, library = _library(args)
    camera = _camera(settings, args.camera)
    try:
        previous = library.rollback(camera, who=_who())
    except LibraryError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write the model selection {library.selection_path}: {e}", 1) from None
    if previous:
        what = str(previous.get("id"))
    else:
        ckpt = settings.model.checkpoint
        what = f"the configured checkpoint ({ckpt.name if ckpt else 'not set'})"
    sys.stdout.write(f"{camera} rolls back to {what}: {SWITCH_NOTE}\n")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "model", "the model library: list models per article, choose a camera's model, roll back",
                      "model_command")
    ls = group.add_parser(
        "list", help="articles, versions with their validation figures, and each camera's model",
        description="List the model library: each article's versions (created, kind, the estimated false stops "
        "per hour and the recall measured when it was learned) and which model each configured camera uses now.")
    add_config_option(ls)
    ls.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ls.set_defaults(func=cmd_model_list)
    use = group.add_parser(
        "use", help="make a camera use a model of the library",
        description="Select ARTICLE (its newest version) or ARTICLE@VERSION for a camera. A running daemon switches "
        "the camera to it by itself at a frame boundary (no restart, no frame lost); the camera's previous model is "
        "kept for 'knitwatch model rollback'.")
    use.add_argument("model", metavar="ARTICLE[@VERSION]", help="e.g. pique or pique@2")
    use.add_argument("--camera", required=True, metavar="ID", help="camera id of the configuration")
    add_config_option(use)
    use.set_defaults(func=cmd_model_use)
    rb = group.add_parser(
        "rollback", help="give a camera back its previous model",
        description="Give a camera the model it used before the current one; from its first selected model, back "
        "to the daemon's configured checkpoint. A running daemon switches by itself.")
    rb.add_argument("--camera", required=True, metavar="ID", help="camera id of the configuration")
    add_config_option(rb)
    rb.set_defaults(func=cmd_model_rollback)
