-- Alert formats: a subscription may speak Slack or PagerDuty instead of Standard Webhooks.
-- `format`: standard | slack | pagerduty. `routing_key`: PagerDuty's integration key,
-- AES-GCM, bound to the id. `headers`: static headers as JSON [[name, value]], a value
-- may be `env:VAR` (read when sending).
ALTER TABLE subscriptions ADD COLUMN format TEXT NOT NULL DEFAULT 'standard';
ALTER TABLE subscriptions ADD COLUMN routing_key BYTEA;
ALTER TABLE subscriptions ADD COLUMN headers TEXT NOT NULL DEFAULT '[]';

-- What a PagerDuty delivery sends: a JSON list of [event_action, dedup_key], decided when
-- the change was queued (NULL for the other formats).
ALTER TABLE deliveries ADD COLUMN alert_actions TEXT;

-- The incidents a PagerDuty subscription has triggered and not yet resolved, kept by the
-- enqueuer in change-id order (under the lock of the delivery cursor, so across instances
-- too): a recovery resolves only what was triggered.
CREATE TABLE alert_incidents (
    subscription_id  TEXT NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    dedup_key        TEXT NOT NULL,
    change_id        BIGINT NOT NULL,  -- the change that triggered it
    PRIMARY KEY (subscription_id, dedup_key)
);
