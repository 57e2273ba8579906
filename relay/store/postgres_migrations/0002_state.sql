-- Derived state: each session's and turn's current snapshot, the facts they are derived
-- from, and the alerts that can still fire.

-- `activity_seq`: seq of the newest event of the session (pages of sessions as of a seq).
CREATE TABLE sessions (
    session_id    TEXT PRIMARY KEY,
    version       INTEGER NOT NULL,
    readiness     TEXT NOT NULL,
    turn_status   TEXT NOT NULL,
    activity_seq  BIGINT NOT NULL,
    snapshot      BYTEA NOT NULL      -- SessionState as JSON
);
CREATE INDEX sessions_by_activity ON sessions (activity_seq, session_id);

-- `position`: the order turns were first seen (a session's turns are written under its
-- facts row's lock, so within a session this is the order of their commits).
-- `facts`: the turn's facts (see relay/store/facts.py), read when a writer loads its session.
CREATE TABLE turns (
    session_id  TEXT NOT NULL,
    turn_id     TEXT NOT NULL,
    position    BIGINT GENERATED ALWAYS AS IDENTITY,
    status      TEXT NOT NULL,
    version     INTEGER NOT NULL,
    snapshot    BYTEA NOT NULL,       -- TurnState as JSON
    facts       BYTEA NOT NULL,
    PRIMARY KEY (session_id, turn_id)
);
CREATE INDEX turns_in_order ON turns (session_id, position);

-- A session's own facts. Every transaction that derives the session's state first
-- inserts or locks this row (in session id order) and bumps `version`: an instance uses
-- its cached copy only while the version it cached is still the row's. `facts` is NULL
-- while the session has no state yet. `fired`: the alerts that fired and whose
-- condition still holds, as a JSON list of [type, turn id].
CREATE TABLE session_facts (
    session_id  TEXT PRIMARY KEY,
    version     BIGINT NOT NULL,
    facts       BYTEA,
    fired       TEXT NOT NULL DEFAULT '[]'
);

-- Alerts that can still fire (relay clock, unix seconds); a row goes, by its key, when
-- its alert fires or its condition ends.
CREATE TABLE alerts (
    session_id  TEXT NOT NULL,
    turn_id     TEXT NOT NULL DEFAULT '',
    kind        TEXT NOT NULL,
    due_at      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (session_id, turn_id, kind)
);
CREATE INDEX alerts_due ON alerts (due_at);
