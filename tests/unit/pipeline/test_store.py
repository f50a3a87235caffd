"""The defect store on real SQLite files and a real file system: events and their files, queries,
acknowledges, start-up repair after SIGKILL mid-write, retention, and a full disk."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from knitwatch.config.settings import StoreConfig
from knitwatch.pipeline.store import database
from knitwatch.pipeline.store.database import FILE_KINDS, RECORD_FILE, Store, StoreError

DAY_NS = 86_400 * 10**9


def images(seed: int = 0, shape: tuple[int, int] = (48, 64)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 255, shape, dtype=np.uint8)
    mask = np.zeros(shape, np.uint8)
    mask[5:15, 5:15] = 255
    color = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    return {"frame": frame, "overlay": color, "mask": mask, "thumb": color[::2, ::2].copy()}


def add(store: Store, *, camera: str = "c", t_wall_ns: int | None = None, action: str = "stop",
        severity: str = "major", seq: int = 0, files: bool = True, seed: int = 0) -> int:
    t = time.time_ns() if t_wall_ns is None else t_wall_ns
    rec = {"camera": camera, "seq": seq, "severity": severity, "action": action}
    eid = store.add_event(rec, camera=camera, t_wall_ns=t, seq=seq, severity=severity, action=action,
                          image_score=1.5, max_area_px=100)
    if files:
        assert store.write_files(eid, images(seed))
    return eid


def test_event_files_queries_and_path_safety(tmp_path: Path) -> None:
    store = Store.from_config(StoreConfig(path=tmp_path / "s", fsync=False))
    t0 = 1_700_000_000 * 10**9
    ids = [add(store, camera="a" if i % 2 else "b", t_wall_ns=t0 + i * 10**9, seq=i,
               action="stop" if i < 3 else "alarm", severity="major" if i < 3 else "minor", seed=i) for i in range(6)]
    ev = store.get_event(ids[0])
    assert ev is not None and ev["state"] == "complete" and all(ev["files"].values())
    assert ev["record"]["event_id"] == ids[0] and ev["time"].startswith("2023-11-14T22:13:20")
    folder = Path(ev["record"]["event_dir"])
    assert json.loads((folder / RECORD_FILE).read_text())["event_id"] == ids[0]
    frame = cv2.imread(str(store.file_path(ids[0], "frame")), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(frame, images(0)["frame"])  # lossless
    assert store.get_event(str(ids[1]))["camera"] == "a"

    page = store.list_events(limit=4)
    assert page["total"] == 6 and [e["id"] for e in page["items"]] == ids[::-1][:4]
    assert [e["id"] for e in store.list_events(limit=4, offset=4)["items"]] == ids[1::-1]
    assert {e["id"] for e in store.list_events(camera="a")["items"]} == {ids[1], ids[3], ids[5]}
    assert store.list_events(since_ns=t0 + 2 * 10**9, until_ns=t0 + 4 * 10**9)["total"] == 2
    assert store.list_events(severity="minor")["total"] == 3

    assert store.set_keep(ids[2]) and store.list_events(keep=True)["items"][0]["id"] == ids[2]
    assert store.mark_false_positive(ids[3], by="anna", note="cutline")
    fp = store.get_event(ids[3])
    assert fp["false_positive"] and fp["fp_by"] == "anna" and fp["fp_note"] == "cutline"
    assert store.list_events(false_positive=False)["total"] == 5
    assert not store.set_keep(999) and store.get_event(999) is None and store.file_path(999, "frame") is None

    for bad in ("../1", "1/../../etc/passwd", "-1", "0", "1e3", " 1", True, 1.0, None, "１"):
        with pytest.raises(ValueError):
            store.file_path(bad, "frame")
    for bad_kind in ("../events.sqlite3", "record", "frame.png", ""):
        with pytest.raises(ValueError):
            store.file_path(ids[0], bad_kind)
    for kind in FILE_KINDS:
        p = store.file_path(ids[0], kind)
        assert p is not None and p.is_relative_to((tmp_path / "s").resolve())

    stats = store.stats()
    assert stats["events"] == 6 and stats["bytes"] == store.total_bytes() > 0 and stats["errors"] == {}
    store.close()


def test_acknowledges_cover_events_up_to_the_request(tmp_path: Path) -> None:
    store = Store.from_config(StoreConfig(path=tmp_path, fsync=False))
    a1 = add(store, camera="a", files=False)
    b1 = add(store, camera="b", files=False)
    add(store, camera="b", action="log", files=False)
    assert store.latched() == {"stop": ["a", "b"], "alarm": []}
    ack_a = store.request_ack("anna", camera="a", note="hole mended")
    a2 = add(store, camera="a", files=False)  # after the request: not covered
    assert [a["id"] for a in store.pending_acks()] == [ack_a]
    covered = store.apply_ack(ack_a)
    assert [e["id"] for e in covered] == [a1]
    assert store.apply_ack(ack_a) == []  # handled once
    assert {e["id"] for e in store.latched_events()} == {b1, a2}
    ack_all = store.request_ack("", note="")
    assert {e["id"] for e in store.apply_ack(ack_all)} >= {b1, a2}
    assert store.latched() == {"stop": [], "alarm": []}
    store.ack_cleared(ack_all, {"confirmed": True})
    got = store.get_ack(ack_all)
    assert got["by"] == "unknown" and got["handled"] and got["cleared"] and json.loads(got["result"])["confirmed"]
    assert store.get_event(a1)["ack_id"] == ack_a and store.list_events(acknowledged=False)["total"] == 0
    assert [a["id"] for a in store.list_acks()] == [ack_all, ack_a]


def test_recover_cleans_leftovers_and_flags_missing_files(tmp_path: Path) -> None:
    store = Store.from_config(StoreConfig(path=tmp_path, fsync=False))
    ok = add(store)
    broken = add(store, seed=1)
    half = add(store, files=False)  # row committed, no files (killed before writing)
    store.file_path(broken, "overlay").unlink()
    folder = Path(store.get_event(ok)["record"]["event_dir"])
    (folder / ".frame.png.123.tmp").write_bytes(b"half")
    gone = add(store, seed=2)  # retention deleted its row, then the process died before the folder went
    orphan = Path(store.get_event(gone)["record"]["event_dir"])
    store.close()
    db = sqlite3.connect(tmp_path / "events.sqlite3")
    db.execute("DELETE FROM events WHERE id = ?", (gone,))
    db.commit()
    db.close()
    foreign = tmp_path / "events" / "2020-01-01" / "00000099"  # an id this index never gave: not its orphan
    foreign.mkdir(parents=True)
    (foreign / "frame.png").write_bytes(b"x")

    store = Store.from_config(StoreConfig(path=tmp_path, fsync=False))
    report = store.recover()
    assert report == {"temp_files_removed": 1, "orphan_folders_removed": 1, "rows_flagged_files_missing": 2,
                      "unindexed_folders_kept": 1}
    assert not orphan.exists() and not (folder / ".frame.png.123.tmp").exists()
    assert (foreign / "frame.png").exists()
    assert store.get_event(ok)["state"] == "complete"
    assert store.get_event(broken)["state"] == "files_missing" and store.file_path(broken, "overlay") is None
    assert store.get_event(half)["state"] == "files_missing"
    assert store.recover() == {"unindexed_folders_kept": 1}
    assert add(store) == 100  # new ids start above the kept folder


WRITER = textwrap.dedent("""
    import sys, time
    import cv2, numpy as np
    from knitwatch.config.settings import StoreConfig
    from knitwatch.pipeline.store.database import Store
    store = Store.from_config(StoreConfig(path=sys.argv[1]))
    rng = np.random.default_rng(int(sys.argv[2]))
    frame = rng.integers(0, 255, (900, 1200), dtype=np.uint8)
    color = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    mask = (frame > 128).astype(np.uint8) * 255
    print("ready", flush=True)
    i = 0
    while True:
        eid = store.add_event({"seq": i}, camera="c", t_wall_ns=time.time_ns(), seq=i, severity="major",
                              action="stop", image_score=1.0, max_area_px=10)
        store.write_files(eid, {"frame": frame, "overlay": color, "mask": mask, "thumb": color[::4, ::4]})
        i += 1
""")


def check_consistent(root: Path) -> dict[str, int]:
    store = Store.from_config(StoreConfig(path=root))
    report = store.recover()
    events_dir = root / "events"
    leftovers = [p for p in events_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    rows = store.list_events(limit=500)["items"]
    folders = {p.relative_to(events_dir).as_posix() for p in events_dir.glob("*/*")}
    for ev in rows:
        full = store.get_event(ev["id"])
        assert full["state"] in ("complete", "files_missing"), full["state"]
        if full["state"] == "complete":
            for kind in FILE_KINDS:
                path = store.file_path(ev["id"], kind)
                assert path is not None and cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is not None, (ev["id"], kind)
            on_disk = json.loads((Path(full["record"]["event_dir"]) / RECORD_FILE).read_text())
            assert on_disk["event_id"] == ev["id"]
        folders.discard(Path(full["record"]["event_dir"]).relative_to(events_dir).as_posix())
    assert folders == set(), f"folders without a row: {folders}"
    store.close()
    return report


def test_sigkill_mid_write_leaves_no_half_event(tmp_path: Path) -> None:
    """A process writing events is killed with SIGKILL at random moments; after each restart every
    event is whole (all files decodable, record on disk) or flagged files_missing, and nothing half
    written is left."""
    root = tmp_path / "store"
    rng = np.random.default_rng(7)
    repaired = 0
    for i in range(5):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(i)], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "ready"
            time.sleep(float(rng.uniform(0.15, 0.6)))
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
        report = check_consistent(root)
        repaired += sum(report.values())
    assert repaired >= 1, "no kill landed mid-write: the test did not test anything"
    assert Store.from_config(StoreConfig(path=root)).list_events()["total"] >= 5


def test_retention_deletes_oldest_first_and_keeps_marked(tmp_path: Path) -> None:
    store = Store.from_config(StoreConfig(path=tmp_path, fsync=False, retention_days=10))
    now = time.time_ns()
    ids = [add(store, t_wall_ns=now - (9 - i) * DAY_NS // 10, action="alarm", seed=i) for i in range(10)]
    store.apply_ack(store.request_ack("t"))  # all acknowledged: deletable
    kept = ids[0]
    assert store.set_keep(kept)
    unacked = add(store, t_wall_ns=now - DAY_NS // 2, action="stop", seed=20)  # a latched stop: never deleted
    sizes = {e["id"]: e["bytes"] for e in store.list_events(limit=100)["items"]}
    assert all(b > 0 for b in sizes.values())
    store.max_bytes = sum(sizes.values()) - sizes[ids[1]] - sizes[ids[2]] // 2  # room for all but ~2 events
    result = store.enforce_retention(now_ns=now)
    left = {e["id"] for e in store.list_events(limit=100)["items"]}
    assert result["deleted"] == 2 and left == set(ids) - {ids[1], ids[2]} | {unacked}
    assert store.total_bytes() <= store.max_bytes
    assert not any(p.name.endswith(f"{ids[1]:08d}") for p in (tmp_path / "events").glob("*/*"))

    # age: 20 days later everything past 10 days goes, except the kept event and the latched stop
    result = store.enforce_retention(now_ns=now + 20 * DAY_NS)
    assert {e["id"] for e in store.list_events(limit=100)["items"]} == {kept, unacked}
    assert store.file_path(kept, "frame") is not None
    assert store.recover() == {}


FULL_DISK = textwrap.dedent("""
    import json, resource, signal, sys, time
    import numpy as np
    from knitwatch.config.settings import StoreConfig
    from knitwatch.pipeline.store.database import Store
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))
    store = Store.from_config(StoreConfig(path=sys.argv[1]))
    big = np.random.default_rng(0).integers(0, 255, (900, 900), dtype=np.uint8)
    small = np.zeros((16, 16), np.uint8)
    def event(img):
        eid = store.add_event({}, camera="c", t_wall_ns=time.time_ns(), seq=0, severity="s", action="stop",
                              image_score=1.0, max_area_px=1)
        return eid, store.write_files(eid, {"frame": img, "overlay": img, "mask": img, "thumb": img})
    big_id, big_ok = event(big)
    small_id, small_ok = event(small)
    print(json.dumps({"big": [big_id, big_ok], "small": [small_id, small_ok], "errors": store.errors,
                      "last_error": store.last_error}))
""")


def test_full_disk_is_reported_and_inspection_goes_on(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["big"][1] is False and out["small"][1] is True
    assert out["errors"] == {"write": 1} and "File too large" in out["last_error"]
    assert "cannot write the event's files" in r.stdout + r.stderr  # logged (structlog's default: stdout)
    store = Store.from_config(StoreConfig(path=tmp_path))
    assert store.get_event(out["big"][0])["state"] == "files_missing"
    assert store.get_event(out["small"][0])["state"] == "complete"
    assert list((tmp_path / "events").rglob("*.tmp")) == []


# ---------------------------------------------------------------------- an unusable index


def test_a_corrupt_index_degrades_the_store_until_it_is_replaced(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "REOPEN_EVERY_S", 0.0)
    cfg = StoreConfig(path=tmp_path, fsync=False)
    store = Store.from_config(cfg)
    old = add(store)
    store.close()
    index = tmp_path / "events.sqlite3"
    index.write_bytes(b"not a database at all\n" * 300)
    for side in ("-wal", "-shm"):
        Path(f"{index}{side}").unlink(missing_ok=True)
    with pytest.raises(StoreError, match="not a database"):
        Store.from_config(cfg)
    store = Store.from_config(cfg, degraded_ok=True)
    assert not store.usable and "not a database" in store.problem and str(tmp_path) not in store.problem
    with pytest.raises(StoreError):
        add(store, files=False)
    assert not store.write_files(1, images())  # never raises: the caller goes on
    assert store.enforce_retention() == {"deleted": 0, "freed_bytes": 0}
    assert store.stats()["events"] == -1 and not store.stats()["usable"]
    assert not store.check()
    index.rename(tmp_path / "events.sqlite3.broken")  # the operator moves it aside: a new index starts
    assert store.check() and store.usable and store.problem == ""
    new = add(store)
    assert new > old  # the new index never gives an id of the lost one's pictures
    assert store.recover() == {"unindexed_folders_kept": 1}  # and never deletes them as orphans
    (kept,) = (tmp_path / "events").glob(f"*/{old:08d}")
    assert (kept / "frame.png").is_file()


def test_an_index_removed_while_open_is_not_written_blindly(tmp_path: Path) -> None:
    cfg = StoreConfig(path=tmp_path, fsync=False)
    store = Store.from_config(cfg)
    first = add(store)
    for name in ("events.sqlite3", "events.sqlite3-wal", "events.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    store.raise_id_floor(41)  # the latch holds id 41 of the lost index
    second = add(store)  # noticed: a new index takes it (the removed file would have swallowed it)
    assert store.errors["index_lost"] == 1 and second == 42 > first
    other = Store.from_config(cfg, create=False)
    assert other.get_event(second) is not None and other.get_event(first) is None


def test_acknowledges_applied_without_the_index_are_recorded_later(tmp_path: Path) -> None:
    store = Store.from_config(StoreConfig(path=tmp_path, fsync=False))
    a, b, c = (add(store, files=False, seq=i) for i in range(3))
    ack_id = store.record_ack(by="anna", camera=None, note="via the mailbox", requested_ns=time.time_ns(),
                              event_ids=[a, b, -3, 999], result={"confirmed": True})
    ack = store.get_ack(ack_id)
    assert ack["events_acked"] == 2 and ack["handled"] and ack["cleared"] and ack["by"] == "anna"
    assert store.acknowledged_ids([a, b, c]) == {a, b}
    assert [e["id"] for e in store.latched_events()] == [c]
    assert store.release_unconfirmed() is None  # a stop is still latched in the index
    store.mark_acked([c], ack_id)
    assert store.latched_events() == []
    pending = store.request_ack("bob")
    store.apply_ack(pending)
    assert store.release_unconfirmed()["id"] == pending  # applied, its reset never confirmed
    store.ack_cleared(pending, {"confirmed": True})
    assert store.release_unconfirmed() is None
