"""`inpaintd demo` and the embedded tiny random model an unconfigured daemon paints with.

May import: modelprep, engine.host, weights, core.
"""
