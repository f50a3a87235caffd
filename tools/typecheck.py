"""Static type check (mypy) of the knitwatch packages, as `make test` and CI run it.

The root folders config/, models/, pipeline/ and daemon/ are installed as ``knitwatch.<folder>``
(pyproject.toml's package-dir), a mapping mypy cannot read from an editable install. This script lays
a ``knitwatch/`` tree of symbolic links to those folders under ``build/typecheck`` and checks the
packages named in ``[tool.mypy] packages`` (a knitwatch-specific key: mypy's own settings are the rest
of that table), so module names and imports are the ones the code uses.

    python tools/typecheck.py            # the packages of [tool.mypy]
    python tools/typecheck.py daemon     # others too
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("config", "models", "pipeline", "daemon")


def main(argv: list[str]) -> int:
    from mypy import api

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    packages = argv or cfg["packages"]
    unknown = [p for p in packages if p not in FOLDERS]
    if unknown:
        sys.stderr.write(f"typecheck: unknown package(s) {unknown}; one of {', '.join(FOLDERS)}\n")
        return 2
    tree = ROOT / "build" / "typecheck"
    (tree / "knitwatch").mkdir(parents=True, exist_ok=True)
    for name in FOLDERS:
        link = tree / "knitwatch" / name
        if link.is_symlink() and os.readlink(link) == str(ROOT / name):
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / name, target_is_directory=True)
    os.chdir(tree)
    args = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tree / ".mypy_cache")]
    for p in packages:
        args += ["-p", f"knitwatch.{p}"]
    out, err, code = api.run(args)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
