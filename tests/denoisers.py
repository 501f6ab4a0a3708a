"""Tiny denoisers and matching inputs shared by tests (built once per process; never downloaded)."""

from __future__ import annotations

import functools

import torch

from deft_runtime.models import build_tiny_omnigen, build_tiny_sdxl


@functools.cache
def tiny_sdxl():
    return build_tiny_sdxl(seed=0)


@functools.cache
def tiny_omnigen():
    return build_tiny_omnigen(seed=0)


def sdxl_inputs(unet, rows: int = 2, side: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    text_proj = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {
        "sample": torch.randn(rows, cfg.in_channels, side, side, generator=g),
        "timestep": torch.linspace(999, 1, rows).round().long(),
        "encoder_hidden_states": torch.randn(rows, 77, cfg.cross_attention_dim, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(rows, text_proj, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * rows),
        },
    }


def omnigen_inputs(transformer, rows: int = 2, side: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    n_text = 6
    seq = n_text + 1 + (side // cfg.patch_size) ** 2  # text tokens, time token, image patches
    return {
        "hidden_states": torch.randn(rows, cfg.in_channels, side, side, generator=g),
        "timestep": torch.linspace(0.9, 0.1, rows),
        "input_ids": torch.randint(0, 50, (rows, n_text), generator=g),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": torch.ones(rows, seq, seq),
        "position_ids": torch.arange(seq).repeat(rows, 1),
    }


def sdxl_unet_and_inputs(rows: int = 2, side: int = 16):
    unet = tiny_sdxl().unet.eval()
    return unet, sdxl_inputs(unet, rows, side)


def omnigen_transformer_and_inputs(rows: int = 2, side: int = 16):
    transformer = tiny_omnigen().transformer.eval()
    return transformer, omnigen_inputs(transformer, rows, side)


DENOISERS = {"sdxl": sdxl_unet_and_inputs, "omnigen": omnigen_transformer_and_inputs}


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def select_rows(inputs: dict, rows: list[int]) -> dict:
    """The same inputs restricted to some batch rows (recursively through dicts; lists untouched)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            out[key] = select_rows(value, rows) if value else value
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value[rows]
        else:
            out[key] = value
    return out
