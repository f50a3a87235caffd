"""One-file model checkpoints, shared by every model kind (EfficientAD, MSFlow, PatchCore).

File format (``FORMAT_NAME``, version ``FORMAT_VERSION``): a ``torch.save`` of a plain dict holding
only tensors and JSON-able primitives, so it loads with ``torch.load(weights_only=True)`` and no
pickled code ever runs::

    {
      "format": "knitwatch-checkpoint",   # identifies the file
      "format_version": 1,
      "kind": "efficientad-s",            # also inside metadata; duplicated for quick inspection
      "metadata": "<JSON string>",        # {"kind", "hparams", "preprocess", "thresholds",
                                          #  "provenance", "extra"}
      "state_dict": {name: Tensor, ...},  # the model's weights and buffers (normalisation stats too)
    }

The file is written atomically (temporary file in the same folder, fsync, ``os.replace``). Any file
that is missing, corrupt, foreign or of an unknown version raises `CheckpointError` naming the path.
`knitwatch.models.registry.build_model` turns a checkpoint into a ready module by its ``kind``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import Tensor

log = structlog.get_logger(__name__)

FORMAT_NAME = "knitwatch-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint cannot be written, read or understood; the message names the file."""


@dataclass
class Checkpoint:
    kind: str
    hparams: dict[str, Any]
    state_dict: dict[str, Tensor]
    preprocess: dict[str, Any]
    thresholds: dict[str, Any]
    provenance: dict[str, Any]
    extra: dict[str, Any] | None = None


def _to_jsonable(value: Any, where: str) -> Any:  # noqa: ANN401
    """Plain JSON types only: numpy/torch scalars become Python numbers; NaN/inf are refused."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"{where}: non-finite number {value!r} cannot be stored")
        return float(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return _to_jsonable(value.item(), where)
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "shape", None) == ():
        return _to_jsonable(value.item(), where)  # numpy scalar
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: key {k!r} is not a string")
            out[k] = _to_jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise CheckpointError(f"{where}: {type(value).__name__} is not JSON-able")


@contextlib.contextmanager
def atomic_path(path: Path, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write; when the block succeeds it replaces
    ``path`` in one rename (file and folder fsynced with ``fsync``), when it fails it is removed - a
    reader never sees half a file. Used for checkpoints, ONNX exports and benchmark results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:  # make the rename durable
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def save_checkpoint(
    path: str | Path,
    *,
    kind: str,
    hparams: dict[str, Any],
    state_dict: Mapping[str, Tensor],
    preprocess: dict[str, Any],
    thresholds: dict[str, Any],
    provenance: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically; returns the path. Metadata must be JSON-able (NaN/inf refused)."""
    p = Path(path)
    if not isinstance(kind, str) or not kind:
        raise CheckpointError(f"{p}: kind must be a non-empty string")
    meta = {
        "kind": kind,
        "hparams": _to_jsonable(hparams, "hparams"),
        "preprocess": _to_jsonable(preprocess, "preprocess"),
        "thresholds": _to_jsonable(thresholds, "thresholds"),
        "provenance": _to_jsonable(provenance, "provenance"),
        "extra": _to_jsonable(extra, "extra") if extra is not None else None,
    }
    tensors: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckpointError(f"{p}: state_dict entry {k!r} is not a named tensor")
        tensors[k] = v.detach().cpu()
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "metadata": json.dumps(meta, allow_nan=False, sort_keys=True),
        "state_dict": tensors,
    }
    with atomic_path(p) as tmp:
        torch.save(payload, tmp)
    log.info("checkpoint_saved", path=str(p), kind=kind, tensors=len(tensors))
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (``torch.load(weights_only=True)``)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file, unsafe pickle ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(exc).__name__}: {first})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{p}: not a knitwatch checkpoint (no format tag {FORMAT_NAME!r}); "
            "foreign .pth files must be imported (e.g. load_teacher_state for EfficientAD teachers)"
        )
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{p}: checkpoint has no valid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format version {version} is newer than this knitwatch reads "
            f"(up to {FORMAT_VERSION}); upgrade knitwatch"
        )
    if version < 1:
        raise CheckpointError(f"{p}: unknown checkpoint format version {version}")
    try:
        meta = json.loads(obj["metadata"])
        sd = obj["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
            raise TypeError("state_dict is not a dict of tensors")
        ckpt = Checkpoint(
            kind=str(meta["kind"]),
            hparams=dict(meta["hparams"]),
            state_dict=dict(sd),
            preprocess=dict(meta["preprocess"]),
            thresholds=dict(meta["thresholds"]),
            provenance=dict(meta["provenance"]),
            extra=dict(meta["extra"]) if meta.get("extra") is not None else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{p}: damaged checkpoint metadata ({type(exc).__name__}: {exc})") from exc
    if obj.get("kind") != ckpt.kind:
        raise CheckpointError(f"{p}: kind mismatch between header ({obj.get('kind')!r}) and metadata")
    return ckpt
