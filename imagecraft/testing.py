"""Tiny random Stable Diffusion models, hand-made PNG chunks and hostile training uploads, for the tests and the
benchmarks.

It sits in the package, not in tests/, because tests/ and bench/ both need it and a benchmark never imports
tests/; bench/common.py would do for what only the benchmarks use. Nothing else in imagecraft imports it.
"""

import io
import struct
import zipfile
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


# --- training uploads a server must refuse (tests/test_bad_input.py, bench/server_load.py --only uploads) ---------
def tiny_png(size=(8, 8)) -> bytes:
    """A red PNG of `size`."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def huge_png_header(w=20000, h=20000) -> bytes:
    """A PNG that says it is w x h: its header only, with one tiny (wrong) IDAT."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        png_chunk(b"IEND", b"")


def zip_of(members: dict, method: int = 0) -> bytes:
    """A zip of {name: bytes or text}, stored (method 0) or deflated (8)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def patched(data: bytes, member: int, local: dict, central: dict) -> bytes:
    """A zip with fields of its `member`-th local and central header overwritten: {offset: (struct format, value)}."""
    data = bytearray(data)
    for signature, fields in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
        at_ = -1
        for _ in range(member + 1):
            at_ = data.index(signature, at_ + 1)
        for offset, (fmt, value) in fields.items():
            struct.pack_into(fmt, data, at_ + offset, value)
    return bytes(data)


def corrupted(data: bytes, marker: bytes) -> bytes:
    """`data` with the first byte of `marker` inside it flipped (a member's stored content)."""
    at_ = data.index(marker)
    return data[:at_] + bytes([data[at_] ^ 0xFF]) + data[at_ + 1:]


def hostile_zips() -> dict[str, tuple[bytes, str | None]]:
    """Zips a training upload must refuse, by name: (the bytes, the entry the refusal must name, or None)."""
    captioned = {"a.png": tiny_png(), "a.txt": "a red square"}
    stored = b"a caption long enough to corrupt"
    return {
        "encrypted": (patched(zip_of(captioned), 0, {6: ("<H", 1)}, {8: ("<H", 1)}), "a.png"),
        "deflate64": (patched(zip_of(captioned, 8), 0, {8: ("<H", 9)}, {10: ("<H", 9)}), "a.png"),
        "crc mismatch": (corrupted(zip_of({**captioned, "a.txt": stored}), stored), "a.txt"),
        "corrupt deflate": (corrupted(zip_of({"a.png": tiny_png(), "a.txt": "x" * 5000}, 8), b"\xed\xc1"), None),
        "size says smaller": (patched(zip_of({**captioned, "a.txt": stored}), 1, {22: ("<I", 4)},
                                      {24: ("<I", 4)}), "a.txt"),
        "size says larger": (patched(zip_of({**captioned, "a.txt": stored}), 1, {22: ("<I", 5000)},
                                     {24: ("<I", 5000)}), "a.txt"),
        "file and folder of one name": (zip_of({**captioned, "a.png/b.png": tiny_png()}), "a.png"),
        "over-long name": (zip_of({**captioned, "x" * 300 + ".png": tiny_png()}), "xxxx"),
        "250 zero-filled 1 MiB captions": (zip_of({f"{i}.txt": b"\0" * (1 << 20) for i in range(250)}, 8), "0.txt"),
        "20000x20000 PNG": (zip_of({**captioned, "big.png": huge_png_header()}), "big.png"),
        "text named .png": (zip_of({**captioned, "fake.png": b"not an image at all"}), "fake.png"),
        "10,100 entries": (zip_of({f"{i}.md": b"" for i in range(10_100)} | captioned), None),
        "entry twice": (patched(zip_of({"a.png": tiny_png(), "b.png": tiny_png()}), 1, {30: ("5s", b"a.png")},
                                {46: ("5s", b"a.png")}), "a.png"),
        "not a zip": (b"PK\x03\x04 not really", None),
    }


def hostile_loose() -> dict[str, dict[str, bytes]]:
    """Loose files (not zipped) a training upload must refuse, by name: {file name: bytes}."""
    return {
        "text named .png": {"fake.png": b"not an image"},
        "20000x20000 PNG": {"big.png": huge_png_header(), "big.txt": b"huge"},
        "caption of 1 MiB": {"a.png": tiny_png(), "a.txt": b"\0" * (1 << 20)},
    }
