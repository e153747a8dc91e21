"""ImageCraft: text-to-image with a from-scratch Stable Diffusion UNet (UNet_SD) into which SD weights port exactly."""

from .port import (PortingError, config_from_diffusers, load_ldm_unet, load_pipe_into_our_UNet, to_diffusers,
                      to_diffusers_state_dict)
from .unet import (CrossAttention, DownSample, ResBlock, SDPAProcessor, SpatialTransformer, TimeModulatedSequential,
                   TransformerBlock, UNet_SD, UNetConfig, UpSample)

__version__ = "0.1.0"
__all__ = ["ImageCraftPipeline", "UNet_SD", "UNetConfig", "ResBlock", "DownSample", "UpSample", "CrossAttention",
           "SDPAProcessor", "TransformerBlock", "SpatialTransformer", "TimeModulatedSequential", "PortingError",
           "config_from_diffusers", "load_pipe_into_our_UNet", "load_ldm_unet", "to_diffusers",
           "to_diffusers_state_dict"]


def __getattr__(name):
    """`imagecraft.ImageCraftPipeline` without importing diffusers and transformers for UNet-only use."""
    if name == "ImageCraftPipeline":
        from .pipeline import ImageCraftPipeline

        return ImageCraftPipeline
    raise AttributeError(f"module 'imagecraft' has no attribute {name!r}")
