"""``knitwatch cameras list|check|snap|bench``: industrial cameras (pylon, GenICam/GenTL) at set-up time.

``list`` shows every camera the SDKs see; ``check`` opens each configured industrial camera, writes its
settings and reads them back (a value the camera cannot take: exit code 2, naming camera and setting);
``snap`` saves one frame of a camera; ``bench`` measures a camera source's grab rate and CPU cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from knitwatch.config.settings import CameraConfig, Settings
from knitwatch.daemon.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    add_config_option,
    add_group,
    load_config,
    table,
)

INDUSTRIAL = ("pylon", "genicam")


def _sdk_cameras(producers: list[Path]) -> tuple[list[dict[str, str]], list[str]]:
    """Every camera pypylon and the given GenTL producers see, and a note per SDK that could not look."""
    found: list[dict[str, str]] = []
    notes: list[str] = []
    try:
        from knitwatch.pipeline.sources.pylon import list_pylon_cameras

        found += list_pylon_cameras()
    except Exception as e:  # noqa: BLE001 - pypylon missing or failing: say so, list the rest
        notes.append(f"pylon: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    for producer in producers:
        if not producer.is_file():
            notes.append(f"genicam: {producer}: no such file")
            continue
        try:
            from knitwatch.pipeline.sources.genicam import list_gentl_cameras

            found += [{**c, "sdk": f"genicam ({producer.name})"} for c in list_gentl_cameras(producer)]
        except ImportError:
            notes.append("genicam: harvesters is not installed: pip install 'knitwatch[cameras]'")
        except Exception as e:  # noqa: BLE001 - a broken producer file
            notes.append(f"genicam: {producer}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return found, notes


def _settings(args: argparse.Namespace) -> Settings:
    return load_config(args)


def cmd_cameras_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    producers = list(args.gentl_producer or [])
    for cam in settings.cameras:
        p = cam.industrial.gentl_producer
        if cam.source == "genicam" and p is not None and p not in producers:
            producers.append(p)
    found, notes = _sdk_cameras(producers)
    if args.json:
        sys.stdout.write(json.dumps({"cameras": found, "notes": notes}, indent=2) + "\n")
        return EXIT_OK
    rows = [[c["sdk"], c["model"], c["serial"], c.get("user_id", ""), c["interface"], c.get("address", "")]
            for c in found]
    sys.stdout.write(table(rows, ["SDK", "MODEL", "SERIAL", "USER ID", "INTERFACE", "ADDRESS"]) if rows
                     else "no camera found\n")
    for n in notes:
        sys.stdout.write(f"note: {n}\n")
    if "PYLON_CAMEMU" not in os.environ and not found:
        sys.stdout.write("hint: PYLON_CAMEMU=2 knitwatch cameras list  shows two emulated Basler cameras\n")
    return EXIT_OK


def _camera_for(settings: Settings, ident: str) -> CameraConfig:
    """A configured camera by its id, else a pylon camera by serial number or user id (default settings)."""
    for cam in settings.cameras:
        if cam.id == ident:
            return cam
    try:
        return CameraConfig(id="snap", source="pylon", industrial={"device": ident})  # type: ignore[arg-type]
    except ValueError as e:
        raise CliError(f"camera {ident!r}: {e}") from None


def _open(cam: CameraConfig) -> Any:  # noqa: ANN401 - a frame source
    from knitwatch.pipeline.sources.base import SourceError, make_source
    from knitwatch.pipeline.sources.genicam import CameraSettingError

    src = make_source(cam)
    try:
        src.open()
    except CameraSettingError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except SourceError as e:
        raise CliError(f"camera {cam.id}: {e}", EXIT_FAIL) from None
    return src


def _grab(src: Any, cam: CameraConfig, timeout_s: float) -> Any:  # noqa: ANN401
    from knitwatch.pipeline.sources.base import SourceError

    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout_s:
            img = src.read()
            if img is not None:
                return img
            time.sleep(0.01)
    except SourceError as e:
        raise CliError(f"camera {cam.id}: {e}", EXIT_FAIL) from None
    raise CliError(f"camera {cam.id}: opened, but no frame within {timeout_s:g} s (a trigger that never came? "
                   "industrial.trigger = \"line\" needs the machine running)", EXIT_FAIL)


def cmd_cameras_snap(args: argparse.Namespace) -> int:
    import cv2

    out: Path = args.out
    if out.suffix.lower() not in (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg"):
        raise CliError(f"--out {out}: use an image file name (.png, .bmp, .tif, .jpg)")
    if not out.parent.is_dir():
        raise CliError(f"--out {out}: folder {out.parent} does not exist")
    settings = _settings(args)
    cam = _camera_for(settings, args.id)
    src = _open(cam)
    try:
        img = _grab(src, cam, args.timeout)
        info = src.stats() if hasattr(src, "stats") else {}
        applied = getattr(src, "settings", {})
    finally:
        src.close()
    tmp = out.with_name(f".{out.name}.part{out.suffix}")
    if not cv2.imwrite(str(tmp), img):
        tmp.unlink(missing_ok=True)
        raise CliError(f"--out {out}: cannot write the image", EXIT_FAIL)
    tmp.replace(out)
    shape = f"{img.shape[1]}x{img.shape[0]} " + ("gray" if img.ndim == 2 else f"{img.shape[2]} channels")
    who = f"{info.get('model', cam.source)} {info.get('serial', '')}".strip()
    sys.stdout.write(f"{out}: {shape} from camera {cam.id} ({who})\n")
    for k, v in applied.items():
        if v is not None:
            sys.stdout.write(f"  {k:18s} {v}\n")
    return EXIT_OK


def cmd_cameras_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    cams = [c for c in settings.cameras if c.source in INDUSTRIAL]
    if not cams:
        sys.stdout.write("no industrial camera (source \"pylon\" or \"genicam\") configured\n")
        return EXIT_OK
    rows, results, code = [], [], EXIT_OK
    for cam in cams:
        try:
            src = _open(cam)
            try:
                img = _grab(src, cam, args.timeout)
                applied = dict(getattr(src, "settings", {}))
                info = src.stats()
            finally:
                src.close()
        except CliError as e:
            code = max(code, e.code)
            rows.append([cam.id, "FAIL", str(e)])
            results.append({"camera": cam.id, "ok": False, "error": str(e)})
            continue
        shown = ", ".join(f"{k}={v}" for k, v in applied.items() if v is not None)
        rows.append([cam.id, "OK", f"{info['model']} {info['serial']}: frame {img.shape[1]}x{img.shape[0]}; {shown}"])
        results.append({"camera": cam.id, "ok": True, "model": info["model"], "serial": info["serial"],
                        "settings": applied})
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        sys.stdout.write(table(rows, ["CAMERA", "STATUS", "DETAIL"]))
    return code


def cmd_cameras_bench(args: argparse.Namespace) -> int:
    """Grab for a while through the source as the capture stage does; frames/s and CPU time per frame."""
    if args.seconds <= 0:
        raise CliError(f"--seconds {args.seconds:g}: must be > 0")
    settings = _settings(args)
    cam = _camera_for(settings, args.id)
    if args.fps is not None:
        try:
            cam = cam.model_copy(update={"fps": CameraConfig.model_validate({**cam.model_dump(), "fps": args.fps}).fps})
        except ValidationError as e:
            raise CliError(f"--fps {args.fps:g}: {e.errors()[0]['msg']}") from None
    src = _open(cam)
    frames = 0
    nbytes = 0
    try:
        _grab(src, cam, 10.0)  # the first frame (opening, buffers) is not measured
        c0, t0 = time.process_time(), time.monotonic()
        next_report = t0 + 1.0
        while (now := time.monotonic()) - t0 < args.seconds:
            img = src.read()
            if img is not None:
                frames += 1
                nbytes += img.nbytes
            if now >= next_report and not args.json and sys.stderr.isatty():
                sys.stderr.write(f"\r{now - t0:5.1f} s  {frames} frames")
                next_report += 1.0
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        info = src.stats()
    finally:
        src.close()
    if not args.json and sys.stderr.isatty():
        sys.stderr.write("\n")
    result = {
        "camera": cam.id, "model": info.get("model"), "serial": info.get("serial"),
        "seconds": round(wall, 2), "frames": frames, "fps": round(frames / wall, 2),
        "megapixels_per_s": round(nbytes / wall / 1e6, 2),
        "cpu_ms_per_frame": round(cpu * 1000 / frames, 3) if frames else None,
        "cpu_percent_of_one_core": round(100 * cpu / wall, 1),
        "incomplete": info.get("incomplete"), "lost": info.get("lost"), "timeouts": info.get("timeouts"),
    }
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        for k, v in result.items():
            sys.stdout.write(f"{k:24s} {v}\n")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    grp = add_group(sub, "cameras", "industrial cameras (Basler pylon, GenICam): list, check, snap, bench",
                    "cameras_command")
    ls = grp.add_parser(
        "list", help="every camera pypylon and the GenTL producers see (model, serial, interface)",
        description="List the cameras Basler's pylon SDK sees (GigE, USB3, and the camera emulator: set "
        "PYLON_CAMEMU=N for N emulated cameras) and those of each GenTL producer: the configured cameras' "
        "industrial.gentl_producer files and --gentl-producer. Use a SERIAL or USER ID as industrial.device.")
    add_config_option(ls)
    ls.add_argument("--gentl-producer", type=Path, action="append", metavar="CTI",
                    help="also list what this GenTL producer (.cti) sees (repeatable)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_cameras_list)
    ck = grp.add_parser(
        "check", help="open each configured industrial camera, write its settings, read them back, grab a frame",
        description="For every camera with source \"pylon\" or \"genicam\": find it, write its [cameras.industrial] "
        "settings, read them back and grab one frame. Exit code 2 when a setting is not possible on the camera "
        "(the message names camera and setting), 1 when a camera cannot be reached or sends no frame.")
    add_config_option(ck)
    ck.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a frame (default 5)")
    ck.add_argument("--json", action="store_true", help="print JSON")
    ck.set_defaults(func=cmd_cameras_check)
    sn = grp.add_parser(
        "snap", help="save one frame of a camera as an image file",
        description="Open camera ID - a configured camera's id (its settings are used), else the serial number or "
        "user id of a pylon camera (its own settings) - grab one frame and write it to --out.")
    add_config_option(sn)
    sn.add_argument("id", metavar="ID", help="a configured camera id, or a pylon camera's serial number / user id")
    sn.add_argument("--out", type=Path, required=True, metavar="FILE", help="image file to write (.png, .bmp ...)")
    sn.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the frame (default 5)")
    sn.set_defaults(func=cmd_cameras_snap)
    be = grp.add_parser(
        "bench", help="measure a camera source's grab rate and CPU cost on this machine",
        description="Read frames from camera ID (as 'snap' names it) as fast as the source delivers them for "
        "--seconds; prints frames/s, megapixels/s and the CPU time this process spent per frame.")
    add_config_option(be)
    be.add_argument("id", metavar="ID", help="a configured camera id, or a pylon camera's serial number / user id")
    be.add_argument("--seconds", type=float, default=10.0, help="how long to grab (default 10)")
    be.add_argument("--fps", type=float, default=None,
                    help="frame rate to set (free run) instead of the camera's configured fps (default 10)")
    be.add_argument("--json", action="store_true", help="print JSON")
    be.set_defaults(func=cmd_cameras_bench)
