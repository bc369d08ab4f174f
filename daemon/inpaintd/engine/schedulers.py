"""The samplers a job can name (config.SCHEDULERS), built from the model's own scheduler config."""

from __future__ import annotations

from typing import Any, Callable

from ..core.config import SCHEDULERS


def make_scheduler(name: str, base_config: Any) -> Any:
    """A diffusers scheduler for one of config.SCHEDULERS, built from the model's config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        PNDMScheduler,
        TCDScheduler,
        UniPCMultistepScheduler,
    )

    builders: dict[str, Callable[[], Any]] = {
        "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        ),
        "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False
        ),
        "euler_a": lambda: EulerAncestralDiscreteScheduler.from_config(base_config),
        "euler": lambda: EulerDiscreteScheduler.from_config(base_config),
        "ddim": lambda: DDIMScheduler.from_config(base_config),
        "unipc": lambda: UniPCMultistepScheduler.from_config(base_config),
        "lcm": lambda: LCMScheduler.from_config(base_config),
        "tcd": lambda: TCDScheduler.from_config(base_config),
        "pndm": lambda: PNDMScheduler.from_config(base_config, skip_prk_steps=True),
    }
    if name not in builders:
        raise ValueError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})")
    return builders[name]()


# TCD's stochasticity ("gamma" in the paper). TCDScheduler.step defaults to it and the TCD
# authors' examples pass it, but the inpainting pipeline's own eta=0.0 overrides the scheduler's
# default; "a value of 0.3 often yields good results" (diffusers' TCD docs).
TCD_ETA = 0.3
