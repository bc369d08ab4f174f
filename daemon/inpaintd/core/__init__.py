"""Values and rules: config, errors and codes, the data that flows, ROI geometry, colour, quoting.

Pure: no torch, no threads, no writes; reads only a file it is handed (a config file, a file
to hash). May import: the standard library, numpy and yaml. Everything else imports core.
"""
