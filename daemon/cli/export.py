"""``knitwatch export CKPT --format onnx``: the model as an ONNX graph, checked against PyTorch.

The graph takes the tiles as the tiler cuts them (uint8, (N,T,T) gray or (N,T,T,3) colour; the batch
N is dynamic) and returns the anomaly maps (N,T,T) and tile scores (N,); the input normalisation and
the model's statistics are inside it (`knitwatch.models.export`). By default it is written next to the
checkpoint (``model.ckpt`` -> ``model.onnx``), where the ``onnxruntime`` inference backend looks first.

After the export the graph is run with ONNX Runtime on a few tiles and compared with PyTorch: the
largest map and score differences and whether any decision at the checkpoint's thresholds differs.
Exit code 0 when they agree, 1 when they do not (or the export failed), 2 for bad input (unreadable
checkpoint, missing packages).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import structlog

from knitwatch.daemon.cli.common import EXIT_FAIL, CliError

log = structlog.get_logger(__name__)



def cmd_export(args: argparse.Namespace) -> int:
    from knitwatch.models.checkpoint import CheckpointError
    from knitwatch.models.export import (
        DEFAULT_OPSET,
        ExportError,
        MissingPackageError,
        export_checkpoint,
        parity_problems,
    )

    if args.format != "onnx":  # argparse already limits the choices; kept for callers building args
        raise CliError(f"unknown format {args.format!r}; supported: onnx")
    try:
        report = export_checkpoint(args.checkpoint, args.out, opset=args.opset or DEFAULT_OPSET,
                                   input_dtype=args.input_dtype, check=not args.no_check)
    except (CheckpointError, MissingPackageError) as e:
        raise CliError(str(e)) from None
    except ExportError as e:
        raise CliError(str(e), EXIT_FAIL) from None
    result = report.to_dict()
    problems = parity_problems(report.parity) if report.parity else []
    result["parity_ok"] = None if report.parity is None else not problems
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        layout = "(N,T,T)" if report.grayscale else "(N,T,T,3)"
        sys.stdout.write(f"wrote {report.path} ({result['size_mb']} MB, {report.seconds:.1f} s): {report.kind}, "
                         f"input 'tiles' {report.input_dtype} {layout} with T={report.tile} and a dynamic batch N, "
                         f"outputs 'maps' (N,T,T) and 'scores' (N,), opset {report.opset}\n")
        p = report.parity
        if p is not None:
            dec = ", ".join(f"{n} decisions differ: {p[f'{n}_decisions']['differ']}" if p.get(f"{n}_decisions")
                            else f"{n} decisions: no threshold" for n in ("image", "pixel"))
            sys.stdout.write(f"parity with PyTorch on {p['tiles']} tiles: max |map diff| {p['max_abs_map']:.2e} "
                             f"({p['max_rel_map']:.1e} of the map range), max |score diff| {p['max_abs_score']:.2e}; "
                             f"{dec}\n")
        for note in report.notes:
            sys.stdout.write(f"note: {note}\n")
    if problems:
        raise CliError(f"{report.path}: the export does not agree with PyTorch: " + "; ".join(problems), EXIT_FAIL)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model checkpoint to ONNX (checked against PyTorch)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CKPT")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="output format (onnx)")
    p.add_argument("--out", type=Path, metavar="FILE", help="output file (default: CKPT with the suffix .onnx)")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default 18)")
    p.add_argument("--input-dtype", choices=["uint8", "float32"], default="uint8",
                   help="the graph's input type: uint8 tiles (default) or float32 0..255")
    p.add_argument("--no-check", action="store_true", help="skip the parity check with ONNX Runtime")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)
