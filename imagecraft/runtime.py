"""Where and in what precision ImageCraft runs: the device, the dtype, whether this CPU has native bf16, the memory
layout of UNet_SD's activations, and autocast for training. One rule for inference and training:

- inference, `dtype="auto"`: fp16 on CUDA; on a CPU bf16 where it runs bf16 natively (AMX or AVX-512 bf16), else
  fp32. The VAE always decodes in fp32.
- training, `precision="auto"`: weights in fp32, forward passes in bf16 autocast where the hardware runs bf16
  natively (a CUDA GPU with bf16, a CPU with AMX or AVX-512 bf16), else plain fp32.

Emulated bf16 (a CPU with AVX2 only) is about 5x slower than fp32 at inference and 14x at training, which is why
"auto" never picks it.
"""

from __future__ import annotations

import re
import warnings
from functools import cache

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
PRECISIONS = ("auto", "bf16", "fp32")  # training
HALF = (torch.float16, torch.bfloat16)
SMALL_ATTENTION = 256 * 256  # queries x keys up to which bf16 training on CPU attends without the fused kernel


@cache
def native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 bf16 or AMX); without them bf16 is emulated, slowly.
    Asked once: training asks at every step."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device) -> str:
    """The device to run on: `device` ("cpu", "cuda", "cuda:N", "mps" or a torch.device) once checked to exist
    here, or the detected one for None or "". Checked before loading, so a typo fails in a sentence, not in `.to()`."""
    if device is None or device == "":
        return default_device()
    name = str(device) if isinstance(device, torch.device) else device
    if not isinstance(name, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"device {name!r} needs CUDA, which is not available on this machine; use cpu")
        if int(name.partition(":")[2] or 0) >= count:
            raise ValueError(f"device {name!r} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' needs Apple's Metal (MPS), which is not available on this machine; use cpu")
    return name


def resolve_dtype(dtype, device: str) -> torch.dtype:
    """The UNet's and text encoder's inference dtype. "auto" (and None): fp16 on CUDA; on a CPU bf16 where it runs
    bf16 natively, else fp32; fp32 elsewhere. Or as asked: "fp32", "bf16", "fp16" or a torch dtype. fp32 gives
    exactly diffusers' fp32 pipeline."""
    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            return torch.float16
        return torch.bfloat16 if device == "cpu" and native_bf16() else torch.float32
    if not isinstance(dtype, torch.dtype):
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, fp32, bf16, fp16")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, fp32, bf16, fp16")
    if dtype == torch.bfloat16 and device == "cpu" and not native_bf16():
        warnings.warn("bf16 on this CPU is emulated (it has neither AMX nor AVX-512 bf16) and runs about 5x slower "
                      "than fp32; use dtype='fp32'", stacklevel=3)
    return dtype


def training_bf16(precision: str, device: str = "cpu") -> bool:
    """Whether training runs its forward passes in bf16 autocast: "bf16" always, "fp32" never, "auto" where the
    device runs bf16 natively (a CUDA GPU with bf16 support, a CPU with AMX or AVX-512 bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.startswith("cuda"):
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return device == "cpu" and native_bf16()
    return precision == "bf16"


def autocast(enabled: bool, device: str = "cpu"):
    """bf16 autocast on `device` when enabled, else a no-op context (fp32)."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=enabled)


def layout_for(dtype: torch.dtype, sample_size: int = 64) -> torch.memory_format:
    """The memory layout UNet_SD runs in, for its dtype and the latent size it is made for (`sample_size`).

    Channels-last in half precision on latents of 32x32 and more: oneDNN and cuDNN run bf16/fp16 convs faster in
    NHWC (3-15% on the SD1.5 UNet on CPU). The standard layout in fp32, where NHWC measured slower, and on smaller
    latents, where PyTorch's channels-last GroupNorm on CPU runs 10-35x slower than in the standard layout on
    feature maps of 16x16 and less (the built-in model's 16x16 latents make its bf16 images 1.5x slower in NHWC).
    """
    return torch.channels_last if dtype in HALF and sample_size >= 32 else torch.contiguous_format


def unfused_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether attention over q (.., N, d) and k (.., M, d) is faster as three plain ops than as PyTorch's fused
    kernel: training in bf16 on a CPU, whose fused backward is 1.5-7.5x slower on score matrices up to 256x256
    (from 1024x1024 up it is 2x faster, so it stays there)."""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled()
            and q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION)


def unfused_library_attention(bf16: bool, vae=None, text_encoder=None):
    """Switches diffusers' `vae` and transformers' `text_encoder` to plain matmul-softmax-matmul attention for
    bf16 training on CPU, as `unfused_attention` does inside UNet_SD (a text encoder step 22 -> 14 ms, a VAE step
    79 -> 74 ms). Returns a function that switches them back (nothing to do without bf16)."""
    if not bf16:
        return lambda: None
    from diffusers.models.attention_processor import AttnProcessor

    processors = vae.attn_processors if vae is not None else None
    if vae is not None:
        vae.set_attn_processor(AttnProcessor())
    if text_encoder is not None:
        text_encoder.set_attn_implementation("eager")

    def restore():
        if vae is not None:
            vae.set_attn_processor(processors)
        if text_encoder is not None:
            text_encoder.set_attn_implementation("sdpa")
    return restore
