"""Inbox -> claims: watch the inbox, decide which files form a ready job, claim it.

Every inbox entry is handled inside its own fault boundary. May import: store, paint (images,
to probe for alpha), core.
"""
