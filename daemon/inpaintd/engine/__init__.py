"""The only run-time code that imports torch and diffusers: load a prepared folder, apply the
CPU policies, warm, paint one working-size crop (engine.Engine, a core.jobs.Painter).

May import: store, weights, core. Never modelprep, demo or testing.
"""
