"""Connectors: relay reading a chat platform's streams itself.

Tap (`/v1/tap/{source}/{path}`) stands between a client and the platform and passes the
answer through unchanged while its frames are stored; Follow reads a session's
long-lived stream from a stored position. Both hand frames to `frames.FrameMapper`,
which keeps a stream's provider state between batches.
"""
