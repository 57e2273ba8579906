-- Pages of sessions filtered by readiness and turn status (or not filtered: every pair
-- of them) read each pair's sessions from here in activity order, so that a page costs
-- the same however many sessions there are and however few of them match.
CREATE INDEX sessions_by_status ON sessions (readiness, turn_status, activity_seq, session_id);

-- A session's stream resumed from far back reads the changes of the session's events
-- through `events_by_session` and `changes_by_event` (a change's id grows with the seq of
-- the event that caused it); the changes no event caused (alerts, few) are found here.
-- `changes_by_session` held an entry per change, about a tenth of the store.
CREATE INDEX alert_changes_by_session ON changes (session_id, id) WHERE event_seq IS NULL;
DROP INDEX changes_by_session;

-- Session and turn snapshots are now written packed (`relay.packed_bodies`, as change
-- bodies are); snapshots stored as JSON before are read as they are, and packed when
-- their row is next written.
