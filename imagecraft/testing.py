"""Tiny random Stable Diffusion models and hand-made PNG chunks, for the tests and the benchmarks.

It sits in the package, not in tests/, because tests/ and bench/ both need it and a benchmark never imports
tests/; bench/common.py would do for what only the benchmarks use. Nothing else in imagecraft imports it.
"""

import io
import struct
import zlib

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import train_clip_tokenizer

SD1_STYLE = dict(  # conv projection, 8 heads everywhere, a level without attention
    block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=8, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, sample_size=16,
)
SD2_STYLE = dict(  # linear projection, head dim 8 per level (heads 4, 8, 8), attention upcast, three levels
    block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=(4, 8, 8), cross_attention_dim=48,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True, upcast_attention=True, norm_num_groups=8, sample_size=16,
)
DEEP = dict(SD1_STYLE, transformer_layers_per_block=(2, 1), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)

TINY_TEXTS = ["a red circle on the left", "a blue square above a green triangle", "an orange square",
              "a yellow triangle on a black background", "a purple circle to the left of a white square"]


def random_diffusers_unet(seed=0, **config):
    """A diffusers UNet with random, non-trivial weights (the default init zeroes output convs)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
    return unet


def make_tiny_pipeline_folder(folder, scheduler="pndm", seed=0, unet=SD1_STYLE):
    """Saves a tiny random SD pipeline in diffusers layout (safetensors) and returns the folder."""
    tokenizer = train_clip_tokenizer(TINY_TEXTS * 4, vocab_size=560)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                        sample_size=64).eval()  # 64x64 images, 16x16 latents
    unet = random_diffusers_unet(seed=seed, **dict(unet, cross_attention_dim=32, sample_size=16))
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)
    if scheduler == "pndm":
        sched = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **betas)
    elif scheduler == "ddim":
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **betas)
    else:  # "v-zsnr": how the built-in model ships, v-prediction on zero-terminal-SNR betas
        sched = DPMSolverMultistepScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                            timestep_spacing="trailing", **betas)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk: length, type, data and its CRC (or `crc`, to make a corrupt one)."""
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_with(*chunks: bytes) -> bytes:
    """An 8x8 PNG with `chunks` right after its IHDR (the signature is 8 bytes, the IHDR chunk 25)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = buffer.getvalue()
    return png[:33] + b"".join(chunks) + png[33:]
