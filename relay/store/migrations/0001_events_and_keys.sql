-- Raw events exactly as received (after verification), deduplicated per source.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    source       TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    type         TEXT NOT NULL,
    session_id   TEXT,
    turn_id      TEXT,
    occurred_at  TEXT NOT NULL,
    received_at  TEXT NOT NULL,
    payload      BLOB NOT NULL,
    UNIQUE (source, event_id)
);
CREATE INDEX events_by_session ON events (session_id, seq) WHERE session_id IS NOT NULL;

-- API keys: only a SHA-256 of the key is kept.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
