-- Facts about how the stored history was written, for `relay check-state`.
-- `provisioning_steps_from_seq`: events from this seq on were logged with a
-- `session.provisioning` change for each step of a session that is not yet ready;
-- before it, only a ready session becoming provisioning was.
CREATE TABLE store_facts (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO store_facts (name, value)
  SELECT 'provisioning_steps_from_seq', coalesce(max(seq), 0) + 1 FROM events;
