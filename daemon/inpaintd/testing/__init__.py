"""Random-weight models, original-layout single files, LoRAs and VAEs for tests, benchmarks and
scripts. May import anything; nothing in inpaintd imports it.
"""
