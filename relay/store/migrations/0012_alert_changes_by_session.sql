-- A session's stream resumed from far back reads the session's changes through its
-- events (`events_by_session`, then `changes_by_event`); the changes no event caused
-- (alerts) are found here. They are few, so this index costs ingest nothing.
CREATE INDEX alert_changes_by_session ON changes (session_id, id) WHERE event_seq IS NULL;
