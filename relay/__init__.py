"""relay: a webhook and event-ingestion relay for AI-agent platforms."""

__version__ = "0.1.0"
