-- Follows of upstream session streams: where each stands (the last SSE id stored) and
-- which instance runs it (a lease, renewed while it runs; an expired lease is free).
CREATE TABLE follows (
    source TEXT NOT NULL,
    session_id TEXT NOT NULL,
    position TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reconnects INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (source, session_id)
);
CREATE INDEX follows_claimable ON follows (state, lease_until)
