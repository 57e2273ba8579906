-- Session facts: what the state machine knows about each session, kept compact beside
-- its snapshot, so that a writer whose cache has lost a session reads one row (and its
-- turns' rows) instead of replaying the session's events. `version` grows on every
-- write of the row. `facts` is NULL for a session stored before this migration: it is
-- rebuilt once from its events, and its facts are written then. `fired`: the alerts
-- that fired and whose condition still holds, as a JSON list of [type, turn id].
-- WITHOUT ROWID: one B-tree to update per touched session, not a table and its key index.
CREATE TABLE session_facts (
    session_id  TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    facts       BLOB,
    fired       TEXT NOT NULL DEFAULT '[]'
) WITHOUT ROWID;
ALTER TABLE turns ADD COLUMN facts BLOB;
INSERT INTO session_facts (session_id, version, facts, fired)
  SELECT session_id, 1, NULL, json_group_array(json_array(kind, turn_id))
  FROM alerts WHERE fired_at IS NOT NULL GROUP BY session_id;
-- Alert rows now hold only alerts that can still fire (a fired one is remembered in its
-- session's facts), keyed by session first: each is deleted by its key.
CREATE TABLE alerts_pending (
    session_id  TEXT NOT NULL,
    turn_id     TEXT NOT NULL DEFAULT '',
    kind        TEXT NOT NULL,
    due_at      REAL NOT NULL,
    PRIMARY KEY (session_id, turn_id, kind)
) WITHOUT ROWID;
INSERT INTO alerts_pending (session_id, turn_id, kind, due_at)
  SELECT session_id, turn_id, kind, due_at FROM alerts WHERE fired_at IS NULL;
DROP TABLE alerts;
ALTER TABLE alerts_pending RENAME TO alerts;
CREATE INDEX alerts_due ON alerts (due_at);
-- Sessions with events before this seq may have no facts row yet (they are rebuilt once
-- from their events); a session first seen from it on has one from its first state.
INSERT INTO store_facts (name, value)
  SELECT 'session_facts_from_seq', coalesce(max(seq), 0) + 1 FROM events
