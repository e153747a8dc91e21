"""Tiny random diffusers models shared by the tests."""

import torch
from diffusers import UNet2DConditionModel

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


def rel_err(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


TINY_TEXTS = ["a red circle on the left", "a blue square above a green triangle", "an orange square",
              "a yellow triangle on a black background", "a purple circle to the left of a white square"]


def make_tiny_pipeline_folder(folder, scheduler="pndm", seed=0, unet=SD1_STYLE):
    """Saves a tiny random SD pipeline in diffusers layout (safetensors) and returns the folder."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                           StableDiffusionPipeline)
    from transformers import CLIPTextConfig, CLIPTextModel

    from imagecraft.tokenizer import train_clip_tokenizer

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


def diffusers_vae_to_ldm(state: dict) -> dict:
    """A diffusers AutoencoderKL state dict under the original LDM names (what single files hold), for tests."""
    import re

    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks."))
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"^(en|de)coder\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}coder.mid.block_{int(m[2]) + 1}."),
        (r"^(en|de)coder\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}coder.mid.attn_1."),
        (r"^(en|de)coder\.conv_norm_out\.", lambda m: f"{m[1]}coder.norm_out."),
    ]
    leaf = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
            "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        head, _, param = new.rpartition(".")
        for a, b in leaf.items():
            if head.endswith("." + a):
                head = head[: -len(a)] + b
        if ".attn_1." in new and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out["first_stage_model." + head + "." + param] = value
    return out
