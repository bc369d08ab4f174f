"""Model folders and weight files on disk, without torch: what a folder holds, its manifest,
safetensors headers. Shared by engine/ (what it loads) and modelprep/ (what it writes).

May import: core.
"""
