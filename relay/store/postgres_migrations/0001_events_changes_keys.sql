-- PostgreSQL schema, first step: raw events, the change log and API keys.
-- Times are kept as RFC 3339 text (as in the embedded store) so both backends hand
-- readers the same bytes; payloads and change bodies are the exact bytes stored.

-- Raw events exactly as received (after verification), deduplicated per source.
-- `seq` is taken from the `counters` row 'event_seq' inside the committing
-- transaction, so seqs become visible in seq order.
CREATE TABLE events (
    seq          BIGINT PRIMARY KEY,
    source       TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    type         TEXT NOT NULL,
    session_id   TEXT,
    turn_id      TEXT,
    occurred_at  TEXT NOT NULL,
    received_at  TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    UNIQUE (source, event_id)
);
CREATE INDEX events_by_session ON events (session_id, seq) WHERE session_id IS NOT NULL;
CREATE INDEX events_by_received_at ON events (received_at);

-- The change log: the unit of fan-out. Ids come from the counters row 'change_id',
-- locked by the committing transaction until it commits, so a reader paging by id
-- never passes an id whose transaction commits later. `body` is empty where readers
-- rebuild the change from the event it references (a raw change).
CREATE TABLE changes (
    id          BIGINT PRIMARY KEY,
    type        TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    turn_id     TEXT,
    event_seq   BIGINT,              -- the event that caused it (NULL for alerts)
    body        BYTEA NOT NULL
);
CREATE INDEX changes_by_event ON changes (event_seq);
CREATE INDEX changes_by_type ON changes (type, id);

-- Counters taken inside committing transactions (row lock until commit).
CREATE TABLE counters (
    name   TEXT PRIMARY KEY,
    value  BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('event_seq', 0), ('change_id', 0);

-- API keys: only a SHA-256 of the key is kept.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
