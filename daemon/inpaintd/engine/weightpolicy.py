"""Which form the loaded weights take on this machine: a pure choice over plain facts, no torch.

A prepared folder holds one dtype (fp16 from `prepare-model --dtype auto` for the usual fp16
checkpoints; bf16 or fp32 from older or fixed `--dtype` runs) and may be copied to any CPU.
The engine computes in bf16 where the CPU has native bf16 (host.bf16_in_use), else in fp32,
and `choose_weight_policy` says how the folder's weights meet that compute dtype:

- ``files``: the folder's tensors as they are. Mapped without a copy when they already hold
  the compute dtype; otherwise (only with ``model.weights: files``) diffusers converts every
  tensor at load into anonymous memory, as before issue 21.
- ``cache``: converted once, one tensor at a time, into a file in ``model.cache_dir/layout``
  (channels_last.apply_derived, the same cache as the channels-last conv weights) and mapped
  from there. What bf16 CPUs get from an fp16 or fp32 folder.
- ``upcast``: the 16-bit files mapped as they are and each layer's weight converted to fp32
  when it runs (upcast.py). What CPUs without bf16 get from a 16-bit folder. Measured on a
  simulated N100 (BENCHMARKS.md section 11): no slower per step than the fp32 cache or the int8
  UNet within the noise of 2 shared cores, while it is lossless (unlike int8), needs no second
  copy on disk and reads half the pages of the fp32 cache, which made the fp32 cache the slowest
  of the three under the unit's MemoryMax=3584M.

The weight-only int8 UNet stays a separate, memory-driven choice (``model.unet_int8``,
speedups.apply_memory_policy); it applies on top of any form.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

COMPUTE_DTYPES = ("bf16", "fp32")
SIXTEEN_BIT = ("fp16", "bf16")


class WeightForm(str, enum.Enum):
    FILES = "files"
    CACHE = "cache"
    UPCAST = "upcast"


@dataclass(frozen=True)
class WeightPolicy:
    compute: str  # the dtype every layer computes in: bf16 | fp32
    load: str  # the dtype the pipeline is loaded in: the folder's own where it can be mapped
    form: WeightForm
    reason: str


def choose_weight_policy(*, bf16: bool, dtype_setting: str, weights_setting: str, folder_dtype: str,
                         mappable: bool = True) -> WeightPolicy:
    """The weight policy for a folder holding `folder_dtype` on a CPU with (`bf16`) or without native bf16.

    dtype_setting is model.dtype (auto|bf16|fp32), weights_setting model.weights
    (auto|files|cache|upcast); `mappable` is False for pickle folders (loaded by diffusers only).
    """
    if dtype_setting == "auto":
        compute = "bf16" if bf16 else "fp32"
    elif dtype_setting in COMPUTE_DTYPES:
        compute = dtype_setting
    else:
        raise ValueError(f"model.dtype must be auto, bf16 or fp32, got {dtype_setting!r}")
    if folder_dtype == compute:
        return WeightPolicy(compute, compute, WeightForm.FILES, f"the folder holds {compute}: mapped as it is")
    if not mappable or folder_dtype not in SIXTEEN_BIT + ("fp32",):
        return WeightPolicy(compute, compute, WeightForm.FILES, f"{folder_dtype} weights converted at load")
    if weights_setting == "files":
        return WeightPolicy(compute, compute, WeightForm.FILES,
                            f"model.weights: files: {folder_dtype} converted to {compute} at load (anonymous memory)")
    can_upcast = compute == "fp32" and folder_dtype in SIXTEEN_BIT
    if weights_setting == "upcast" and can_upcast:
        return WeightPolicy(compute, folder_dtype, WeightForm.UPCAST, f"model.weights: upcast: {folder_dtype} -> fp32 per layer")
    if weights_setting == "cache" or compute == "bf16" or not can_upcast:
        why = "model.weights: cache" if weights_setting == "cache" else f"{compute} compute"
        return WeightPolicy(compute, folder_dtype, WeightForm.CACHE, f"{why}: {folder_dtype} converted once into cache_dir")
    return WeightPolicy(compute, folder_dtype, WeightForm.UPCAST,
                        f"no native bf16: {folder_dtype} weights mapped, upcast to fp32 per layer")
