-- A session's stream resumed from far back reads its changes through this index.
CREATE INDEX changes_by_session ON changes (session_id, id);
