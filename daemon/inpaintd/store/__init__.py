"""Durable state on disk: atomic writes and moves, claims in state/, publication to the outbox,
records in failed/ and archive/, status.json, heartbeats and leases on a shared folder.

No images, no torch. May import: core.
"""
