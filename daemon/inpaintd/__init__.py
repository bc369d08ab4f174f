"""inpaintd: ROI-sliced Stable Diffusion inpainting for CPU-only edge devices.

Importing the package forces the Hugging Face libraries offline, before any module can import
diffusers or transformers: no network access is ever tried (there is no model hub on a
device). This is the package's one import-time side effect.

The sub-packages, each with one job (its ``__init__`` says what it may import; the contracts in
pyproject.toml enforce it):

    cli                          the `inpaintd` command
    service                      the daemon: start-up, the worker loop, signals, systemd, logging
    intake | demo                inbox -> claims | `inpaintd demo` and the embedded tiny model
    engine | modelprep | paint   torch at run time | prepare-model and check | one job in memory
    store                        durable state: atomic writes, claims, outbox, records, fleet, status
    weights                      model folders and safetensors headers, without torch
    core                         values and rules: config, errors and codes, job data, region maths
    testing                      random models and files for tests and benchmarks (nothing imports it)
"""

import os

__version__ = "0.1.0"

_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
}
os.environ.update(_OFFLINE_ENV)
# Importing the pipeline makes transformers warn that image processors we never use want
# torchvision; on a device that is noise in every start-up log. Errors still come through,
# and an operator can set TRANSFORMERS_VERBOSITY=warning to see everything.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
