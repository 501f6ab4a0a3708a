"""Tiny, seeded, random-weight pipelines of the real diffusers architectures.

Tests all over the project and the server's embedded default model need a base model that is
*architecturally real* (the same module classes, names and call paths as SDXL and OmniGen, so
adapters target exactly what they would target on the full-size model) yet builds in well under a
second with no download. Every component is built in code from a fixed seed, including the
tokenizers, which are written locally instead of fetched from the hub.

Adapter target names, as printed by ``named_modules()`` (all ``nn.Linear``):

``tiny-sdxl`` -> ``pipe.unet``: 12 attention modules (2 down, 1 mid, 3 up transformer blocks, each
with ``attn1`` = self-attention and ``attn2`` = cross-attention), 4 projections each = 48 targets.
Cross-attention ``to_k``/``to_v`` read the 80-wide text embeddings (32 + 48 from the two encoders)::

    down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q      in 64 -> out 64, no bias
    down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0  in 64 -> out 64, bias
    down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q      in 64 -> out 64, no bias
    down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k      in 80 -> out 64, no bias
    down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v      in 80 -> out 64, no bias
    mid_block.attentions.0.transformer_blocks.0.attn2.to_k          in 80 -> out 64, no bias
    up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0    in 64 -> out 64, bias

``tiny-omnigen`` -> ``pipe.transformer``: 2 decoder layers, 4 projections each = 8 targets
(hidden size 32, 4 heads of 8, no biases); the MLP Linears are listed for completeness::

    layers.0.self_attn.to_q       in 32 -> out 32
    layers.0.self_attn.to_k       in 32 -> out 32
    layers.0.self_attn.to_v       in 32 -> out 32
    layers.1.self_attn.to_out.0   in 32 -> out 32
    layers.1.mlp.gate_up_proj     in 32 -> out 128
    layers.1.mlp.down_proj        in 64 -> out 32

Geometry: ``tiny-sdxl`` defaults to 64x64 images (UNet sample size 32, VAE scale factor 2).
``OmniGenPipeline`` hard-codes ``default_sample_size = 128`` latents, so ``tiny-omnigen`` defaults
to 256x256; pass ``height=64, width=64`` for the cheapest image. OmniGen's processor assumes one
transformer token per 16x16 pixels (VAE x8, patch 2 in the real model); here the VAE is x2 and the
patch size is 8, which keeps that contract while staying tiny.
"""

from __future__ import annotations

import json
import math
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

# Concrete modules rather than the ``diffusers`` top level: type checkers resolve the lazy top-level
# names to diffusers' placeholder "dummy" classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_omnigen import OmniGenTransformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.omnigen.pipeline_omnigen import OmniGenPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
)

__all__ = [
    "TINY_MODELS",
    "assemble_sdxl",
    "build_tiny_omnigen",
    "build_tiny_sdxl",
    "ensure_omnigen_support",
]

_Pipeline = TypeVar("_Pipeline", bound=DiffusionPipeline)

# Widths of SDXL's two CLIP text encoders (CLIP-L and OpenCLIP-bigG in the real model). The UNet
# cross-attends to both concatenated, 32 + 48 = 80 wide, deliberately unequal to the UNet's 64
# channels so cross-attention ``to_k``/``to_v`` are non-square and a transposed adapter weight fails.
_CLIP_HIDDEN = 32
_CLIP2_HIDDEN = 48
_CLIP_MAX_TOKENS = 77
_ADD_TIME_EMBED_DIM = 8  # SDXL micro-conditioning: 6 time ids, each embedded to this width

# A handful of BPE merges (pairs of existing tokens) so the tokenizers exercise real merging.
_CLIP_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "f</w>"),
    ("o", "g</w>"),
)
_OMNIGEN_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("Ġ", "th"),
    ("Ġth", "e"),
    ("Ġ", "a"),
    ("i", "n"),
    ("e", "r"),
    ("o", "n"),
    ("a", "g"),
)
# OmniGen's collator left-pads with id 2 and strips a leading id 1 (BOS) from prompt chunks, so the
# first three ids follow the Llama/Phi-3 layout the pipeline was written against.
_OMNIGEN_BASE_SPECIALS = ("<unk>", "<s>", "<|endoftext|>")
# Strings OmniGen's processor puts around every prompt (plus the image-placeholder brackets).
_OMNIGEN_CHAT_SPECIALS = ("<|user|>", "<|assistant|>", "<|end|>", "<|diffusion|>", "<img>", "</img>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map, which byte-level BPE vocabularies use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _byte_alphabet() -> list[str]:
    """The 256 byte characters in byte order, so token ids never depend on set iteration order."""
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def _add_merges(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> None:
    """Append each merge's result to ``vocab``; BPE refuses merges whose product has no id."""
    for left, right in merges:
        if left not in vocab or right not in vocab:
            raise ValueError(f"merge {left!r} + {right!r} uses a token missing from the vocabulary")
        vocab.setdefault(left + right, len(vocab))


# --------------------------------------------------------------------------------------------------
# SDXL
# --------------------------------------------------------------------------------------------------


def _clip_vocab() -> dict[str, int]:
    """CLIP's layout in miniature: bytes, bytes + ``</w>``, merges, then start/end of text last."""
    alphabet = _byte_alphabet()
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({char + "</w>": 256 + i for i, char in enumerate(alphabet)})
    _add_merges(vocab, _CLIP_MERGES)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def build_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` loaded from a locally written vocab.json + merges.txt.

    Going through ``from_pretrained`` on files (rather than a constructor) works the same on
    transformers 4.x and 5.x. SDXL's second tokenizer pads with ``"!"``; the first with end-of-text.
    """
    with tempfile.TemporaryDirectory(prefix="deft-clip-tok-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(_clip_vocab()), encoding="utf-8")
        merges = "\n".join(f"{left} {right}" for left, right in _CLIP_MERGES)
        (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=_CLIP_MAX_TOKENS)


def _clip_text_config(tokenizer: CLIPTokenizer, hidden_size: int) -> CLIPTextConfig:
    """Tiny CLIP text config whose vocabulary and special ids match ``tokenizer`` exactly.

    ``eos_token_id`` must be the real end-of-text id: CLIP pools the hidden state at that token.
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_TOKENS,
        projection_dim=hidden_size,  # used by CLIPTextModelWithProjection: SDXL's pooled embedding
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae() -> AutoencoderKL:
    """Two-level KL autoencoder: 3 -> 4 latent channels, spatial scale factor 2."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's VAE value (OmniGen also uses the SDXL VAE)
    )


def _tiny_sdxl_unet(cross_attention_dim: int, text_projection_dim: int) -> UNet2DConditionModel:
    """SDXL-shaped UNet: linear-projection cross-attention plus "text_time" micro-conditioning."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=(2, 4),  # diffusers' legacy name: this is the number of heads per level
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=_ADD_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * _ADD_TIME_EMBED_DIM + text_projection_dim,
    )


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    """The Euler scheduler settings SDXL base ships with."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def assemble_sdxl(
    seed: int,
    tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
    text_configs: tuple[CLIPTextConfig, CLIPTextConfig],
    unet: Callable[[], UNet2DConditionModel],
    vae: Callable[[], AutoencoderKL],
    scheduler: Any,
) -> StableDiffusionXLPipeline:
    """An SDXL pipeline whose modules are initialised in a fixed order from ``seed``..``seed + 3``."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_configs[0])
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_configs[1])
    torch.manual_seed(seed + 2)
    denoiser = unet()
    torch.manual_seed(seed + 3)
    autoencoder = vae()
    return StableDiffusionXLPipeline(
        vae=autoencoder,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=denoiser,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random-weight ``StableDiffusionXLPipeline`` that generates 64x64 images in a blink."""
    tokenizer = build_clip_tokenizer("<|endoftext|>")
    tokenizer_2 = build_clip_tokenizer("!")
    pipe = assemble_sdxl(
        seed,
        (tokenizer, tokenizer_2),
        (_clip_text_config(tokenizer, _CLIP_HIDDEN), _clip_text_config(tokenizer_2, _CLIP2_HIDDEN)),
        lambda: _tiny_sdxl_unet(_CLIP_HIDDEN + _CLIP2_HIDDEN, text_projection_dim=_CLIP2_HIDDEN),
        _tiny_vae,
        _sdxl_scheduler(),
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------------
# OmniGen
# --------------------------------------------------------------------------------------------------


def build_omnigen_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with OmniGen's chat markers as single special tokens.

    Ids 0/1/2 are ``<unk>``/``<s>``/``<|endoftext|>`` (pad and end of text): the pipeline's collator
    pads with id 2 and drops a leading id 1 from every prompt chunk after the first, as with the
    Phi-3 tokenizer real OmniGen uses. Every prompt gets a ``<s>`` prefix, like Llama's.
    """
    vocab = {token: i for i, token in enumerate(_OMNIGEN_BASE_SPECIALS)}
    vocab.update({char: len(_OMNIGEN_BASE_SPECIALS) + i for i, char in enumerate(_byte_alphabet())})
    _add_merges(vocab, _OMNIGEN_MERGES)
    backend = Tokenizer(BPE(vocab=vocab, merges=list(_OMNIGEN_MERGES), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([*_OMNIGEN_BASE_SPECIALS, *_OMNIGEN_CHAT_SPECIALS])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        padding_side="left",
    )


def sincos_pos_embed_table(embed_dim: int, grid_size: int, base_size: int = 64) -> torch.Tensor:
    """OmniGen's 2-D sin-cos patch position table, ``(1, grid_size**2, embed_dim)``, computed exactly.

    diffusers computes this buffer at construction with vectorised float64 ``sin``/``cos`` over the
    whole grid. Once (not reproduced in hundreds of later builds) two seed-0 builds in one test run
    differed in this buffer and nowhere else, so it is recomputed here with Python's ``math`` on the
    few distinct values and assembled by pure copies: bit-identical on every build, and equal to
    diffusers' table (same layout; ``base_size`` is the patch embedding's fixed 64).
    """
    quarter = embed_dim // 4  # half the width encodes x, half y; each half is [sin | cos]
    omegas = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
    coords = (torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)).tolist()
    one_axis = torch.tensor(
        [[math.sin(c * w) for w in omegas] + [math.cos(c * w) for w in omegas] for c in coords],
        dtype=torch.float64,
    )
    y_part = one_axis.repeat_interleave(grid_size, dim=0)  # row index of each flattened patch
    x_part = one_axis.repeat(grid_size, 1)  # column index
    return torch.cat([x_part, y_part], dim=1).float().unsqueeze(0)


def _tiny_omnigen_transformer(tokenizer: PreTrainedTokenizerFast) -> OmniGenTransformer2DModel:
    """OmniGen transformer in miniature; token embeddings sized and padded to match ``tokenizer``."""
    hidden_size, heads, pos_embed_max_size = 32, 4, 64  # 64 patches a side = images up to 1024 px
    half_head_dim = hidden_size // heads // 2  # one rope scaling factor per rotary frequency
    transformer = OmniGenTransformer2DModel(
        in_channels=4,
        patch_size=8,  # x2 VAE * patch 8 = 16 pixels per token, the processor's fixed assumption
        hidden_size=hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=64,
        num_layers=2,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        rope_scaling={
            "short_factor": [1.0] * half_head_dim,
            "long_factor": [1.0 + 0.5 * i for i in range(half_head_dim)],
        },
        pos_embed_max_size=pos_embed_max_size,
        time_step_dim=32,
    )
    with torch.no_grad():
        transformer.patch_embedding.pos_embed.copy_(sincos_pos_embed_table(hidden_size, pos_embed_max_size))
    return transformer


def build_tiny_omnigen(seed: int = 0) -> OmniGenPipeline:
    """A random-weight ``OmniGenPipeline`` (text-to-image and image-conditioned prompts)."""
    ensure_omnigen_support()
    tokenizer = build_omnigen_tokenizer()
    torch.manual_seed(seed)
    transformer = _tiny_omnigen_transformer(tokenizer)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    pipe = OmniGenPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        tokenizer=tokenizer,  # type: ignore[arg-type]  # annotated LlamaTokenizer; any fast tokenizer works
    )
    return _finish(pipe)


def _finish(pipe: _Pipeline) -> _Pipeline:
    """Inference-only defaults shared by both builders: eval mode and no progress-bar noise."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_MODELS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-omnigen": build_tiny_omnigen,
}


# --------------------------------------------------------------------------------------------------
# OmniGen without torchvision
# --------------------------------------------------------------------------------------------------


class _Compose:
    """Stand-in for ``torchvision.transforms.Compose``."""

    def __init__(self, steps: Sequence[Callable[[Any], Any]]) -> None:
        self.steps = list(steps)

    def __call__(self, value: Any) -> Any:
        for step in self.steps:
            value = step(value)
        return value


class _Lambda:
    """Stand-in for ``torchvision.transforms.Lambda``."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, value: Any) -> Any:
        return self.fn(value)


class _ToTensor:
    """Stand-in for ``torchvision.transforms.ToTensor``: PIL image (as RGB) -> CHW float in [0, 1]."""

    def __call__(self, image: Any) -> torch.Tensor:
        array = np.array(image.convert("RGB") if hasattr(image, "convert") else image)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        return tensor.float().div(255.0) if tensor.dtype == torch.uint8 else tensor.float()


class _Normalize:
    """Stand-in for ``torchvision.transforms.Normalize`` on a CHW tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.inplace = inplace

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(tensor), self.std.to(tensor)
        return tensor.sub_(mean).div_(std) if self.inplace else (tensor - mean) / std


_TRANSFORMS_FALLBACK = types.SimpleNamespace(
    Compose=_Compose, Lambda=_Lambda, ToTensor=_ToTensor, Normalize=_Normalize
)


def ensure_omnigen_support() -> None:
    """Make ``OmniGenPipeline`` constructible when torchvision is not installed.

    diffusers imports OmniGen's prompt processor (and the four torchvision transforms it builds in
    ``__init__``) only if torchvision is importable, so without it ``OmniGenPipeline(...)`` and
    ``from_pretrained`` die with a ``NameError``. torchvision is not a deft dependency (each of its
    wheels is pinned to one exact torch build), so this installs minimal, equivalent transforms into
    the processor module instead. It only fills in missing names, is idempotent, and does nothing when
    torchvision is present.
    """
    from diffusers.pipelines.omnigen import pipeline_omnigen, processor_omnigen

    # Assigned through vars(): these names exist in the modules only when torchvision does.
    if not hasattr(processor_omnigen, "transforms"):
        vars(processor_omnigen)["transforms"] = _TRANSFORMS_FALLBACK
    if not hasattr(pipeline_omnigen, "OmniGenMultiModalProcessor"):
        vars(pipeline_omnigen)["OmniGenMultiModalProcessor"] = processor_omnigen.OmniGenMultiModalProcessor
