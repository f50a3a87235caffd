-- An event index written by knitwatch's store at schema 1 (before rolls): 3 events of cam0, one acknowledge.
-- Made by pipeline/store/database.py of commit 082314b, dumped with sqlite3's iterdump (tests/unit/pipeline/test_rolls.py).
BEGIN TRANSACTION;
CREATE TABLE acks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    requested_ns INTEGER NOT NULL,
    ack_by TEXT NOT NULL,
    camera TEXT,
    note TEXT NOT NULL DEFAULT '',
    max_event_id INTEGER NOT NULL,
    handled_ns INTEGER,
    handled_pid INTEGER,
    events_acked INTEGER,
    cleared_ns INTEGER,
    result TEXT
);
INSERT INTO "acks" VALUES(1,1796393720290042028,'op',NULL,'',3,1796393720290235115,13879,3,NULL,NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    camera TEXT NOT NULL,
    t_wall_ns INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    severity TEXT NOT NULL,
    action TEXT NOT NULL,
    image_score REAL NOT NULL,
    max_area_px INTEGER NOT NULL,
    state TEXT NOT NULL,
    dir TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    keep INTEGER NOT NULL DEFAULT 0,
    false_positive INTEGER NOT NULL DEFAULT 0,
    fp_by TEXT, fp_note TEXT, fp_ns INTEGER,
    action_state TEXT NOT NULL,
    ack_id INTEGER, acked_ns INTEGER,
    created_ns INTEGER NOT NULL,
    record TEXT NOT NULL
);
INSERT INTO "events" VALUES(1,'cam0',1780000000000000000,10,'major','stop',1.5,300,'complete','2026-05-28/00000001',1814,0,0,NULL,NULL,NULL,'pending',1,1796393720290235115,1796393720280555380,'{"camera": "cam0", "seq": 10, "severity": "major", "action": "stop", "image_score": 1.5, "regions": [{"bbox": [10, 10, 40, 30], "area": 300, "peak": 2.0}], "track": {"id": 1, "first_seq": 10, "last_seq": 12, "tube_x": 0.0, "tube_width": 30.0, "revolution": 5}, "event_id": 1, "event_dir": "/tmp/kwB/v1/events/2026-05-28/00000001"}');
INSERT INTO "events" VALUES(2,'cam0',1780000060000000000,11,'minor','alarm',2.5,300,'complete','2026-05-28/00000002',1817,0,0,NULL,NULL,NULL,'pending',1,1796393720290235115,1796393720283259819,'{"camera": "cam0", "seq": 11, "severity": "minor", "action": "alarm", "image_score": 2.5, "regions": [{"bbox": [10, 10, 60, 30], "area": 300, "peak": 2.0}], "track": {"id": 2, "first_seq": 11, "last_seq": 13, "tube_x": 100.0, "tube_width": 30.0, "revolution": 6}, "event_id": 2, "event_dir": "/tmp/kwB/v1/events/2026-05-28/00000002"}');
INSERT INTO "events" VALUES(3,'cam0',1780000120000000000,12,'major','stop',3.5,300,'complete','2026-05-28/00000003',1816,0,0,NULL,NULL,NULL,'pending',1,1796393720290235115,1796393720288714906,'{"camera": "cam0", "seq": 12, "severity": "major", "action": "stop", "image_score": 3.5, "regions": [{"bbox": [10, 10, 80, 30], "area": 300, "peak": 2.0}], "track": {"id": 3, "first_seq": 12, "last_seq": 14, "tube_x": 200.0, "tube_width": 30.0, "revolution": 7}, "event_id": 3, "event_dir": "/tmp/kwB/v1/events/2026-05-28/00000003"}');
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema','1');
CREATE INDEX events_time ON events (t_wall_ns);
CREATE INDEX events_camera_time ON events (camera, t_wall_ns);
CREATE INDEX events_unacked ON events (acked_ns, action);
CREATE INDEX acks_pending ON acks (handled_ns);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('events',3);
INSERT INTO "sqlite_sequence" VALUES('acks',1);
COMMIT;
