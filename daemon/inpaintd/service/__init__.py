"""The daemon: start-up, the worker loop and its per-claim state machine, signals, systemd
notify, journald/structlog logging.

Wires everything below it; only cli imports service. May import: intake, demo, engine (the
Engine, deferred: it imports torch), paint, store, weights, core.
"""
