"""``knitwatch learn record|train``: learn a new fabric (article) on the machine.

``record`` takes frames of normally running fabric from a configured camera - through the running
daemon (a request file in the model library that the alert stage honours; the frames the current model
flags are left out) or directly from the camera when no daemon answers - into
``<library>/recordings/<article>/<UTC time>``. ``train`` trains a model on the newest recording of the
article in a separate process at low priority, validates it on held-back revolutions through the
decision layer and installs it into the model library, or refuses it (exit code 3).

Run as ``python -m knitwatch.daemon.cli.learn JOB.json`` this module is that training process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from knitwatch.daemon.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    add_config_option,
    add_device_option,
    add_group,
    load_config,
)

EXIT_REFUSED = 3  # the new model's estimated false stops per hour exceed [learn] max_false_stops_per_hour
RECORDINGS = "recordings"


# ---------------------------------------------------------------------------------------------- shared


def _camera(settings: Any, cam_id: str) -> Any:  # noqa: ANN401 - CameraConfig
    for c in settings.cameras:
        if c.id == cam_id:
            return c
    known = ", ".join(c.id for c in settings.cameras) or "none"
    raise CliError(f"unknown camera {cam_id!r}: the configuration has {known} ([[cameras]] id)")


def _article(name: str) -> str:
    from knitwatch.models.articles import LibraryError, check_article

    try:
        return check_article(name)
    except LibraryError as e:
        raise CliError(str(e)) from None


def _library_root(settings: Any) -> Path:  # noqa: ANN401
    from knitwatch.models.articles import library_dir

    return library_dir(settings)


def _out(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        for k, v in result.items():
            sys.stdout.write(f"{k:24s} {v}\n")


def _bar(total: int | None, desc: str, quiet: bool) -> Any:  # noqa: ANN401 - a tqdm bar
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=quiet, file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- record


def daemon_running(settings: Any) -> bool:  # noqa: ANN401
    """The configured API's ``/healthz`` answers (200 or 503: a daemon is there, healthy or not)."""
    from knitwatch.daemon.cli.status import api_base_url, api_get

    if not settings.api.enabled or settings.api.port == 0:
        return False
    try:
        api_get(api_base_url(settings) + "/healthz", None, timeout=2.0)
    except (OSError, ValueError):
        return False
    return True


def _remove_recording(folder: Path, existed: bool) -> None:
    """Remove what a failed or cancelled recording wrote (the folder itself when this command made it)."""
    if not existed:
        shutil.rmtree(folder, ignore_errors=True)
        return
    shutil.rmtree(folder / "frames", ignore_errors=True)
    for name in ("frames.jsonl", "meta.json"):
        with contextlib.suppress(OSError):
            (folder / name).unlink()


def cmd_record(args: argparse.Namespace) -> int:
    settings = load_config(args)
    cam = _camera(settings, args.camera)
    article = _article(args.article)
    if args.frames is not None and args.frames < 1:
        raise CliError(f"--frames must be >= 1, got {args.frames}")
    if args.minutes is not None and not 0 < args.minutes <= 24 * 60:
        raise CliError(f"--minutes must be in (0, 1440], got {args.minutes}")
    root = _library_root(settings)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = args.out if args.out is not None else root / RECORDINGS / article / stamp
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CliError(f"--out {folder} exists and is not an empty folder: choose a new one")
    min_revs = settings.learn.min_revolutions
    target = int(args.frames or 0)
    max_seconds = args.minutes * 60.0 if args.minutes is not None else None
    via = args.via if args.via is not None else ("daemon" if daemon_running(settings) else "direct")
    if via == "daemon":
        meta = _record_via_daemon(root, cam.id, article, folder, target, min_revs, max_seconds, args)
    else:
        meta = _record_direct(cam, article, folder, target, min_revs, max_seconds, args)
    result = {"recording": str(folder), "article": article, "camera": cam.id, "how": meta.get("how", via),
              "status": meta.get("status"), "frames": meta.get("frames"), "revolutions": meta.get("revolutions"),
              "skipped_flagged": meta.get("skipped_flagged", 0), "flagged_kept": meta.get("flagged_kept", 0),
              "seconds": meta.get("seconds"),
              "next": f"knitwatch learn train --article {article}"}
    _out(result, args.json)
    return EXIT_OK


def _record_direct(cam: Any, article: str, folder: Path, target: int, min_revs: int,  # noqa: ANN401
                   max_seconds: float | None, args: argparse.Namespace) -> dict[str, Any]:
    from knitwatch.pipeline.offline.learn import record_from_camera
    from knitwatch.pipeline.recording import RecordingError, RecordingWriter

    existed = folder.exists()
    try:
        writer = RecordingWriter(folder, article=article, camera=cam.id, how="camera", target_frames=target,
                                 min_revolutions=min_revs, max_seconds=max_seconds)
    except RecordingError as e:
        _remove_recording(folder, existed)
        raise CliError(str(e)) from None
    bar = _bar(target or None, f"recording {cam.id}", args.quiet)

    def progress(p: dict[str, Any]) -> None:
        bar.update(p["frames"] - bar.n)
        bar.set_postfix_str(f"revolutions {p['revolutions']}/{min_revs}", refresh=False)

    try:
        meta = record_from_camera(cam, writer, progress=progress, pace=not args.fast,
                                  position_timeout_s=args.position_timeout,
                                  revolution_timeout_s=args.revolution_timeout)
    except RecordingError as e:
        bar.close()
        _remove_recording(folder, existed)
        raise CliError(f"{e}; nothing was kept") from None
    except KeyboardInterrupt:
        bar.close()
        _remove_recording(folder, existed)
        raise
    bar.close()
    if meta.get("status") != "done":
        _remove_recording(folder, existed)
        raise CliError(f"recording {meta.get('status')}; nothing was kept", EXIT_FAIL)
    return meta


def _record_via_daemon(root: Path, cam_id: str, article: str, folder: Path, target: int, min_revs: int,
                       max_seconds: float | None, args: argparse.Namespace) -> dict[str, Any]:
    from knitwatch.pipeline.recording import request_path, write_request

    req = request_path(root, cam_id)
    if req.exists():
        raise CliError(f"camera {cam_id!r} is already recording for the daemon ({req}); wait for it or remove "
                       "that file to cancel it")
    err = req.with_suffix(".error.json")
    with contextlib.suppress(OSError):
        err.unlink()
    try:
        write_request(root, cam_id, article=article, folder=folder, target_frames=target, min_revolutions=min_revs,
                      max_seconds=max_seconds)
    except OSError as e:
        raise CliError(f"cannot write the recording request {req}: {e}") from None
    timeout = args.timeout if args.timeout is not None else (max_seconds or 0.0) + 6 * 3600.0
    bar = _bar(target or None, f"recording {cam_id} (daemon)", args.quiet)
    t0 = time.monotonic()
    meta: dict[str, Any] = {}
    try:
        while True:
            time.sleep(0.5)
            if err.exists():
                why = json.loads(err.read_text(encoding="utf-8")).get("error", "?")
                raise CliError(f"the daemon refused the recording: {why}")
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            if meta:
                bar.update(int(meta.get("frames", 0)) - bar.n)
                bar.set_postfix_str(f"revolutions {meta.get('revolutions', 0)}/{min_revs}, "
                                    f"left out (flagged) {meta.get('skipped_flagged', 0)}", refresh=False)
                if meta.get("status") != "recording":
                    break
            elif time.monotonic() - t0 > args.pickup_timeout:
                raise CliError(f"the daemon did not start the recording within {args.pickup_timeout:.0f} s (is camera "
                               f"{cam_id!r} in the running daemon's configuration, and its model library {root}?)",
                               EXIT_FAIL)
            elif not req.exists():
                raise CliError("the daemon removed the recording request without starting it", EXIT_FAIL)
            if time.monotonic() - t0 > timeout:
                raise CliError(f"the recording did not finish within {timeout:.0f} s: cancelled", EXIT_FAIL)
    except BaseException:
        bar.close()
        with contextlib.suppress(OSError):
            req.unlink()  # the daemon finishes the recording as cancelled
        raise
    bar.close()
    if meta.get("status") != "done":
        raise CliError(f"recording {meta.get('status')}: {meta.get('error', 'see the daemon log')}", EXIT_FAIL)
    return meta


# ---------------------------------------------------------------------------------------------- train


def newest_recording(root: Path, article: str) -> Path:
    """The newest finished recording of ``article`` in the library; :class:`CliError` when there is none."""
    base = root / RECORDINGS / article
    done = []
    if base.is_dir():
        for p in sorted(base.iterdir()):
            with contextlib.suppress(OSError, ValueError):
                if json.loads((p / "meta.json").read_text(encoding="utf-8")).get("status") == "done":
                    done.append(p)
    if not done:
        raise CliError(f"no recording for article {article!r} in {base}: record one first with "
                       f"'knitwatch learn record --camera ID --article {article}' (or give --recording DIR)")
    return done[-1]


def cmd_train(args: argparse.Namespace) -> int:
    from knitwatch.models.articles import Library, LibraryError
    from knitwatch.pipeline.recording import Recording, RecordingError

    settings = load_config(args)
    article = _article(args.article)
    if args.use and args.camera is None:
        raise CliError("--use needs --camera ID (the camera that switches to the new model)")
    use_cam = _camera(settings, args.camera) if args.camera is not None else None
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    root = _library_root(settings)
    folder = args.recording if args.recording is not None else newest_recording(root, article)
    try:
        rec = Recording(folder)
    except RecordingError as e:
        raise CliError(str(e)) from None
    if rec.meta.get("status") != "done":
        raise CliError(f"recording {folder} is {rec.meta.get('status')!r}, not done: record again")
    if len(rec) == 0:
        raise CliError(f"recording {folder} has no frames")
    rec_cam = next((c for c in settings.cameras if c.id == rec.meta.get("camera")), None)
    learn = settings.learn
    _check_recording(rec, learn.validation_revolutions, args, rec_cam)
    work = Path(tempfile.mkdtemp(prefix="knitwatch-learn-"))
    job = {
        "recording": str(folder), "out_dir": str(work / "out"), "model": args.model or learn.model,
        "steps": args.steps, "tile": args.tile, "scale": args.scale, "device": args.device,
        "validation_revolutions": learn.validation_revolutions, "threads": learn.train_threads,
        "nice": learn.train_nice, "camera": rec_cam.model_dump(mode="json") if rec_cam is not None else None,
        "alert": settings.alert.model_dump(mode="json"), "tiling": settings.tiling.model_dump(mode="json"),
        "inference_device": settings.inference.device, "inference_backend": settings.inference.backend,
        "fps_hint": rec.meta.get("fps") or (rec_cam.fps if rec_cam is not None else None),
        "paced": bool(rec.meta.get("paced", True)), "recall": not args.no_recall and rec_cam is not None
        and rec_cam.source == "simulator", "progress": not args.quiet, "result": str(work / "result.json"),
        "log_level": getattr(args, "log_level", None) or "INFO",
    }
    try:
        (work / "job.json").write_text(json.dumps(job), encoding="utf-8")
        result = _run_worker(work, job, args)
        train, figures = result["train"], result["validation"]
        from knitwatch.pipeline.offline.learn import refusal

        reason = refusal(figures, learn.max_false_stops_per_hour)
        summary: dict[str, Any] = {
            "article": article, "recording": str(folder), "kind": train["kind"], "device": train["device"],
            "train_frames": train["train_frames"], "validation_frames": figures["frames"],
            "validation_hours": figures["hours"], "false_stops": figures["stops"],
            "false_stops_per_hour": figures["false_stops_per_hour"],
            "false_stops_per_hour_upper95": figures["false_stops_per_hour_upper95"],
            "max_score_vs_threshold": figures["max_score_vs_threshold"],
            "training_seconds": train["seconds"], "seconds": result["seconds"],
        }
        if result.get("recall") is not None:
            summary["simulator_recall"] = result["recall"]["recall"]
            summary["simulator_stop_recall"] = result["recall"]["stop_recall"]
        if reason is not None:
            summary.update(installed=False, refused=reason)
            _out(summary, args.json)
            sys.stderr.write(f"knitwatch: the new model is refused, not installed: {reason}\n")
            return EXIT_REFUSED
        meta = install_meta(result, folder, rec, job)
        try:
            lib = Library(root)
            m = lib.add(article, Path(train["checkpoint"]), meta)
            if args.use:
                assert use_cam is not None
                lib.use(use_cam.id, f"{article}@{m.version}", who="learn train --use")
        except OSError as e:
            raise CliError(f"cannot install the model into {root}: {e}; nothing was installed") from None
        except LibraryError as e:
            raise CliError(str(e)) from None
        summary.update(installed=True, model=m.id, path=str(m.checkpoint))
        if args.use:
            summary["camera"] = args.camera
        else:
            summary["next"] = f"knitwatch model use {m.id.replace('@v', '@')} --camera CAM"
        _out(summary, args.json)
        return EXIT_OK
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_recording(rec: Any, holdout: int, args: argparse.Namespace, cam: Any) -> None:  # noqa: ANN401
    """Bad recordings found before the training process starts: too few revolutions, no fabric texture."""
    from knitwatch.pipeline.offline.learn import DEFAULT_TILE, LearnError, preprocess_config, split_frames
    from knitwatch.pipeline.recording import RecordingError

    try:
        train, _ = split_frames(rec, holdout)
        if args.scale is None:
            preprocess_config(train, tile=args.tile or min(DEFAULT_TILE.values()), scale=None, where=str(rec.folder),
                              roi=tuple(cam.roi) if cam is not None and cam.roi is not None else None)
    except (LearnError, RecordingError) as e:
        raise CliError(str(e)) from None


def install_meta(result: dict[str, Any], folder: Path, rec: Any, job: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN401
    """The library metadata of a new version: what the stages need and the record of how it was made."""
    train, figures = result["train"], result["validation"]
    return {
        "kind": train["kind"], "preprocess": train["preprocess"], "thresholds": train["thresholds"],
        "recording": str(folder), "camera": rec.meta.get("camera"), "recording_how": rec.meta.get("how"),
        "frames": {"recorded": len(rec), "train": train["train_frames"],
                   "train_recorded": train["info"].get("recorded_train_frames"),
                   "validation": train["validation_frames"], "train_revolutions": train["train_revolutions"],
                   "validation_revolutions": train["validation_revolutions"], "tiles": train["tiles"]},
        "validation": figures, "recall_on_simulator": result.get("recall"),
        "training": {"steps": train["steps"], "tile": train["info"].get("tile"), "pitch": train["pitch"],
                     "threads": train["info"].get("threads"), "nice": job["nice"], "final_loss":
                     train["info"].get("final_loss"), "seconds": train["seconds"]},
        "host": train["device"], "duration_s": result["seconds"],
    }


def _run_worker(work: Path, job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run the training process (this module as ``__main__``) to its end; its result, or CliError."""
    threads = str(job["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    cmd = [sys.executable, "-m", "knitwatch.daemon.cli.learn", str(work / "job.json")]
    if not args.quiet:
        sys.stderr.write(f"knitwatch: training in a separate process (nice {job['nice']}, {threads} thread(s))\n")
    try:  # the training process's output (progress, log) goes where ours does: stderr
        err_fd: int | None = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr is not a file (captured in-process)
        err_fd = None
    out = err_fd if err_fd is not None else subprocess.PIPE
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)  # noqa: S603 - our own module and interpreter
    try:
        if proc.stdout is not None:
            for line in proc.stdout:
                sys.stderr.write(line.decode(errors="replace"))
        rc = proc.wait()
    except BaseException:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    try:
        result = json.loads(Path(job["result"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CliError(f"the training process ended (exit code {rc}) without a result", EXIT_FAIL) from None
    if "error" in result:
        raise CliError(result["error"], int(result.get("code", EXIT_FAIL)))
    return result


def worker(job_path: str) -> int:
    """The training process: lower priority, limited threads, train + validate (+ recall), result file."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    result_path = Path(job["result"])
    with contextlib.suppress(OSError):
        os.nice(int(job["nice"]))
    from knitwatch.daemon.logs import setup_logging

    setup_logging("learn", level=job.get("log_level") or "INFO", fmt="auto")
    import logging

    for noisy in ("onnxscript", "onnx_ir"):  # the ONNX exporter's rewrite passes log hundreds of lines at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.monotonic()
    try:
        import torch

        torch.set_num_threads(int(job["threads"]))
        from knitwatch.config.settings import AlertConfig, CameraConfig, TilingConfig
        from knitwatch.pipeline.offline.learn import (
            LearnError,
            recall_on_simulator,
            split_frames,
            train_article,
            validate,
        )
        from knitwatch.pipeline.recording import Recording, RecordingError

        out: dict[str, Any] = {}
        try:
            rec = Recording(job["recording"])
            cam = CameraConfig.model_validate(job["camera"]) if job["camera"] is not None else None
            alert = AlertConfig.model_validate(job["alert"])
            tiling = TilingConfig.model_validate(job["tiling"])
            tr = train_article(rec, job["out_dir"], model_kind=job["model"], steps=job["steps"], tile=job["tile"],
                               scale=job["scale"], validation_revolutions=int(job["validation_revolutions"]),
                               device=job["device"], threads=int(job["threads"]),
                               roi=tuple(cam.roi) if cam is not None and cam.roi is not None else None,
                               progress=bool(job["progress"]))
            out["train"] = tr.to_dict()
            _, val = split_frames(rec, int(job["validation_revolutions"]))
            dev = tr.device if job["inference_device"] == "auto" else job["inference_device"]
            sys.stderr.write(f"knitwatch: validating on {len(val)} held-back frames\n")
            out["validation"] = validate(tr.checkpoint, val, alert, fps_hint=job["fps_hint"], paced=job["paced"],
                                         camera=cam, tiling=tiling, device=dev, backend=job["inference_backend"])
            out["recall"] = None
            if job["recall"] and cam is not None:
                sys.stderr.write("knitwatch: recall on the simulator (one defect of every kind)\n")
                out["recall"] = recall_on_simulator(tr.checkpoint, cam, alert, tiling=tiling, device=dev,
                                                    backend=job["inference_backend"])
        except (LearnError, RecordingError) as e:
            out = {"error": str(e), "code": EXIT_USAGE}
        except OSError as e:
            out = {"error": f"training failed: {e}", "code": EXIT_USAGE if e.errno == 28 else EXIT_FAIL}
        except RuntimeError as e:
            out = {"error": f"training failed: {e}", "code": EXIT_FAIL}
    except Exception as e:  # noqa: BLE001 - reported to the parent as a failure, with the type
        out = {"error": f"training failed: {type(e).__name__}: {e}", "code": EXIT_FAIL}
    out["seconds"] = round(time.monotonic() - t0, 1)
    result_path.write_text(json.dumps(out, default=str), encoding="utf-8")
    return EXIT_OK if "error" not in out else int(out["code"])


# ---------------------------------------------------------------------------------------------- parser


def register(sub: argparse._SubParsersAction) -> None:
    from knitwatch.models.registry import trainable_kinds

    group = add_group(sub, "learn", "learn a new fabric (article) on the machine: record normal fabric, then train, "
                      "validate and install its model", "learn_command")

    rec = group.add_parser(
        "record", help="record frames of normally running fabric from a camera",
        description="Record frames of normally running fabric from a configured camera, over whole revolutions "
        "(at least [learn] min_revolutions), losslessly with their fabric position, into "
        "<library>/recordings/<article>/<UTC time> (--out to choose). When the daemon runs (its API's /healthz "
        "answers) it records through it - inspection goes on, and frames its current model flags are left out when "
        "that model was learned for this article; "
        "otherwise directly from the camera. A failed or interrupted recording is removed. Exit codes: 0 done, "
        "2 bad input (unknown camera, article name, camera that cannot be opened, no fabric position, full disk), "
        "1 other failures, 130 interrupted.")
    add_config_option(rec)
    rec.add_argument("--camera", required=True, metavar="ID", help="camera id ([[cameras]] id)")
    rec.add_argument("--article", required=True, metavar="NAME",
                     help="the fabric's article name: letters, digits, '.', '_', '-' (no path characters)")
    size = rec.add_mutually_exclusive_group()
    size.add_argument("--frames", type=int, metavar="N", help="at least N frames (and min_revolutions)")
    size.add_argument("--minutes", type=float, metavar="M", help="at least M minutes (and min_revolutions)")
    rec.add_argument("--out", type=Path, metavar="DIR", help="recording folder (new or empty)")
    how = rec.add_mutually_exclusive_group()
    how.add_argument("--via-daemon", dest="via", action="store_const", const="daemon",
                     help="record through the running daemon (default when its API answers)")
    how.add_argument("--direct", dest="via", action="store_const", const="direct",
                     help="record directly from the camera (default when no daemon answers)")
    rec.add_argument("--fast", action="store_true",
                     help="direct, from a file/folder/simulator camera: do not pace frames at the camera's fps")
    rec.add_argument("--position-timeout", type=float, default=120.0, metavar="S",
                     help="direct: give up when no frame has a fabric position after S seconds (default 120)")
    rec.add_argument("--revolution-timeout", type=float, default=600.0, metavar="S",
                     help="direct: give up when no new revolution has begun for S seconds (default 600)")
    rec.add_argument("--timeout", type=float, default=None, metavar="S",
                     help="via the daemon: give up after S seconds (default: --minutes + 6 h)")
    rec.add_argument("--pickup-timeout", type=float, default=30.0, metavar="S",
                     help="via the daemon: give up when it has not started recording after S seconds (default 30)")
    rec.add_argument("--json", action="store_true", help="print the result as JSON")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.set_defaults(func=cmd_record)

    tr = group.add_parser(
        "train", help="train, validate and install a model for an article from its recording",
        description="Train a model on the newest recording of an article (or --recording DIR) in a separate "
        "process at low priority ([learn] train_nice, train_threads), on the GPU when the host has one. The "
        "kind ([learn] model, --model): auto = msflow-efficientnet-lite0 on a CPU host (better than EfficientAD "
        "at CPU training budgets and 3-4x faster under ONNX Runtime), efficientad-s on a GPU host. The last "
        "[learn] validation_revolutions whole revolutions are held back and run through the new model and the "
        "decision layer: a model whose estimated false stops per hour exceed [learn] max_false_stops_per_hour is "
        "refused and not installed (exit code 3); otherwise it becomes the article's next version in the model "
        "library. On a simulator camera the recall of one scheduled defect of every kind is measured too. "
        "Exit codes: 0 installed, 3 refused, 2 bad input (article name, unknown camera, no recording, too few "
        "revolutions, no fabric texture, full disk), 1 other failures.")
    add_config_option(tr)
    tr.add_argument("--article", required=True, metavar="NAME", help="the article to train")
    tr.add_argument("--recording", type=Path, metavar="DIR", help="recording folder (default: the article's newest)")
    tr.add_argument("--model", choices=["auto", *trainable_kinds()], default=None,
                    help="model kind (default: [learn] model)")
    tr.add_argument("--steps", type=int, default=None, metavar="N",
                    help="training steps (default: 1000 for MSFlow, 5000 for EfficientAD)")
    tr.add_argument("--tile", type=int, default=None, metavar="PX",
                    help="tile size (default: 128 MSFlow, 64 EfficientAD)")
    tr.add_argument("--scale", type=float, default=None, metavar="S",
                    help="fixed resize factor instead of the loop pitch measured on the frames")
    add_device_option(tr)
    tr.add_argument("--use", action="store_true", help="select the new model for --camera right away")
    tr.add_argument("--camera", metavar="ID", help="the camera for --use")
    tr.add_argument("--no-recall", action="store_true", help="skip the recall measurement on a simulator camera")
    tr.add_argument("--json", action="store_true", help="print the result as JSON")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=cmd_train)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m knitwatch.daemon.cli.learn JOB.json (started by 'knitwatch learn train')\n")
        sys.exit(EXIT_USAGE)
    sys.exit(worker(sys.argv[1]))
