"""``shapes-sdxl``: a small SDXL-architecture text-to-image model of the scene language.

The architecture is the real SDXL one at miniature scale (``StableDiffusionXLPipeline`` with two
CLIP text encoders, a ``UNet2DConditionModel`` with "text_time" micro-conditioning and an
``AutoencoderKL``); the weights are trained from scratch by ``python -m deft_runtime.scenes.train_base``
and committed under ``deft_runtime/models/shapes_sdxl/``. This module builds the untrained
pipeline the recipe starts from, and resolves the committed directory.

Geometry: 64x64 images, VAE factor 8, so the UNet denoises 8x8x8 latents (two levels, 8x8 and 4x4).
Tokenizers: real ``CLIPTokenizer``s whose BPE merges turn every word of the scene language, and the
reserved personalisation trigger ``sks`` (:data:`RESERVED_WORDS`), into a single token; any other
word still tokenizes, byte by byte.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from deft_runtime.models.tiny import assemble_sdxl, bytes_to_unicode

__all__ = [
    "RESERVED_WORDS",
    "SHAPES_MODEL_DIR",
    "SHAPES_MODEL_NAME",
    "SHAPES_WORDS",
    "add_reserved_embeddings",
    "bpe_merges_for",
    "build_shapes_sdxl",
    "build_shapes_tokenizer",
    "reserved_rows",
    "shapes_defaults",
]

SHAPES_MODEL_NAME = "shapes-sdxl"
SHAPES_MODEL_DIR = Path(__file__).resolve().parent / "shapes_sdxl"
DEFAULTS_FILE = "deft.json"  # generation defaults the model was evaluated at, next to model_index.json

# Every word of the scene-language grammar (deft_runtime.scenes.language), one token each.
SHAPES_WORDS: tuple[str, ...] = (
    *("red", "green", "blue", "yellow", "purple", "orange", "white", "black"),
    *("circle", "square", "triangle", "diamond", "star"),
    *("a", "on", "background", "the", "left", "right", "at", "top", "bottom", "in", "center"),
)
#: Identifiers with no meaning in the scene language, one token each, never in a training caption (so
#: their embeddings keep their initial values): DreamBooth's rare-token trigger for personalisation.
#: A trigger split into byte tokens (``s``, ``k``, ``s``) shifts every later word off the position the
#: text encoders learned to read it at: the base model then gets the prompted colours of ``a green sks
#: on a yellow background`` right in 8 % of samples instead of ~95 %, and an adapter must relearn the
#: grammar before the concept. Their token ids follow the scene vocabulary's (602 and up).
RESERVED_WORDS: tuple[str, ...] = ("sks",)
MAX_TOKENS = 20  # the longest prompt of the grammar is 13 tokens with start and end of text
TEXT_HIDDEN = 64
TEXT_LAYERS = 3  # SDXL reads the penultimate layer, so two layers do the work
UNET_CHANNELS = (32, 64)
# 8 latent channels, not SDXL's 4: an 8x8-pixel latent cell on a shape's edge must carry both colours
# and the edge's geometry, which 4 numbers cannot hold locally (the x8 VAE then trains far slower).
LATENT_CHANNELS = 8
ADD_TIME_EMBED_DIM = 8


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair (all occurrences)."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pair = min(itertools.pairwise(symbols), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def bpe_merges_for(
    words: tuple[str, ...], after: list[tuple[str, str]] | None = None
) -> list[tuple[str, str]]:
    """Merges (in rank order) under which every word in ``words`` is one BPE token, ranked after the
    merges ``after`` (whose words stay as they are).

    Each new merge joins the first two symbols of a word that is not yet one token and is ranked
    last, so it never changes a word already finished; words are re-tokenized after every merge.
    """
    merges: list[tuple[str, str]] = list(after or [])
    ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
    for word in words:
        symbols = _apply_merges(word, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _apply_merges(word, ranks)
    return merges[len(after or []) :]


def _vocab(merges: list[tuple[str, str]], reserved: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's byte alphabet, the scene words' merges, the special tokens, then the reserved words'
    merges (so the scene vocabulary's ids do not depend on the reserved words)."""
    table = bytes_to_unicode()
    alphabet = [table[b] for b in range(256)]
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({char + "</w>": 256 + i for i, char in enumerate(alphabet)})
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    for left, right in reserved:
        vocab.setdefault(left + right, len(vocab))
    return vocab


def build_shapes_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A ``CLIPTokenizer`` (written locally, loaded from files) with the scene words and the reserved
    words as whole tokens."""
    merges = bpe_merges_for(SHAPES_WORDS)
    reserved = bpe_merges_for(RESERVED_WORDS, after=merges)
    with tempfile.TemporaryDirectory(prefix="deft-shapes-tok-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(_vocab(merges, reserved)), encoding="utf-8")
        lines = "\n".join(f"{left} {right}" for left, right in merges + reserved)
        (folder / "merges.txt").write_text(f"#version: 0.2\n{lines}\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=MAX_TOKENS)


def _reserved_token_count() -> int:
    return len(bpe_merges_for(RESERVED_WORDS, after=bpe_merges_for(SHAPES_WORDS)))


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The text encoders' configuration without the reserved tokens' rows (added after initialising)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer) - _reserved_token_count(),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_HIDDEN,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> AutoencoderKL:
    """x8 KL autoencoder: 64x64 scenes become 8x8x8 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        # >= 4 channels per group: with one channel per group, GroupNorm erases each channel's mean,
        # which for flat-coloured scenes is the colour itself
        norm_num_groups=2,
        sample_size=64,
        scaling_factor=1.0,  # the recipe measures the latents' spread and writes the real value
    )


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=tuple(c // 32 for c in UNET_CHANNELS),  # number of heads (diffusers' name)
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADD_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADD_TIME_EMBED_DIM + TEXT_HIDDEN,
    )


def _scheduler() -> DPMSolverMultistepScheduler:
    """SDXL's noise schedule; DPM-Solver++ (2nd order) with trailing spacing samples it in few steps."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="trailing",
    )


def build_shapes_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """The untrained ``shapes-sdxl`` pipeline (seeded initialisation) the training recipe starts from."""
    tokenizer, tokenizer_2 = build_shapes_tokenizer("<|endoftext|>"), build_shapes_tokenizer("!")
    configs = (_text_config(tokenizer), _text_config(tokenizer_2))
    pipe = assemble_sdxl(seed, (tokenizer, tokenizer_2), configs, _unet, _vae, _scheduler())
    add_reserved_embeddings(pipe, seed)
    return pipe


def reserved_rows(encoder: CLIPTextModel, count: int, seed: int, index: int) -> torch.Tensor:
    """The initial embeddings of ``count`` reserved tokens of text encoder ``index`` (0 or 1): CLIP's own
    initialisation (normal, std ``0.02 * initializer_factor``) from a generator of their own, so the
    rest of the model's initialisation does not depend on them."""
    generator = torch.Generator().manual_seed(seed * 1000 + 700 + index)
    std = 0.02 * float(encoder.config.initializer_factor or 1.0)
    return torch.randn(count, encoder.config.hidden_size, generator=generator) * std


def add_reserved_embeddings(pipe: StableDiffusionXLPipeline, seed: int, scale: float = 1.0) -> None:
    """Give both text encoders rows for the tokenizers' reserved tokens (no-op when they have them):
    :func:`reserved_rows` times ``scale``. The recipe adds them at initialisation (``scale`` 1); no
    caption holds them, so training only shrinks them by AdamW's weight decay, as it shrinks every
    other unused token, which ``scripts/reserve_shapes_tokens.py`` measured to add them to the
    committed model."""
    for index, (tokenizer, encoder) in enumerate(
        ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
    ):
        old = encoder.get_input_embeddings().weight.detach()
        count = len(tokenizer) - old.shape[0]
        if count <= 0:
            continue
        rows = reserved_rows(encoder, count, seed, index).to(old.dtype) * scale
        weight = torch.cat([old, rows])
        encoder.set_input_embeddings(nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight.clone()))
        encoder.config.vocab_size = int(weight.shape[0])


def shapes_defaults(directory: str | Path = SHAPES_MODEL_DIR) -> dict[str, float | int]:
    """The generation defaults recorded next to a saved shapes model (steps, guidance, size)."""
    return dict(json.loads((Path(directory) / DEFAULTS_FILE).read_text(encoding="utf-8")))
