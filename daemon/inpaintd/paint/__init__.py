"""One job in memory: read the inputs, find the regions, have the painter paint each, blend,
encode, build the sidecar. Writes nothing; never imports the engine: it is handed a
core.jobs.Painter.

May import: core.
"""
