"""``knitwatch keys generate|show``: the CURVE key pairs that secure the tcp:// worker links
(:mod:`knitwatch.pipeline.security`)."""

from __future__ import annotations

import argparse
import json
import socket
import stat
import sys
from pathlib import Path

from knitwatch.daemon.cli.common import EXIT_OK, CliError, add_group
from knitwatch.pipeline.security import (
    KEY_NAME,
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    LinkSecurityError,
    generate_keys,
    read_key_file,
)


def default_name() -> str:
    """This host's name as a key name (what the daemon's log shows for an authenticated worker)."""
    name = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in socket.gethostname().split(".")[0])
    return name if KEY_NAME.match(name) else "knitwatch"


def cmd_keys_generate(args: argparse.Namespace) -> int:
    name = args.name or default_name()
    try:
        public, secret = generate_keys(args.out, name)
    except LinkSecurityError as e:
        raise CliError(str(e)) from None
    key = read_key_file(public).public.decode()
    sys.stdout.write(
        f"public key  {public}  (give this file to the other side)\n"
        f"secret key  {secret}  (mode 0600; keep it on this host)\n"
        f"key         {key}\n"
        "daemon host: [inference] server_secret_key = the secret file; copy the public file to each worker\n"
        "worker host: --key the secret file (or [inference] worker_secret_key); copy the public file into the\n"
        "             daemon's [inference] authorized_keys_dir\n"
    )
    return EXIT_OK


def cmd_keys_show(args: argparse.Namespace) -> int:
    try:
        pair = read_key_file(args.file)
    except LinkSecurityError as e:
        raise CliError(str(e)) from None
    mode = stat.S_IMODE(Path(args.file).stat().st_mode)
    name = Path(args.file).name
    for suffix in (SECRET_SUFFIX, PUBLIC_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    info = {"file": str(args.file), "name": name, "public_key": pair.public.decode(),
            "has_secret_key": pair.secret is not None, "mode": f"{mode:04o}"}
    warning = None
    if pair.secret is not None and mode & 0o077:
        who = "other users" if mode & 0o007 else "the group"
        warning = f"the secret key is readable by {who}: chmod 600 {args.file}"
    if args.json:
        sys.stdout.write(json.dumps({**info, "warning": warning}, indent=2) + "\n")
    else:
        for k, v in info.items():
            sys.stdout.write(f"{k:15s} {v}\n")
        if warning:
            sys.stdout.write(f"warning         {warning}\n")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    grp = add_group(sub, "keys", "CURVE key pairs for inference workers on other hosts (tcp://)", "keys_command")
    gen = grp.add_parser(
        "generate",
        help="write a new key pair: NAME.key (public) and NAME.key_secret (secret, mode 0600)",
        description="Write a new CURVE key pair into DIR: NAME.key (the public key: give it to the other side) "
        "and NAME.key_secret (public and secret key, mode 0600: keep it on this host). Existing files are never "
        "overwritten. The daemon's pair goes into [inference] server_secret_key and its NAME.key to every worker "
        "(--server-key); each worker's NAME.key goes into the daemon's [inference] authorized_keys_dir.",
    )
    gen.add_argument("--out", type=Path, metavar="DIR", required=True, help="folder to write to (made if missing)")
    gen.add_argument("--name", metavar="NAME", default=None,
                     help="file name without suffix: letters, digits, '.', '_', '-' (default: this host's name)")
    gen.set_defaults(func=cmd_keys_generate)
    show = grp.add_parser(
        "show",
        help="print a key file's name and public key (never the secret key)",
        description="Print a key file's name, public key, whether it holds a secret key and its mode (a secret "
        "key file readable by others is flagged). Exit code 2 when FILE is not a readable key file.",
    )
    show.add_argument("file", type=Path, metavar="FILE", help="a NAME.key or NAME.key_secret file")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_keys_show)
