-- Outbound webhooks: subscriptions, the durable delivery queue and its attempt log.
-- Several instances share these tables; the rows themselves say what is claimable
-- (a claim locks the subscription's row and takes due deliveries FOR UPDATE SKIP
-- LOCKED), so no instance relies on its own copy of a subscription's state.

CREATE TABLE subscriptions (
    id                  TEXT PRIMARY KEY,
    seq                 BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,  -- listing order
    url                 TEXT NOT NULL,
    description         TEXT NOT NULL DEFAULT '',
    types               TEXT NOT NULL,     -- JSON list of names or globs; [] = all but raw.*
    session_ids         TEXT NOT NULL,     -- JSON list of ids or globs; [] = every session
    ordering            TEXT NOT NULL,     -- none | session
    max_in_flight       INTEGER NOT NULL,
    enabled             BOOLEAN NOT NULL,
    disabled_reason     TEXT,
    secret              BYTEA NOT NULL,    -- AES-GCM, bound to the id
    -- Rotated-out secrets, each signing until its own time: a JSON list of
    -- {"secret": hex of the encrypted secret, "until": unix seconds}.
    previous_secrets    TEXT NOT NULL DEFAULT '[]',
    failing_since       DOUBLE PRECISION,  -- first failed attempt since the last success
    start_after         BIGINT NOT NULL,   -- receives changes with a greater id
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    enabled_changed_at  DOUBLE PRECISION   -- when the API last set `enabled`
);

-- One row per subscription and change (or test event). A row is active while
-- next_attempt_at is set: pending/retrying rows are due then; a delivering row is
-- leased until then to `lease_owner` (an instance), and once that time has passed any
-- instance may claim it again. Session order is read at claim time: a row may go only
-- if no older row of its subscription and session is active.
CREATE TABLE deliveries (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id  TEXT NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    change_id        BIGINT,               -- NULL for a test event
    type             TEXT NOT NULL,
    session_id       TEXT,
    payload          BYTEA,                -- the body of a test event (changes are read from the log)
    status           TEXT NOT NULL,        -- pending | delivering | retrying | delivered | failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    cycle_attempts   INTEGER NOT NULL DEFAULT 0,  -- attempts since it was (re)queued
    next_attempt_at  DOUBLE PRECISION,     -- due time, or the end of the lease
    lease_owner      TEXT,                 -- the instance that holds the lease
    last_status      INTEGER,
    last_error       TEXT,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    UNIQUE (subscription_id, change_id)
);
CREATE INDEX deliveries_due ON deliveries (subscription_id, next_attempt_at, id)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_session_order ON deliveries (subscription_id, session_id, change_id)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_in_flight ON deliveries (subscription_id, next_attempt_at)
    WHERE status = 'delivering';
CREATE INDEX deliveries_by_status ON deliveries (subscription_id, status, id);

CREATE TABLE delivery_attempts (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  BIGINT NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    at           DOUBLE PRECISION NOT NULL,
    status_code  INTEGER,                  -- NULL: no response (network error, timeout, refused)
    latency_ms   DOUBLE PRECISION NOT NULL,
    response     TEXT,                     -- the first 1 KiB of the response body
    error        TEXT
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, id);

-- How far the change log has been turned into delivery rows: one row, locked by the
-- instance that enqueues, so each change is enqueued once across instances.
CREATE TABLE delivery_cursor (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    last_change_id  BIGINT NOT NULL
);
INSERT INTO delivery_cursor (id, last_change_id) SELECT 1, coalesce(max(id), 0) FROM changes;
