"""A loaded model as the pipeline sees it: tiles in, maps and scores out, plus its thresholds and
preprocessing - everything from one checkpoint file.

Two backends run the model (``[inference] backend``; ``auto``, the default, picks ``onnxruntime`` on a
CPU when it is installed - measured faster than PyTorch there, see the README's speed section - and
``torch`` on a GPU or when ONNX Runtime is missing or cannot take the model):

* ``torch``: the checkpoint's PyTorch module (`knitwatch.models`), GPU when there is one;
* ``onnxruntime``: the model exported to ONNX (`knitwatch.models.export`: normalisation inside the
  graph, maps and scores as outputs) and run by ONNX Runtime, for CPU hosts. The graph is taken from
  ``CKPT`` with the suffix ``.onnx`` next to the checkpoint (``knitwatch export CKPT --format onnx``
  writes it there) when it was made from this very checkpoint (the SHA-256 of the checkpoint file is
  stored in the graph's metadata); otherwise from the export cache (`onnx_cache_dir`), and when it is
  not there either, the checkpoint is exported on the fly into the cache (about 5-30 s on a CPU, once
  per checkpoint) - the checkpoint's folder is never written to. Thresholds and preprocessing always
  come from the checkpoint, whatever the backend.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from knitwatch.models.checkpoint import CheckpointError, load_checkpoint
from knitwatch.models.registry import build_model

log = structlog.get_logger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available (use 'auto' or 'cpu')")
    return device


@dataclass
class Detector:
    model: Any  # an nn.Module or OnnxTileModel with predict(tiles) -> (maps, scores)
    kind: str
    preprocess: dict
    thresholds: dict
    checkpoint_id: str
    device: str
    info: dict = field(default_factory=dict)
    backend: str = "torch"

    @property
    def image_threshold(self) -> float:
        return float(self.thresholds["image"])

    @property
    def pixel_threshold(self) -> float:
        return float(self.thresholds.get("pixel", self.thresholds["image"]))

    def predict(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 tiles (N, H, W[, 3]) -> anomaly maps float32 (N, H, W) and tile scores float32 (N,)."""
        maps, scores = self.model.predict(tiles)
        return np.asarray(maps, dtype=np.float32), np.asarray(scores, dtype=np.float32)

    def warm_up(self, batch: int = 2) -> None:
        t = int(self.preprocess["tile"])
        shape = (batch, t, t) if self.preprocess.get("grayscale", True) else (batch, t, t, 3)
        self.predict(np.full(shape, 128, np.uint8))


# ---------------------------------------------------------------------------------------------- ONNX Runtime


def _onnxruntime() -> Any:  # noqa: ANN401 - the module
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeError("backend 'onnxruntime' needs the onnxruntime package: "
                           "pip install 'knitwatch[onnx]'") from exc
    return onnxruntime


class OnnxTileModel:
    """An exported knitwatch graph run by ONNX Runtime, with the ``predict`` of the torch models.

    ``device``: 'cpu' (CPUExecutionProvider) or 'cuda' (CUDAExecutionProvider, from the onnxruntime-gpu
    package). ``threads``: intra-op threads (0: ONNX Runtime's default, one per physical core).
    """

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0) -> None:
        from knitwatch.models.export import INPUT_NAME, OUTPUT_NAMES

        ort = _onnxruntime()
        self.path = Path(path)
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("backend 'onnxruntime' on 'cuda' needs the onnxruntime-gpu package "
                                   "(CUDAExecutionProvider); use device 'cpu' or backend 'torch'")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda' for onnxruntime, got {device!r}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only: its warnings bypass our logging
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise RuntimeError(f"{self.path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k[len("knitwatch."):]: v for k, v in meta.items() if k.startswith("knitwatch.")}
        inp = self.session.get_inputs()
        outs = [o.name for o in self.session.get_outputs()]
        if len(inp) != 1 or inp[0].name != INPUT_NAME or outs[:2] != list(OUTPUT_NAMES):
            raise RuntimeError(f"{self.path}: not a knitwatch export (inputs {[i.name for i in inp]}, outputs {outs})")
        self._input, self._outputs = INPUT_NAME, list(OUTPUT_NAMES)
        self._dtype = np.float32 if inp[0].type == "tensor(float)" else np.uint8
        shape = inp[0].shape
        self.tile_size = int(shape[1]) if isinstance(shape[1], int) else int(self.metadata.get("tile", 0))
        self.grayscale = len(shape) == 3
        self.device = device

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.metadata.get("checkpoint_sha256")

    def predict(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 tiles (N,T,T) (gray) or (N,T,T,3) (colour) -> maps float32 (N,T,T), scores float32 (N,)."""
        x = np.asarray(tiles)
        if self.grayscale and x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        n = x.shape[0] if x.ndim else 0
        if n == 0:
            t = self.tile_size
            return np.zeros((0, t, t), np.float32), np.zeros((0,), np.float32)
        want = 3 if self.grayscale else 4
        if x.ndim != want or x.shape[1] != self.tile_size or x.shape[2] != self.tile_size:
            layout = "(N,T,T)" if self.grayscale else "(N,T,T,3)"
            raise ValueError(f"tiles must be {layout} with T={self.tile_size}; got shape {x.shape}")
        maps, scores = self.session.run(self._outputs, {self._input: np.ascontiguousarray(x, dtype=self._dtype)})
        return maps, scores


def onnx_cache_dir() -> Path:
    """Where on-the-fly exports are kept: ``$CACHE_DIRECTORY`` (systemd's CacheDirectory=), else
    ``$XDG_CACHE_HOME/knitwatch``, else ``~/.cache/knitwatch``; plus ``/onnx``."""
    systemd = os.environ.get("CACHE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "knitwatch" / "onnx"


def _current_session(path: Path, sha: str, device: str) -> OnnxTileModel | None:
    if not path.is_file():
        return None
    try:
        model = OnnxTileModel(path, device)
    except RuntimeError as e:
        log.warning("onnx file unusable, ignoring it", path=str(path), reason=str(e))
        return None
    if model.checkpoint_sha256 != sha:
        log.warning("onnx file was not exported from this checkpoint, ignoring it (re-run knitwatch export)",
                    path=str(path), onnx_checkpoint_sha256=model.checkpoint_sha256, checkpoint_sha256=sha)
        return None
    return model


def load_onnx_model(checkpoint: str | Path, device: str = "cpu", cache_dir: str | Path | None = None) -> OnnxTileModel:
    """The ONNX Runtime model of a checkpoint: next to it, in the cache, or exported into the cache now.

    An export made here is checked against PyTorch first (`knitwatch.models.export.check_parity`): a
    graph whose maps or decisions differ is deleted and reported (RuntimeError), never used.
    """
    from knitwatch.models.export import checkpoint_sha256, default_onnx_path, export_checkpoint, parity_problems

    ckpt = Path(checkpoint)
    sha = checkpoint_sha256(ckpt)
    model = _current_session(default_onnx_path(ckpt), sha, device)
    if model is not None:
        return model
    cached = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
    cached = cached / f"{ckpt.stem}-{sha[:16]}.onnx"
    model = _current_session(cached, sha, device)
    if model is not None:
        return model
    log.info("exporting the checkpoint to ONNX for onnxruntime (once; 'knitwatch export' does it ahead)",
             checkpoint=str(ckpt), cache=str(cached))
    try:
        report = export_checkpoint(ckpt, cached, check=True, sha256=sha)
    except OSError as e:
        raise RuntimeError(f"cannot write the ONNX export to {cached} ({e}); run 'knitwatch export {ckpt} "
                           "--format onnx' to put it next to the checkpoint") from e
    problems = parity_problems(report.parity) if report.parity else []
    if problems:
        cached.unlink(missing_ok=True)
        raise RuntimeError(f"the ONNX export of {ckpt} disagrees with PyTorch: {'; '.join(problems)}")
    for note in report.notes:
        log.warning("onnx export", checkpoint=str(ckpt), note=note)
    return OnnxTileModel(cached, device)


# ---------------------------------------------------------------------------------------------- loading


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def load_detector(path: str | Path, device: str, backend: str) -> Detector:
    """The detector of a checkpoint on ``device`` ('auto', 'cpu', 'cuda') with ``backend`` (`BACKENDS`);
    ``[inference] device`` and ``backend`` of the config, where the defaults live.

    ``auto``: ``onnxruntime`` when the device resolves to the CPU and ONNX Runtime is installed, else
    ``torch``; when the ONNX route fails (the exporter missing or unable to take the model, an export
    that disagrees with PyTorch, an unwritable cache) it says why in a warning and runs the model with
    PyTorch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if resolve_device(device) != "cpu":
            return load_detector(path, device, "torch")
        if not onnxruntime_installed():
            log.info("backend auto: torch (ONNX Runtime not installed: pip install 'knitwatch[onnx]')")
            return load_detector(path, device, "torch")
        try:
            return load_detector(path, device, "onnxruntime")
        except CheckpointError:
            raise  # a bad checkpoint is reported as such, not as an ONNX problem
        except Exception as e:  # noqa: BLE001 - any exporter/runtime failure: PyTorch still runs the model
            log.warning("backend auto: ONNX Runtime failed, using torch", error=f"{type(e).__name__}: {e}")
            return load_detector(path, device, "torch")
    ckpt = load_checkpoint(path)
    info: dict[str, Any] = {"path": str(path), "backend": backend}
    if backend == "onnxruntime":
        ort = _onnxruntime()
        if device == "auto":
            gpu = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
            dev = "cuda" if gpu else "cpu"
        else:
            dev = resolve_device(device)
        model: Any = load_onnx_model(path, dev)
        info["onnx"] = str(model.path)
    else:
        dev = resolve_device(device)
        model = build_model(ckpt).to(dev).eval()
    det = Detector(
        model=model,
        kind=ckpt.kind,
        preprocess=ckpt.preprocess,
        thresholds=ckpt.thresholds,
        checkpoint_id=str(ckpt.provenance.get("id", Path(path).name)),
        device=dev,
        info=info,
        backend=backend,
    )
    log.info("model loaded", path=str(path), kind=ckpt.kind, device=dev, backend=backend,
             thresholds=ckpt.thresholds, **({"onnx": info["onnx"]} if "onnx" in info else {}))
    return det
