-- When `enabled` was last set through the API (unix seconds; NULL: never). A 410 decided
-- before it no longer disables the subscription when its result is written late; an
-- edit of anything else (description, url, a secret rotation) does not count.
ALTER TABLE subscriptions ADD COLUMN enabled_changed_at REAL;
