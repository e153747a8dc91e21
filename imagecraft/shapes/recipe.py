"""The built-in model's recipe as data: the tokenizer and text encoder, the VAE and its optional decoder stage, the
training scenes, the UNet's architecture, and the UNet's training stages as a list, with four presets:

    PRESETS["lexicon"]  the built-in model in assets/shapes-sd: fast, then two stages with the world's shapes in any
                        colour, named by made-up words (docs/built-in-model.md says why each part is there)
    PRESETS["fast"]     the built-in model's first five UNet stages
    PRESETS["large"]    the earlier built-in model: SD's epsilon objective, then v-prediction on zero-terminal-SNR betas
    PRESETS["smoke"]    every phase for a few steps at toy sizes, for CI

`override(recipe, "vae.steps=100")` changes one field by its dotted path (`stages.unet-shape.steps=0` drops that
stage); the command line's `--set` is this.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, replace

from ..runtime import PRECISIONS
from ..schedulers import check_scheduler_name
from ..unet import UNetConfig
from . import world


@dataclass(frozen=True)
class TextSpec:
    """The tokenizer (a CLIP BPE trained on the grammar's captions) and the CLIP text encoder trained from scratch."""
    vocab_size: int = 640  # byte tokens and specials, the rest merges (whole words of the grammar)
    max_tokens: int = 32  # the longest caption is ~20 tokens
    width: int = 128  # hidden size
    layers: int = 3


@dataclass(frozen=True)
class VAESpec:
    """The autoencoder (diffusers' AutoencoderKL) and its training."""
    channels: tuple = (64, 64, 64)  # one level per entry; each level after the first halves the side
    groups: int = 16  # GroupNorm groups
    crop: int = 64  # training crop, a multiple of the latent factor (64: whole scenes)
    steps: int = 1800
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 100
    colour: float = 1.0  # weight tying latent channels 0-2 to the patch-average colour
    coverage: float = 0.0  # weight tying latent channel 3 to where the objects are (0: channel 3 free)
    edge: float = 0.0  # weight of an extra L1 term on the pixels within 1 px of an object's outline
    kl: float = 1e-6  # a tiny KL, as SD's VAE: latents near zero, the autoencoder near-deterministic
    general: float = 0.0  # share of each batch from the broader world (any colour and shape; world.general_scene)
    latent_channels: int = 4  # three tied to colour, one to coverage, any more free

    @property
    def latent_factor(self) -> int:
        """How many image pixels one latent cell covers, per side."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class DecoderSpec:
    """An optional stage that trains the VAE's decoder alone (the encoder, so the UNet's latents, left as they are),
    on latents with Gaussian noise of std drawn from 0 to `noise` latent stds. 0 steps: no such stage."""
    steps: int = 0
    lr: float = 5e-4
    noise: float = 0.2


@dataclass(frozen=True)
class ScenesSpec:
    """The UNet's training set: scenes of the world encoded once. The VAE always trains on the world's own gap and
    margin; the UNet's scenes may keep objects further apart and further from the border."""
    count: int = 50000
    gap: float = world.GAP  # least px between two objects' boxes
    margin: float = world.MARGIN  # least px between an object and the border


@dataclass(frozen=True)
class LexiconSpec:
    """Scenes of the broader world named by made-up words (`world.lexicon_scene`), encoded once, for the stages with
    a `lexicon` share. 0 scenes: none."""
    scenes: int = 0
    colour_words: int = 400
    shape_words: int = 120


@dataclass(frozen=True)
class UNetStage:
    """One UNet training stage: its checkpoint name, length, learning rate and objective."""
    name: str
    steps: int
    lr: float
    warmup: int
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    two_share: float | None = None  # share of two-object scenes per batch; None: the training set's own mix
    layout: bool = False  # every t >= mean_target_t, x0 the mean latent of the caption's position class
    mean_target_t: int = 0  # from this timestep up, x0 in the target is the mean latent of the caption; 0: off
    max_t: int = 1000  # timesteps drawn below this
    snr_gamma: float | None = None  # Min-SNR gamma of this stage; None: the recipe's
    lexicon: float = 0.0  # share of each batch from the lexicon's scenes (made-up words for other colours, shapes)


def default_unet() -> dict:
    return dict(model_channels=64, channel_mult=(1, 2, 2), attention_levels=(False, True, True), num_res_blocks=1,
                num_heads=None, head_dim=32, transformer_depth=1, norm_groups=32)


@dataclass(frozen=True)
class ShapesRecipe:
    """Everything that decides the built-in model; see the presets below."""
    stages: tuple = ()  # of UNetStage, trained in order, each from the previous one's EMA
    seed: int = 0
    threads: int = 0  # torch threads; 0: all cores
    precision: str = "auto"  # forward passes in bf16 autocast where the CPU runs bf16 natively (runtime)
    text: TextSpec = TextSpec()
    vae: VAESpec = VAESpec()
    decoder: DecoderSpec = DecoderSpec()
    scenes: ScenesSpec = ScenesSpec()
    lexicon: LexiconSpec = LexiconSpec()
    unet: dict = field(default_factory=default_unet)  # UNetConfig fields
    batch: int = 64  # UNet batch
    uncond_prob: float = 0.1  # captions dropped, for classifier-free guidance
    snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0: plain MSE
    ema_decay: float = 0.999
    ground_weight: float = 0.0  # weight of the grounding loss (shapes.grounding); 0: off
    made_up_words: float = 0.0  # share of captions whose colour word is replaced by a made-up one
    sampler: str = "dpm++2m"  # the scheduler the model ships with (imagecraft.schedulers' short names)
    checkpoint_every: int = 250
    log_every: int = 50

    def stage(self, name: str) -> UNetStage:
        return next(s for s in self.stages if s.name == name)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


V, ZSNR = "v_prediction", True
LARGE = ShapesRecipe(stages=(
    UNetStage("unet", 4200, 4e-4, 200),
    UNetStage("unet-zsnr", 1500, 2e-4, 100, V, ZSNR),
    UNetStage("unet-two", 600, 1e-4, 50, V, ZSNR, two_share=0.8),
))
FAST = ShapesRecipe(
    vae=VAESpec(channels=(32, 64, 64), groups=8, crop=32, steps=32000, coverage=1.0, edge=1.0, general=0.5),
    scenes=ScenesSpec(count=30000, gap=8, margin=4), batch=32, ground_weight=0.01, made_up_words=0.1,
    stages=(
        UNetStage("unet-layout", 300, 4e-4, 100, V, ZSNR, layout=True, mean_target_t=980),
        UNetStage("unet", 3500, 3e-4, 200, V, ZSNR, mean_target_t=900),
        UNetStage("unet-two", 1200, 1e-4, 50, V, ZSNR, two_share=0.8, mean_target_t=900),
        UNetStage("unet-shape", 14000, 3e-4, 50, V, ZSNR, max_t=700),
        UNetStage("unet-detail", 3000, 1e-4, 50, V, ZSNR, max_t=400, snr_gamma=5.0),
    ))
# The built-in model: the fast preset continued with a quarter of each batch the world's shapes in any colour, named
# by made-up words (world.lexicon_scene), so that a fine-tune teaches a word rather than how to draw its colour.
# Shape words besides, or half of each batch made up, cost the model's own triangles (docs/built-in-model.md, "The
# lexicon stages").
LEXICON = replace(FAST, lexicon=LexiconSpec(scenes=12000, shape_words=0), stages=FAST.stages + (
    UNetStage("unet-lexicon", 3000, 1e-4, 100, V, ZSNR, two_share=0.8, lexicon=0.25),
    UNetStage("unet-lexicon-detail", 1500, 1e-4, 100, V, ZSNR, two_share=0.8, max_t=400, lexicon=0.25),
))
SMOKE = replace(
    LARGE, text=TextSpec(width=32, layers=1), vae=VAESpec(channels=(16, 32, 32), groups=8, crop=32, steps=4, batch=4),
    scenes=ScenesSpec(count=64), batch=4, checkpoint_every=3, log_every=2,
    unet=dict(model_channels=32, channel_mult=(1, 2), attention_levels=(False, True), num_res_blocks=1, num_heads=2,
              norm_groups=8),
    stages=(UNetStage("unet", 6, 4e-4, 2), UNetStage("unet-zsnr", 4, 2e-4, 1, V, ZSNR),
            UNetStage("unet-two", 3, 1e-4, 1, V, ZSNR, two_share=0.8)))
PRESETS = {"fast": FAST, "lexicon": LEXICON, "large": LARGE, "smoke": SMOKE}


# --- overrides -----------------------------------------------------------------------------------------------
def override(recipe: ShapesRecipe, assignment: str) -> ShapesRecipe:
    """The recipe with one field set from "path=value": a top-level field (`batch=32`), a part's (`vae.steps=100`),
    a stage's (`stages.unet-shape.steps=2000`; steps=0 drops the stage) or the UNet's architecture
    (`unet.model_channels=32`). The value is read as JSON, else as text, and must be of the field's kind."""
    path, eq, text = assignment.partition("=")
    if not eq or not path:
        raise ValueError(f"--set takes FIELD=VALUE (e.g. vae.steps=100), got {assignment!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    value = tuple(value) if isinstance(value, list) else value
    head, _, rest = path.partition(".")
    if head == "stages":
        name, _, key = rest.rpartition(".")
        if not name:
            raise ValueError(f"a stage's field is set as stages.NAME.FIELD (e.g. stages.unet.lr=2e-4), got {path!r}")
        names = [s.name for s in recipe.stages]
        if name not in names:
            raise ValueError(f"no stage named {name!r} in this recipe; its stages: {', '.join(names)}")
        stage = recipe.stage(name)
        value = _of_kind(stage, key, value, f"stages.{name}")
        stages = [s for s in recipe.stages if not (s.name == name and key == "steps" and value == 0)]
        return replace(recipe, stages=tuple(replace(s, **{key: value}) if s.name == name else s for s in stages))
    if head == "unet" and rest:
        known = [f.name for f in dataclasses.fields(UNetConfig)]
        if rest not in known:
            raise ValueError(f"the UNet has no field {rest!r}; its fields: {', '.join(known)}")
        return replace(recipe, unet={**recipe.unet, rest: value})
    if rest:
        part = getattr(recipe, head, None)
        if not dataclasses.is_dataclass(part):
            raise ValueError(f"{head!r} is not a part of the recipe; parts: text, vae, decoder, scenes, lexicon, unet, "
                             f"stages")
        return replace(recipe, **{head: replace(part, **{rest: _of_kind(part, rest, value, head)})})
    if head in ("stages", "unet") or dataclasses.is_dataclass(getattr(recipe, head, None)):
        raise ValueError(f"{head!r} is a part of the recipe: set one of its fields, e.g. --set {head}."
                         f"{'unet.lr=2e-4' if head == 'stages' else 'FIELD=VALUE'}")
    return replace(recipe, **{head: _of_kind(recipe, head, value, "the recipe")})


def _of_kind(obj, name: str, value, where: str):
    """`value` for `obj.name` when it is of the field's kind (a number for a number, text for text, a list for a
    tuple, a number or null where the field may be None); a sentence naming the field otherwise."""
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        raise ValueError(f"{where} has no field {name!r}; its fields: {', '.join(names)}")
    current = getattr(obj, name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    optional = "None" in str(next(f.type for f in dataclasses.fields(obj) if f.name == name))
    if value is None and optional:
        return None
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, (int, float)) or current is None:
        ok = number
        if ok and isinstance(current, int) and not isinstance(value, bool) and float(value).is_integer():
            value = int(value)
    elif isinstance(current, tuple):
        ok = isinstance(value, tuple)
    else:
        ok = isinstance(value, type(current))
    if not ok:
        kind = ("true or false" if isinstance(current, bool) else "a list" if isinstance(current, tuple)
                else "a number" if isinstance(current, (int, float)) else "a number or null" if current is None
                else "text")
        raise ValueError(f"{where}.{name} must be {kind}, got {value!r}".replace("the recipe.", ""))
    return value


# --- checks --------------------------------------------------------------------------------------------------
def check_recipe(recipe: ShapesRecipe) -> ShapesRecipe:
    """Refuses nonsense before any work starts, naming the field and what is allowed."""
    vae, scenes, factor = recipe.vae, recipe.scenes, recipe.vae.latent_factor
    if not recipe.stages:
        raise ValueError("the recipe has no UNet stage")
    names = [s.name for s in recipe.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must differ (each names a checkpoint), got {names}")
    for label, value in (("vae.steps", vae.steps), ("vae.batch", vae.batch), ("batch", recipe.batch),
                         ("scenes.count", scenes.count), ("checkpoint_every", recipe.checkpoint_every),
                         ("log_every", recipe.log_every)):
        _positive(label, value, whole=True)
    _positive("decoder.steps", recipe.decoder.steps, whole=True, zero=True)
    if not 0 <= recipe.decoder.noise <= 2:
        raise ValueError(f"decoder.noise must be from 0 to 2 latent stds, got {recipe.decoder.noise}")
    for stage in recipe.stages:
        _check_stage(stage)
        if stage.lexicon and not recipe.lexicon.scenes:
            raise ValueError(f"stage {stage.name} draws a share of its batches from the lexicon's scenes, but "
                             f"lexicon.scenes is 0: set it (e.g. --set lexicon.scenes=12000)")
    lexicon = recipe.lexicon
    _positive("lexicon.scenes", lexicon.scenes, whole=True, zero=True)
    if lexicon.scenes:
        _positive("lexicon.colour_words", lexicon.colour_words, whole=True)
        _positive("lexicon.shape_words", lexicon.shape_words, whole=True, zero=True)
    layouts = [i for i, s in enumerate(recipe.stages) if s.layout]
    if layouts and any(not (s.prediction_type == "v_prediction" and s.zero_terminal_snr)
                       for s in recipe.stages[layouts[0]:]):
        raise ValueError("a layout stage needs v_prediction with zero_terminal_snr in it and every stage after it: "
                         "the layout stage's pure-noise v-prediction is lost on an epsilon objective")
    if not 0 <= recipe.made_up_words < 1:
        raise ValueError(f"made_up_words must be a share in [0, 1), got {recipe.made_up_words}")
    if not 0 <= recipe.ground_weight <= 10:
        raise ValueError(f"ground_weight must be from 0 (off) to 10, got {recipe.ground_weight}")
    if not 0 <= recipe.uncond_prob < 1:
        raise ValueError(f"uncond_prob must be in [0, 1), got {recipe.uncond_prob}")
    if not (factor <= vae.crop <= world.SIZE and vae.crop % factor == 0):
        raise ValueError(f"vae.crop must be a multiple of {factor} (the latent factor) from {factor} to "
                         f"{world.SIZE}, got {vae.crop}")
    if vae.coverage and vae.crop % (2 * factor):
        raise ValueError(f"vae.crop must be a multiple of {2 * factor} with vae.coverage (tied on 2x2 latent "
                         f"cells), got {vae.crop}")
    if not world.GAP <= scenes.gap <= 8:
        raise ValueError(f"scenes.gap must be from {world.GAP:g} px (the world's least gap) to 8 px (at 10, one "
                         f"scene in 20,000 finds no room for its relation), got {scenes.gap}")
    if not (world.MARGIN <= scenes.margin <= 4 and float(scenes.margin).is_integer()):
        raise ValueError(f"scenes.margin must be a whole number of px from {world.MARGIN:g} (the world's) to 4 "
                         f"(beyond, two large objects in a relation rarely fit), got {scenes.margin}")
    if not 4 <= vae.latent_channels <= 16:
        raise ValueError(f"vae.latent_channels must be from 4 (three tied to colour, one to coverage) to 16, got "
                         f"{vae.latent_channels}")
    if not 0 <= vae.general <= 1:
        raise ValueError(f"vae.general (share of broader-world images in a VAE batch) must be in [0, 1], got "
                         f"{vae.general}")
    for label, value in (("vae.colour", vae.colour), ("vae.coverage", vae.coverage), ("vae.edge", vae.edge)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{label} (an auxiliary loss weight) must be 0 or a positive number, got {value}")
    for label, value in (("vae.lr", vae.lr), ("decoder.lr", recipe.decoder.lr)):
        _positive(label, value)
    check_scheduler_name(recipe.sampler)  # names the valid samplers
    if recipe.precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {recipe.precision!r}")
    return recipe


def _check_stage(stage: UNetStage):
    where = f"stage {stage.name}"
    _positive(f"{where}: steps", stage.steps, whole=True)
    _positive(f"{where}: lr (learning rate)", stage.lr)
    _positive(f"{where}: warmup", stage.warmup, whole=True, zero=True)
    if stage.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"{where}: prediction_type must be 'epsilon' or 'v_prediction', got "
                         f"{stage.prediction_type!r}")
    if stage.zero_terminal_snr and stage.prediction_type == "epsilon":
        raise ValueError(f"{where}: zero_terminal_snr needs prediction_type 'v_prediction': at t=999 the input is "
                         f"pure noise, so epsilon is the input itself and the loss weight is undefined")
    if stage.two_share is not None and not 0 < stage.two_share <= 1:
        raise ValueError(f"{where}: two_share must be in (0, 1], got {stage.two_share}")
    if stage.mean_target_t and not 500 <= stage.mean_target_t <= 990:
        raise ValueError(f"{where}: mean_target_t must be 0 (off) or a timestep from 500 to 990, got "
                         f"{stage.mean_target_t}")
    if not 20 <= stage.max_t <= 1000:
        raise ValueError(f"{where}: max_t must be a timestep from 20 to 1000, got {stage.max_t}")
    if not 0 <= stage.lexicon <= 1:
        raise ValueError(f"{where}: lexicon (share of each batch from the lexicon's scenes) must be in [0, 1], got "
                         f"{stage.lexicon}")
    if stage.lexicon and (stage.layout or stage.mean_target_t):
        raise ValueError(f"{where}: a stage with lexicon scenes cannot use layout or mean_target_t: their targets are "
                         f"means over the world's captions, which a made-up word is not")
    if stage.snr_gamma is not None and not 0 <= stage.snr_gamma <= 10000:
        raise ValueError(f"{where}: snr_gamma must be 0 (plain MSE) to 10000, got {stage.snr_gamma}")


def _positive(label: str, value, whole: bool = False, zero: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value >= 0 if zero else value > 0) and (not whole or float(value).is_integer())
    if not ok:
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"{label} must be {kind} {'of 0 or more' if zero else 'above 0'}, got {value!r}")
