-- Derived state: one row per session and per turn, holding the current snapshot.
CREATE TABLE sessions (
    session_id    TEXT PRIMARY KEY,
    version       INTEGER NOT NULL,
    readiness     TEXT NOT NULL,
    turn_status   TEXT NOT NULL,
    activity_seq  INTEGER NOT NULL,   -- seq of the newest event applied to the session
    snapshot      BLOB NOT NULL       -- SessionState as JSON
);
CREATE INDEX sessions_by_activity ON sessions (activity_seq);

CREATE TABLE turns (
    session_id  TEXT NOT NULL,
    turn_id     TEXT NOT NULL,
    status      TEXT NOT NULL,
    version     INTEGER NOT NULL,
    snapshot    BLOB NOT NULL,
    PRIMARY KEY (session_id, turn_id)
);

-- The change log: the unit of fan-out. `body` is the change as sent to subscribers.
CREATE TABLE changes (
    id          INTEGER PRIMARY KEY,
    type        TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    turn_id     TEXT,
    event_seq   INTEGER,              -- the event that caused it (NULL for alerts)
    body        BLOB NOT NULL
);
CREATE INDEX changes_by_session ON changes (session_id, id);
CREATE INDEX changes_by_event ON changes (event_seq);

-- Alert deadlines (unix seconds, relay clock); `fired_at` set once the alert is sent.
CREATE TABLE alerts (
    kind        TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    turn_id     TEXT NOT NULL DEFAULT '',
    due_at      REAL NOT NULL,
    fired_at    REAL,
    PRIMARY KEY (kind, session_id, turn_id)
);
CREATE INDEX alerts_due ON alerts (due_at) WHERE fired_at IS NULL;
