"""`inpaintd prepare-model` and `inpaintd check`: turn what a user downloaded (diffusers folders,
single files, merges, LoRAs, VAEs, embeddings, a draft decoder) into a prepared folder, offline.

prepare.py is the top of this package: no module imports it back. May import: store, weights,
core. Torch is imported inside the functions that need it.
"""
