"""Small random-weight diffusers pipelines of the real inpainting architectures.

Why this exists: the real FLUX.1 Fill / FLUX.1 inpaint / SD3 checkpoints are tens of
gigabytes and no model hub is reachable from tests or CI. These builders produce the
*same* pipeline classes and component classes (same topology, same schedulers, same
tokenizer types), only narrow and with random weights, saved as an ordinary diffusers
folder. Code under test therefore goes through exactly the loading and inference path a
real checkpoint takes (``DiffusionPipeline.from_pretrained(folder)``), in seconds.

The weights are re-drawn after construction because diffusers zero-initialises several
layers (adaLN modulations, output projections); a model with those left at zero ignores
its prompt and image, which would let broken conditioning go unnoticed in tests.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import shutil
import string
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Callable, TypeVar

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxInpaintPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3InpaintPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = ["FAMILIES", "SIZES", "build_pipeline", "make_model"]

_Module = TypeVar("_Module", bound=nn.Module)
_FluxPipeline = TypeVar("_FluxPipeline", FluxFillPipeline, FluxInpaintPipeline)

FAMILIES = ("flux-fill", "flux-inpaint", "sd3-inpaint", "sdxl-inpaint", "sd-inpaint")
SIZES = ("tiny", "small")

# Words that get whole-word tokens, so that ordinary prompts map to short, distinct id
# sequences rather than only to bytes/characters.
_WORDS = """
a an the and or but not no of to in on at by for with from into onto over under above
below near behind front back left right top bottom middle center side up down out off
is are was were be been has have had do does it its this that these those there here
i you he she we they my your his her our their me him us them
one two three four five six seven eight nine ten many few some all more less very
red orange yellow green blue purple pink brown black white gray grey gold silver
dark light bright pale colorful transparent shiny wooden metal glass stone paper
big small large tiny tall short long wide round square old new young beautiful
cute happy sad ugly clean dirty wet dry hot cold soft hard smooth rough sharp
hat cap shirt dress coat jacket shoe shoes boot glasses scarf bag tie sock
man woman boy girl child baby person people face hair eye eyes nose mouth hand
hands arm leg head body smile portrait
cat dog bird horse cow fish lion tiger bear rabbit duck animal animals
car bus truck bike boat ship plane train road street bridge city town
house home room wall floor door window roof table chair bed sofa lamp cup
plate bowl bottle box book phone computer clock picture painting photo
tree trees flower flowers grass leaf leaves plant garden forest park field
sky cloud clouds sun moon star stars rain snow water sea ocean river lake beach
mountain hill rock sand fire smoke light shadow night day morning evening
sunset sunrise background foreground scene landscape texture pattern style
photograph realistic detailed high quality resolution sharp blurry cinematic
make add remove replace change turn put place fill paint draw wear wearing
holding sitting standing walking running looking flying lying
"""

_CLIP_MAX_LENGTH = 77
_T5_MAX_LENGTH = 512

# Text encoders and VAE are shared by both sizes: they are not what "small" is meant
# to stress, and keeping them tiny keeps every folder quick to build and load.
_CLIP_HIDDEN = 32
_CLIP_PROJECTION = 32
_T5_DIM = 2 * _CLIP_HIDDEN  # SD3 zero-pads the concatenated CLIP embeddings up to T5's width.
_VAE_CHANNELS = (8, 16, 32, 32)
_VAE_GROUPS = 4
_LATENT_CHANNELS = 16
_POSTERIOR_LOGVAR_SHIFT = -8.0  # posterior std around exp(-4), i.e. ~0.02

_FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
_FLUX_VAE_SCALING = dict(scaling_factor=0.3611, shift_factor=0.1159)
_SD3_VAE_SCALING = dict(scaling_factor=1.5305, shift_factor=0.0609)
_SD_VAE_SCALING = dict(scaling_factor=0.18215)
_SDXL_VAE_SCALING = dict(scaling_factor=0.13025)
_SD_LATENT_CHANNELS = 4
# The schedulers the real checkpoints ship: PNDM (SD 1.5) and Euler (SDXL).
_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# Flux packs 2x2 latent patches, so 16 latent channels become 64 token channels. The fill
# variant also takes the packed masked-image latents (64) and, per latent pixel, the 8x8
# pixel mask, packed 2x2 as well (64 * 4 = 256).
_FLUX_LATENT_IN = 4 * _LATENT_CHANNELS
_FLUX_FILL_IN = 2 * _FLUX_LATENT_IN + 4 * 8 * 8


@dataclass(frozen=True)
class _TransformerSize:
    """Transformer widths and depths for one size; everything else is size-independent."""

    heads: int
    head_dim: int
    flux_double_blocks: int
    flux_single_blocks: int
    flux_rope_axes: tuple[int, int, int]
    sd3_blocks: int
    sd_channels: tuple[int, ...]  # SD 1.5 / 2: attention at every level but the coarsest
    sdxl_channels: tuple[int, int, int]  # SDXL: no attention at the finest level
    sdxl_depths: tuple[int, int, int]  # SDXL's transformer blocks per attention level (real: 1, 2, 10)
    unet_layers: int  # ResNets (and attention levels) per down block
    unet_groups: int


_SIZE_SPECS: dict[str, _TransformerSize] = {
    "tiny": _TransformerSize(
        heads=4, head_dim=16, flux_double_blocks=2, flux_single_blocks=4, flux_rope_axes=(4, 6, 6), sd3_blocks=6,
        sd_channels=(32, 64, 64), sdxl_channels=(32, 64, 64), sdxl_depths=(1, 1, 2), unet_layers=1, unet_groups=8,
    ),
    "small": _TransformerSize(
        heads=4, head_dim=64, flux_double_blocks=2, flux_single_blocks=4, flux_rope_axes=(16, 24, 24), sd3_blocks=4,
        # The real block layouts (SD 1.5: four levels; SDXL: 2 and 10 blocks deep), a fifth as wide.
        sd_channels=(64, 128, 256, 256), sdxl_channels=(64, 128, 256), sdxl_depths=(1, 2, 10), unet_layers=2,
        unet_groups=32,
    ),
}


def _generator(seed: int, component: str) -> torch.Generator:
    """A generator private to one component, so that components of identical shape
    (SD3's two CLIP encoders) still differ and the build never reads global RNG state."""
    digest = hashlib.sha256(f"{seed}/{component}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def _normal(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    """Draw on the CPU from ``generator`` so results do not depend on device or threads."""
    return torch.randn(shape, generator=generator) * std


def _fresh_value(module: nn.Module, name: str, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Variance-preserving random value for one parameter: unit-scale activations keep
    attention softmaxes unsaturated (every token matters) and adaLN gates open."""
    if param.ndim >= 2:
        # Embedding rows are looked up, not summed over, so they get unit scale directly.
        fan_in = 1 if isinstance(module, nn.Embedding) else param[0].numel()
        return _normal(param.shape, fan_in**-0.5, generator)
    # By class name because diffusers' RMSNorm and T5LayerNorm are not torch norm classes.
    if name == "weight" and "Norm" in type(module).__name__:
        return 1.0 + _normal(param.shape, 0.1, generator)
    return _normal(param.shape, 0.02, generator)


def _reinitialise(model: nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter in registration order, which fixes the draw order and so
    makes the weights a pure function of the generator's seed."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                param.copy_(_fresh_value(module, name, param, generator))


def _seeded(model: _Module, seed: int, component: str) -> _Module:
    """Re-draw ``model``'s weights from a generator keyed by (seed, component)."""
    _reinitialise(model, _generator(seed, component))
    return model.eval()


def _words() -> list[str]:
    """The vocabulary words, deduplicated in first-seen order (the order fixes token ids)."""
    return list(dict.fromkeys(_WORDS.split()))


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Apply one BPE merge to a word, left to right, as the tokenizer will."""
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


@functools.cache
def _bpe_merges() -> tuple[tuple[str, str], ...]:
    """Train BPE on the word list until every word is one token. Hand-written chains of
    merges would collide (``at`` would split ``hat``); real training ranks them so that
    the merges reproduce each word. Ties break on the pair itself, for determinism."""
    words = [tuple(word[:-1]) + (f"{word[-1]}</w>",) for word in _words()]
    words = [word for word in words if len(word) > 1]
    merges: list[tuple[str, str]] = []
    while words:
        counts = Counter(pair for word in words for pair in zip(word, word[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words = [merged for word in words if len(merged := _merge_pair(word, best)) > 1]
    return tuple(merges)


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE like OpenAI CLIP's: every byte (alone and word-final) is in the
    vocabulary, so any text tokenizes, and the listed words are single tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _bpe_merges()
    tokens = [*alphabet, *(f"{char}</w>" for char in alphabet), *(left + right for left, right in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=_CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram vocabulary like T5's SentencePiece model; whole words score higher than
    single characters, and anything outside the vocabulary becomes <unk>."""
    characters = [*string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *string.punctuation]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{word}", -5.0) for word in _words()]
    vocab += [(char, -10.0) for char in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


def _clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A 2-layer CLIP text tower; its vocabulary and special ids follow ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=4 * _CLIP_HIDDEN,
        projection_dim=_CLIP_PROJECTION,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        # The pooled output is read at the first eos; the ids must match the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: T5Tokenizer, seed: int, component: str) -> T5EncoderModel:
    """A 2-layer T5 v1.1 encoder sized to ``tokenizer``."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_DIM,
        d_kv=_T5_DIM // 4,
        d_ff=2 * _T5_DIM,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as in the XXL encoder FLUX and SD3 use.
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _seeded(T5EncoderModel(config), seed, component)


def _vae(seed: int, scaling: dict[str, float], latent_channels: int = _LATENT_CHANNELS) -> AutoencoderKL:
    """The real four-level 8x VAE topology, narrow: FLUX/SD3 style (16 latent channels,
    no quant convolutions) or SD/SDXL style (4 channels, with them)."""
    sd_style = latent_channels == _SD_LATENT_CHANNELS
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_CHANNELS),
        block_out_channels=_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=_VAE_GROUPS,
        sample_size=1024,
        use_quant_conv=sd_style,
        use_post_quant_conv=sd_style,
        **scaling,
    )
    _seeded(vae, seed, "vae")
    # Real VAEs encode almost deterministically; a random encoder's unit posterior noise
    # would drown the image content that inpainting conditions on.
    with torch.no_grad():
        moments = vae.quant_conv if sd_style else vae.encoder.conv_out
        moments.bias[latent_channels:] += _POSTERIOR_LOGVAR_SHIFT
    return vae


def _flux(
    pipeline_class: type[_FluxPipeline], in_channels: int, size: _TransformerSize, seed: int
) -> _FluxPipeline:
    """FLUX.1 components; fill and inpaint differ only in the transformer's input channels."""
    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=_FLUX_LATENT_IN,
        num_layers=size.flux_double_blocks,
        num_single_layers=size.flux_single_blocks,
        attention_head_dim=size.head_dim,
        num_attention_heads=size.heads,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=_CLIP_HIDDEN,  # FLUX pools CLIPTextModel without a projection.
        guidance_embeds=True,
        axes_dims_rope=size.flux_rope_axes,
    )
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**_FLUX_SCHEDULER),
        vae=_vae(seed, _FLUX_VAE_SCALING),
        text_encoder=_seeded(CLIPTextModel(_clip_config(clip_tokenizer)), seed, "text_encoder"),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5_encoder(t5_tokenizer, seed, "text_encoder_2"),
        tokenizer_2=t5_tokenizer,
        transformer=_seeded(transformer, seed, "transformer"),
    )


def _flux_fill(size: _TransformerSize, seed: int) -> FluxFillPipeline:
    return _flux(FluxFillPipeline, _FLUX_FILL_IN, size, seed)


def _flux_inpaint(size: _TransformerSize, seed: int) -> FluxInpaintPipeline:
    return _flux(FluxInpaintPipeline, _FLUX_LATENT_IN, size, seed)


def _sd3_inpaint(size: _TransformerSize, seed: int) -> StableDiffusion3InpaintPipeline:
    """SD3 (3.0-style, no dual attention) with its two CLIP encoders and T5."""
    clip_tokenizers = [_clip_tokenizer(), _clip_tokenizer()]
    clip_encoders = [
        _seeded(CLIPTextModelWithProjection(_clip_config(tokenizer)), seed, component)
        for tokenizer, component in zip(clip_tokenizers, ("text_encoder", "text_encoder_2"))
    ]
    t5_tokenizer = _t5_tokenizer()
    inner_dim = size.heads * size.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=64,
        patch_size=2,
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        num_layers=size.sd3_blocks,
        attention_head_dim=size.head_dim,
        num_attention_heads=size.heads,
        joint_attention_dim=_T5_DIM,
        caption_projection_dim=inner_dim,  # The joint blocks run text at the image width.
        pooled_projection_dim=2 * _CLIP_PROJECTION,
        pos_embed_max_size=64,  # 1024 px / 8 (VAE) / 2 (patch) = 64 patches per side.
    )
    return StableDiffusion3InpaintPipeline(
        transformer=_seeded(transformer, seed, "transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(seed, _SD3_VAE_SCALING),
        text_encoder=clip_encoders[0],
        tokenizer=clip_tokenizers[0],
        text_encoder_2=clip_encoders[1],
        tokenizer_2=clip_tokenizers[1],
        text_encoder_3=_t5_encoder(t5_tokenizer, seed, "text_encoder_3"),
        tokenizer_3=t5_tokenizer,
    )


def _unet(size: _TransformerSize, cross_attention_dim: int, sdxl: bool, seed: int) -> UNet2DConditionModel:
    """A 9-channel inpainting UNet with the real family's block layout, narrow.

    SD 1.5: attention at every level but the coarsest, 1x1-convolution projections, 8
    heads; SDXL: no attention at the finest level, deeper attention below it, linear
    projections, head width 64 (16 tiny) and ``text_time`` additional embeddings
    (pooled text + 6 size ids).
    """
    widths = size.sdxl_channels if sdxl else size.sd_channels
    levels = len(widths)
    common = dict(
        sample_size=64,
        in_channels=9,
        out_channels=_SD_LATENT_CHANNELS,
        block_out_channels=widths,
        layers_per_block=size.unet_layers,
        norm_num_groups=size.unet_groups,
        cross_attention_dim=cross_attention_dim,
    )
    if sdxl:
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=size.sdxl_depths,
            attention_head_dim=tuple(width // size.head_dim for width in widths),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + _CLIP_PROJECTION,
            **common,
        )
    else:
        unet = UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            attention_head_dim=8,
            use_linear_projection=False,
            **common,
        )
    return _seeded(unet, seed, "unet")


def _sd_inpaint(size: _TransformerSize, seed: int) -> StableDiffusionInpaintPipeline:
    """SD 1.5 inpainting: one CLIP encoder, PNDM, no safety checker."""
    tokenizer = _clip_tokenizer()
    return StableDiffusionInpaintPipeline(
        vae=_vae(seed, _SD_VAE_SCALING, _SD_LATENT_CHANNELS),
        text_encoder=_seeded(CLIPTextModel(_clip_config(tokenizer)), seed, "text_encoder"),
        tokenizer=tokenizer,
        unet=_unet(size, _CLIP_HIDDEN, sdxl=False, seed=seed),
        scheduler=PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_inpaint(size: _TransformerSize, seed: int) -> StableDiffusionXLInpaintPipeline:
    """SDXL inpainting: CLIPTextModel + CLIPTextModelWithProjection, Euler."""
    tokenizers = [_clip_tokenizer(), _clip_tokenizer()]
    return StableDiffusionXLInpaintPipeline(
        vae=_vae(seed, _SDXL_VAE_SCALING, _SD_LATENT_CHANNELS),
        text_encoder=_seeded(CLIPTextModel(_clip_config(tokenizers[0])), seed, "text_encoder"),
        text_encoder_2=_seeded(CLIPTextModelWithProjection(_clip_config(tokenizers[1])), seed, "text_encoder_2"),
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        # The penultimate hidden states of both encoders, concatenated.
        unet=_unet(size, 2 * _CLIP_HIDDEN, sdxl=True, seed=seed),
        scheduler=EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading"),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )


_BUILDERS: dict[str, Callable[[_TransformerSize, int], diffusers.DiffusionPipeline]] = {
    "flux-fill": _flux_fill,
    "flux-inpaint": _flux_inpaint,
    "sd3-inpaint": _sd3_inpaint,
    "sdxl-inpaint": _sdxl_inpaint,
    "sd-inpaint": _sd_inpaint,
}


def build_pipeline(family: str, size: str = "tiny", seed: int = 0) -> diffusers.DiffusionPipeline:
    """Build a random-weight fp32 pipeline in memory.

    The same ``(family, size, seed)`` always gives bitwise identical weights, and the
    caller's global torch RNG state is left untouched.

    Raises:
        ValueError: ``family`` is not in ``FAMILIES`` or ``size`` is not in ``SIZES``.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if size not in _SIZE_SPECS:
        raise ValueError(f"unknown model size {size!r}; expected one of {SIZES}")
    # Module constructors draw their (discarded) default init from the global RNG.
    with torch.random.fork_rng(devices=[]):
        return _BUILDERS[family](_SIZE_SPECS[size], seed)


def make_model(family: str, out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0) -> pathlib.Path:
    """Build a pipeline and save it as a diffusers folder (safetensors) at ``out_dir``.

    The folder is assembled beside ``out_dir`` and then moved into place, so a failed save
    never leaves a half-written model there. An existing model folder (one with
    ``model_index.json``) or empty folder at ``out_dir`` is replaced; any other existing
    path is refused rather than deleted.

    Raises:
        ValueError: unknown ``family`` or ``size``.
        FileExistsError: ``out_dir`` exists and is neither empty nor a model folder.
    """
    target = pathlib.Path(out_dir).absolute()
    if target.exists() and not _is_replaceable(target):
        raise FileExistsError(f"{target} exists and is not a diffusers model folder; refusing to overwrite it")
    pipeline = build_pipeline(family, size, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _is_replaceable(path: pathlib.Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or not any(path.iterdir()))
