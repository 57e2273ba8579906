-- Outbound webhooks, second step.

-- Session order. `head` marks the oldest active delivery of its subscription and session
-- (an active test event, which has no session, is always a head). A claim for a
-- session-ordered subscription reads heads only, so a long backlog behind a dead
-- endpoint costs nothing per claim.
ALTER TABLE deliveries ADD COLUMN head INTEGER NOT NULL DEFAULT 0;
UPDATE deliveries SET head = 1
    WHERE next_attempt_at IS NOT NULL AND (session_id IS NULL OR change_id IS NULL
    OR NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.subscription_id = deliveries.subscription_id
        AND e.session_id = deliveries.session_id AND e.change_id < deliveries.change_id
        AND e.next_attempt_at IS NOT NULL));
CREATE INDEX deliveries_heads_due ON deliveries (subscription_id, next_attempt_at)
    WHERE head = 1 AND next_attempt_at IS NOT NULL;

-- `recover` finds the first event received since a time without reading every event.
CREATE INDEX events_by_received_at ON events (received_at);

-- Rotated-out secrets, each signing until its own time: a JSON list of
-- {"secret": hex of the encrypted secret, "until": unix seconds}. Replaces
-- previous_secret and previous_secret_until, which stay unused.
ALTER TABLE subscriptions ADD COLUMN previous_secrets TEXT NOT NULL DEFAULT '[]';
UPDATE subscriptions
    SET previous_secrets = json_array(json_object(
            'secret', hex(previous_secret), 'until', previous_secret_until)),
        previous_secret = NULL, previous_secret_until = NULL
    WHERE previous_secret IS NOT NULL AND previous_secret_until IS NOT NULL;
