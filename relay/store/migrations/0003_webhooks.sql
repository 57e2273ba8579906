-- Outbound webhooks: subscriptions, the durable delivery queue and its attempt log.
CREATE TABLE subscriptions (
    id                     TEXT PRIMARY KEY,
    url                    TEXT NOT NULL,
    description            TEXT NOT NULL DEFAULT '',
    types                  TEXT NOT NULL,     -- JSON list of names or globs; [] = all but raw.*
    session_ids            TEXT NOT NULL,     -- JSON list of ids or globs; [] = every session
    ordering               TEXT NOT NULL,     -- none | session
    max_in_flight          INTEGER NOT NULL,
    enabled                INTEGER NOT NULL,
    disabled_reason        TEXT,
    secret                 BLOB NOT NULL,     -- AES-GCM, bound to the id
    previous_secret        BLOB,              -- still signs until previous_secret_until
    previous_secret_until  REAL,
    failing_since          REAL,              -- first failed attempt since the last success
    start_after            INTEGER NOT NULL,  -- receives changes with a greater id
    created_at             TEXT NOT NULL,
    updated_at             TEXT NOT NULL
);

-- One row per subscription and change (or test event). A row is active while
-- next_attempt_at is set: pending/retrying rows are due then, delivering rows are
-- claimed until then (a lease).
CREATE TABLE deliveries (
    id               INTEGER PRIMARY KEY,
    subscription_id  TEXT NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    change_id        INTEGER,              -- NULL for a test event
    type             TEXT NOT NULL,
    session_id       TEXT,
    payload          BLOB,                 -- the body of a test event (changes are read from the log)
    status           TEXT NOT NULL,        -- pending | delivering | retrying | delivered | failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    cycle_attempts   INTEGER NOT NULL DEFAULT 0,  -- attempts since it was (re)queued
    next_attempt_at  REAL,
    last_status      INTEGER,
    last_error       TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    UNIQUE (subscription_id, change_id)
);
CREATE INDEX deliveries_due ON deliveries (subscription_id, next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_session_order ON deliveries (subscription_id, session_id, change_id)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_by_status ON deliveries (subscription_id, status, id);

CREATE TABLE delivery_attempts (
    id           INTEGER PRIMARY KEY,
    delivery_id  INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    at           REAL NOT NULL,
    status_code  INTEGER,                  -- NULL: no response (network error, timeout, refused)
    latency_ms   REAL NOT NULL,
    response     TEXT,                     -- the first 1 KiB of the response body
    error        TEXT
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, id);

-- How far the change log has been turned into delivery rows.
CREATE TABLE delivery_cursor (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    last_change_id  INTEGER NOT NULL
);
INSERT INTO delivery_cursor (id, last_change_id) SELECT 1, coalesce(max(id), 0) FROM changes;
