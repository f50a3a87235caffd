"""ONNX export of knitwatch models: tiles in, anomaly maps and tile scores out.

The exported graph (`TileGraph` around the checkpoint's model):

* input ``tiles``: the tiles exactly as the tiler cuts them, (N, T, T) for gray checkpoints or
  (N, T, T, 3) for colour ones (``preprocess.grayscale``), uint8 (default) or float32 in [0, 255]
  (``input_dtype="float32"``, for runtimes that dislike uint8 inputs);
* outputs ``maps`` float32 (N, T, T) and ``scores`` float32 (N,), the same as ``model.predict``;
* N (the batch) is dynamic, T is the checkpoint's tile size;
* the whole input normalisation is inside the graph (/255, gray -> RGB, ImageNet mean/std), and so are
  the model's own statistics (EfficientAD's teacher mean/std and map quantiles, MSFlow's feature and
  map statistics): they are buffers of the module and become constants of the graph. The decision
  thresholds stay in the checkpoint (also copied into the metadata for other consumers).

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), opset 18 by default.
The legacy TorchScript exporter (``dynamo=False``) handles EfficientAD but not MSFlow (its traced
shapes break in the FrEIA fusion block's split and in the top-k score), so one exporter serves both.
The file is a single self-contained .onnx (no external data; models are far below the 2 GiB limit),
written atomically.

Metadata (``metadata_props``, read back with `onnx_metadata`): ``knitwatch.format`` (=
`FORMAT_NAME`), ``knitwatch.kind``, ``knitwatch.checkpoint_sha256`` (the SHA-256 of the checkpoint
file it was made from, so a stale export is recognised), ``knitwatch.checkpoint_id``,
``knitwatch.tile``, ``knitwatch.grayscale``, ``knitwatch.input_dtype``, ``knitwatch.thresholds`` and
``knitwatch.preprocess`` (JSON), ``knitwatch.exporter``.

Needs ``onnx`` and ``onnxscript`` (dependencies of knitwatch; a missing one is named with how to
install it); the parity check also needs ``onnxruntime``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import structlog
import torch
from torch import Tensor, nn

from knitwatch.models.checkpoint import Checkpoint, atomic_path, load_checkpoint
from knitwatch.models.registry import build_model

if TYPE_CHECKING:
    from knitwatch.models.base import AnomalyModel

log = structlog.get_logger(__name__)

FORMAT_NAME = "knitwatch-onnx-1"
INPUT_NAME = "tiles"
OUTPUT_NAMES = ("maps", "scores")
DEFAULT_OPSET = 18
InputDType = Literal["uint8", "float32"]
INPUT_DTYPES: tuple[str, ...] = ("uint8", "float32")
_META_PREFIX = "knitwatch."


class ExportError(RuntimeError):
    """The export cannot be done (missing package, unsupported model, failed check); the message says why."""


class MissingPackageError(ExportError):
    """An optional package the export needs (onnx, onnxscript, onnxruntime) is not installed."""


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_onnx_path(checkpoint: str | Path) -> Path:
    """Where `knitwatch export` writes by default and the ONNX Runtime backend looks first: ``model.ckpt`` ->
    ``model.onnx`` (same folder)."""
    return Path(checkpoint).with_suffix(".onnx")


class TileGraph(nn.Module):
    """The exported computation: raw tiles (uint8 or float 0..255) -> (maps (N,T,T), scores (N,)).

    ``model`` is an EfficientAD or MSFlow module (anything with ``input_mean``/``input_std`` buffers whose
    ``forward`` takes an ImageNet-normalised float (N,3,T,T) and returns (map (N,1,T,T), score (N,))).
    """

    offset: Tensor
    scale: Tensor

    def __init__(self, model: AnomalyModel, grayscale: bool) -> None:
        super().__init__()
        self.model = model
        self.grayscale = bool(grayscale)
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std): one subtraction and one division per pixel
        self.register_buffer("offset", (model.input_mean.detach().float() * 255.0).clone(), persistent=False)
        self.register_buffer("scale", (model.input_std.detach().float() * 255.0).clone(), persistent=False)

    def forward(self, tiles: Tensor) -> tuple[Tensor, Tensor]:
        x = tiles.to(torch.float32)
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if self.grayscale else x.permute(0, 3, 1, 2)
        x = (x - self.offset) / self.scale
        amap, score = self.model(x)
        return amap[:, 0], score


def _require(module: str) -> Any:  # noqa: ANN401 - a module object
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingPackageError(
            f"ONNX export needs the Python package {module!r}: pip install 'knitwatch[onnx]' "
            "(onnx, onnxscript, onnxruntime)"
        ) from exc


def example_tiles(n: int, tile: int, grayscale: bool, dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    """Random fabric-like tiles (a periodic loop pattern plus noise) in the graph's input layout."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32)
    out = []
    for _ in range(n):
        ph = rng.uniform(0, 2 * np.pi, 2)
        img = 128 + 50 * np.sin(2 * np.pi * xx / 6 + ph[0]) * np.sin(2 * np.pi * yy / 8 + ph[1])
        out.append(np.clip(img + rng.normal(0, 10, img.shape), 0, 255))
    arr = np.stack(out).astype(np.uint8)
    if not grayscale:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr.astype(np.float32) if dtype == "float32" else arr


@dataclass
class ExportReport:
    path: Path
    kind: str
    tile: int
    grayscale: bool
    input_dtype: str
    opset: int
    seconds: float
    size_bytes: int
    checkpoint_sha256: str
    parity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "tile": self.tile,
            "grayscale": self.grayscale,
            "input_dtype": self.input_dtype,
            "opset": self.opset,
            "seconds": round(self.seconds, 2),
            "size_mb": round(self.size_bytes / 2**20, 2),
            "checkpoint_sha256": self.checkpoint_sha256,
            "parity": self.parity,
            "notes": self.notes,
        }


def export_module(
    model: AnomalyModel,
    out: str | Path,
    *,
    grayscale: bool,
    metadata: Mapping[str, str] | None = None,
    opset: int = DEFAULT_OPSET,
    input_dtype: InputDType = "uint8",
) -> Path:
    """Export ``model`` (eval mode, on the CPU) wrapped in `TileGraph` to ``out``; returns the path.

    ``metadata`` entries are stored as ONNX ``metadata_props`` (prefixed ``knitwatch.``).
    """
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    _require("onnx")
    _require("onnxscript")
    out = Path(out)
    tile = int(model.tile_size)
    # torch's stub for Module.to has no overload taking a device and memory_format together
    cpu_model = model.to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    graph = TileGraph(cpu_model.eval(), grayscale).eval()
    example = torch.from_numpy(example_tiles(2, tile, grayscale, input_dtype))
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter deprecation/trace chatter; failures still raise
        try:
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"tiles": {0: batch}},
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - any exporter failure is reported the same way
            raise ExportError(f"torch.onnx.export failed for {getattr(model, 'kind', type(model).__name__)}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    meta = {
        "format": FORMAT_NAME,
        "tile": str(tile),
        "grayscale": json.dumps(bool(grayscale)),
        "input_dtype": input_dtype,
        "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}, opset {opset}",
        **{k: str(v) for k, v in (metadata or {}).items()},
    }
    for k, v in meta.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = _META_PREFIX + k, v
    proto.producer_name = "knitwatch"
    with atomic_path(out) as tmp:
        _require("onnx").save_model(proto, str(tmp), save_as_external_data=False)
    return out


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``knitwatch.*`` metadata of an exported file (prefix removed), read without the weights' cost
    of building a session; {} for a foreign ONNX file."""
    onnx = _require("onnx")
    proto = onnx.load_model(str(path), load_external_data=False)
    return {p.key[len(_META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(_META_PREFIX)}


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    input_dtype: InputDType = "uint8",
    check: bool = True,
    sha256: str | None = None,
) -> ExportReport:
    """Export a knitwatch checkpoint to ONNX (default: `default_onnx_path`), optionally checking parity.

    ``check``: run the graph with ONNX Runtime on a few tiles and compare with PyTorch (`compare_outputs`);
    the result is in ``report.parity``. Raises `ExportError` (missing packages, export failures) or
    `knitwatch.models.checkpoint.CheckpointError` (unreadable checkpoint).
    """
    t0 = time.perf_counter()
    ckpt_path = Path(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    digest = sha256 or checkpoint_sha256(ckpt_path)
    # the built-in kinds' models are AnomalyModels (tile_size, input_mean/input_std, predict)
    model = cast("AnomalyModel", build_model(ckpt).to("cpu").eval())
    grayscale = bool(ckpt.preprocess.get("grayscale", True))
    dest = Path(out) if out is not None else default_onnx_path(ckpt_path)
    meta = {
        "kind": ckpt.kind,
        "checkpoint_sha256": digest,
        "checkpoint_id": str(ckpt.provenance.get("id", ckpt_path.name)),
        "thresholds": json.dumps(ckpt.thresholds, sort_keys=True),
        "preprocess": json.dumps(ckpt.preprocess, sort_keys=True),
    }
    export_module(model, dest, grayscale=grayscale, metadata=meta, opset=opset, input_dtype=input_dtype)
    seconds = time.perf_counter() - t0
    report = ExportReport(
        path=dest, kind=ckpt.kind, tile=int(model.tile_size), grayscale=grayscale, input_dtype=input_dtype,
        opset=opset, seconds=seconds, size_bytes=dest.stat().st_size, checkpoint_sha256=digest,
    )
    log.info("onnx exported", path=str(dest), kind=ckpt.kind, seconds=round(seconds, 1),
             size_mb=round(report.size_bytes / 2**20, 1))
    if check:
        try:
            report.parity = check_parity(ckpt, dest, model=model)
        except ExportError as exc:
            report.notes.append(f"parity not checked: {exc}")
    return report


# Parity limits: the largest map difference relative to the maps' range, and no decision may differ.
MAX_REL_MAP_DIFF = 1e-3


def parity_problems(parity: dict) -> list[str]:
    """What is wrong with a `check_parity` result ([] when the export agrees with PyTorch)."""
    problems = []
    if parity["max_rel_map"] > MAX_REL_MAP_DIFF:
        problems.append(f"maps differ by up to {parity['max_abs_map']:.3g} ({parity['max_rel_map']:.1e} of their "
                        f"range; limit {MAX_REL_MAP_DIFF:.0e})")
    for name in ("image", "pixel"):
        d = parity.get(f"{name}_decisions")
        if d and d["differ"]:
            problems.append(f"{d['differ']} {name} decision(s) differ at the stored {name} threshold")
    return problems


def compare_outputs(
    ref: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray], thresholds: Mapping[str, Any]
) -> dict[str, Any]:
    """How far ``other`` (maps, scores) is from ``ref``: max abs differences (also relative to the
    reference map's range) and the decisions that differ at the thresholds (image: score > image
    threshold; pixel: map > pixel threshold), with the smallest distance of a reference value to its
    threshold (how close a flip could have been)."""
    ref_maps, ref_scores = (np.asarray(a, np.float64) for a in ref)
    maps, scores = (np.asarray(a, np.float64) for a in other)
    span = float(ref_maps.max() - ref_maps.min()) if ref_maps.size else 0.0
    out: dict[str, Any] = {
        "tiles": int(ref_scores.shape[0]),
        "max_abs_map": float(np.abs(maps - ref_maps).max()) if maps.size else 0.0,
        "max_abs_score": float(np.abs(scores - ref_scores).max()) if scores.size else 0.0,
        "map_range": span,
    }
    out["max_rel_map"] = out["max_abs_map"] / span if span > 0 else 0.0
    for name, r, o in (("image", ref_scores, scores), ("pixel", ref_maps, maps)):
        thr = thresholds.get(name)
        if thr is None or not math.isfinite(float(thr)):
            out[f"{name}_decisions"] = None
            continue
        thr = float(thr)
        out[f"{name}_decisions"] = {
            "positive": int((r > thr).sum()),
            "differ": int(((r > thr) != (o > thr)).sum()),
            "closest_to_threshold": float(np.abs(r - thr).min()) if r.size else None,
        }
    return out


def check_parity(
    ckpt: Checkpoint, onnx_path: str | Path, *, model: AnomalyModel | None = None, tiles: np.ndarray | None = None
) -> dict[str, Any]:
    """Compare the exported graph (ONNX Runtime, CPU) with the PyTorch model on ``tiles`` (default: 8
    synthetic fabric tiles plus a dark and a bright one) at the checkpoint's thresholds."""
    ort = _require("onnxruntime")
    model = model if model is not None else cast("AnomalyModel", build_model(ckpt).to("cpu"))
    model.eval()
    tile = int(model.tile_size)
    grayscale = bool(ckpt.preprocess.get("grayscale", True))
    if tiles is None:
        tiles = example_tiles(8, tile, grayscale, seed=1)
        flat = np.stack([np.full(tiles.shape[1:], 20, np.uint8), np.full(tiles.shape[1:], 235, np.uint8)])
        tiles = np.concatenate([tiles, flat])
    meta = onnx_metadata(onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = tiles.astype(np.float32) if meta.get("input_dtype") == "float32" else tiles.astype(np.uint8)
    maps, scores = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(feed)})
    with torch.inference_mode():
        ref_maps, ref_scores = model.predict(tiles.astype(np.uint8))
    return compare_outputs((ref_maps, ref_scores), (maps, scores), ckpt.thresholds)
