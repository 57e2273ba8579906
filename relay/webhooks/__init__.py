"""Outbound webhooks: signed, retried, durable deliveries of changes to subscribers."""
