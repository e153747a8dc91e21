"""ImageCraft: text-to-image with a from-scratch Stable Diffusion UNet (UNet_SD) into which SD weights port exactly."""

__version__ = "0.1.0"
# every public name, by the module that defines it: each loads (with torch, and diffusers for the pipeline) on first
# use, so that `imagecraft --help` and the settings tables start without them
_UNET = ("UNet_SD", "UNetConfig", "ResBlock", "DownSample", "UpSample", "CrossAttention", "SDPAProcessor",
         "TransformerBlock", "SpatialTransformer", "TimeModulatedSequential")
_PORT = ("PortingError", "config_from_diffusers", "load_pipe_into_our_UNet", "load_ldm_unet", "to_diffusers",
         "to_diffusers_state_dict")
__all__ = ["ImageCraftPipeline"] + list(_UNET) + list(_PORT)


def __getattr__(name):
    """`imagecraft.UNet_SD` and the rest, imported when first asked for (PEP 562)."""
    if name == "ImageCraftPipeline":
        from .pipeline import ImageCraftPipeline

        return ImageCraftPipeline
    if name in _UNET:
        from . import unet

        return getattr(unet, name)
    if name in _PORT:
        from . import port

        return getattr(port, name)
    raise AttributeError(f"module 'imagecraft' has no attribute {name!r}")
