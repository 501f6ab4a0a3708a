"""One :class:`Component` per graph to export: the wrapped module, its input/output names and
dynamic axes, and how to make inputs of two shapes for tracing and validation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deft_runtime.export.onnx.options import ExportOptions, OnnxExportError
from deft_runtime.export.onnx.wrappers import GraphRope, OmniGenTransformer, SdxlUNet, TextEncoder, VaeDecoder


@dataclass
class Component:
    """One graph to export: a module taking positional tensors, and how to make inputs for it."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    #: ``(batch, variant)`` → inputs; variant 0 is the trace/first check, 1 a different shape
    make_inputs: Callable[[int, int, torch.Generator], tuple[torch.Tensor, ...]]
    #: the torch oracle on the same inputs (the module itself unless the export patches it)
    reference: Callable[..., tuple[torch.Tensor, ...]] | None = None
    #: swapped in only while tracing (e.g. a graph-friendly rotary embedding)
    export_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    #: output dims the tracer leaves symbolic although they are fixed (name → {axis: size})
    fixed_output_dims: dict[str, dict[int, int]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def _multiple_at_least(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def sdxl_unet(pipe: Any) -> Component:
    unet = pipe.unet
    cfg = unet.config
    if cfg.get("addition_embed_type") != "text_time":
        raise OnnxExportError(
            f"the UNet's addition_embed_type is {cfg.get('addition_embed_type')!r}; export supports SDXL "
            "UNets (text_time conditioning) and OmniGen"
        )
    pooled = int(pipe.text_encoder_2.config.projection_dim) if pipe.text_encoder_2 is not None else 1280
    n_time_ids = (int(cfg.projection_class_embeddings_input_dim) - pooled) // int(cfg.addition_time_embed_dim)
    factor = 2 ** (len(cfg.up_block_types) - 1)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else int(cfg.sample_size[0])
    side = _multiple_at_least(min(size, 64), factor)
    shapes = [(side, side, 77), (_multiple_at_least(side // 2, factor), side + factor, 40)]
    channels, width = int(cfg.in_channels), int(cfg.cross_attention_dim)

    def make_inputs(batch: int, variant: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        h, w, seq = shapes[variant]
        return (
            torch.randn(batch, channels, h, w, generator=g),
            torch.rand(batch, generator=g) * 999,
            torch.randn(batch, seq, width, generator=g),
            torch.randn(batch, pooled, generator=g),
            torch.randn(batch, n_time_ids, generator=g) * 512,
        )

    return Component(
        name="unet",
        module=SdxlUNet(unet),
        input_names=["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
        output_names=["noise_pred"],
        dynamic_axes={
            "sample": {0: "batch", 2: "height", 3: "width"},
            "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "text_embeds": {0: "batch"},
            "time_ids": {0: "batch"},
            "noise_pred": {0: "batch", 2: "height", 3: "width"},
        },
        make_inputs=make_inputs,
        notes={"spatial_multiple": factor, "timestep": "one value per row (broadcast a scalar t)"},
    )


def omnigen_transformer(pipe: Any) -> Component:
    transformer = pipe.transformer
    cfg = transformer.config
    p, channels = int(cfg.patch_size), int(cfg.in_channels)
    vocab, original = int(cfg.vocab_size), int(cfg.original_max_position_embeddings)
    side = _multiple_at_least(min(int(cfg.pos_embed_max_size) * p // 2, 64), p)
    # the second shape starts its positions past original_max_position_embeddings: the long rope factor
    shapes = [(side, side, 24, 0), (_multiple_at_least(side // 2, p), side + p, 9, original)]

    def make_inputs(batch: int, variant: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        h, w, text, offset = shapes[variant]
        seq = text + 1 + (h // p) * (w // p)
        mask = torch.tril(torch.ones(seq, seq))
        mask[text:, text:] = 1.0  # the time token and image tokens attend to each other
        return (
            torch.randn(batch, channels, h, w, generator=g),
            torch.rand(batch, generator=g),
            torch.randint(3, vocab, (batch, text), generator=g),
            mask.expand(batch, seq, seq).clone(),
            (torch.arange(seq) + offset).expand(batch, seq).clone(),
        )

    wrapper = OmniGenTransformer(transformer)

    @contextlib.contextmanager
    def graph_rope() -> Iterator[None]:
        original_rope = transformer.rope
        transformer.rope = GraphRope(original_rope)
        try:
            yield
        finally:
            transformer.rope = original_rope

    return Component(
        name="transformer",
        module=wrapper,
        input_names=["hidden_states", "timestep", "input_ids", "attention_mask", "position_ids"],
        output_names=["noise_pred"],
        dynamic_axes={
            "hidden_states": {0: "batch", 2: "height", 3: "width"},
            "timestep": {0: "batch"},
            "input_ids": {0: "batch", 1: "text_len"},
            "attention_mask": {0: "batch", 1: "seq", 2: "seq"},
            "position_ids": {0: "batch", 1: "seq"},
            "noise_pred": {0: "batch", 2: "height", 3: "width"},
        },
        make_inputs=make_inputs,
        reference=wrapper,
        export_context=graph_rope,
        fixed_output_dims={"noise_pred": {1: int(cfg.get("out_channels") or channels)}},
        notes={
            "spatial_multiple": p,
            "mode": "text-to-image only (no input images)",
            "seq": "text_len + 1 + (height/patch)*(width/patch)",
        },
    )


def text_encoder(pipe: Any, attribute: str, tokenizer_attribute: str) -> Component:
    encoder = getattr(pipe, attribute)
    tokenizer = getattr(pipe, tokenizer_attribute, None)
    length = int(getattr(tokenizer, "model_max_length", 77) or 77)
    length = min(length, int(encoder.config.max_position_embeddings))
    vocab, eos = int(encoder.config.vocab_size), encoder.config.eos_token_id
    pooled = "pooler_output" if attribute == "text_encoder" else "text_embeds"

    lengths = [length, max(2, length // 2 - 1)]

    def make_inputs(batch: int, variant: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocab, (batch, lengths[variant]), generator=g)
        if isinstance(eos, int) and 0 <= eos < vocab:  # CLIP pools at the (first) end-of-text token
            ids[:, 1 + variant :] = eos
        return (ids,)

    return Component(
        name=attribute,
        module=TextEncoder(encoder),
        input_names=["input_ids"],
        output_names=["last_hidden_state", "penultimate_hidden_state", pooled],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"},
            "penultimate_hidden_state": {0: "batch", 1: "sequence"},
            pooled: {0: "batch"},
        },
        make_inputs=make_inputs,
        notes={"sequence": f"at most {length}; the SDXL pipeline pads every prompt to {length} tokens"},
    )


def vae_decoder(pipe: Any) -> Component:
    vae = pipe.vae
    cfg = vae.config
    channels = int(cfg.latent_channels)
    scale = 2 ** (len(cfg.block_out_channels) - 1)
    side = max(8, min(int(cfg.sample_size) // scale, 32))
    shapes = [(side, side), (side // 2 + 2, side + 4)]

    def make_inputs(batch: int, variant: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        h, w = shapes[variant]
        return (torch.randn(batch, channels, h, w, generator=g),)

    notes: dict[str, Any] = {
        "scaling_factor": cfg.get("scaling_factor"),
        "shift_factor": cfg.get("shift_factor"),
        "input": "latents / scaling_factor (+ shift_factor where set), as the pipeline decodes them",
        "upscale": scale,
    }
    return Component(
        name="vae_decoder",
        module=VaeDecoder(vae),
        input_names=["latent_sample"],
        output_names=["sample"],
        dynamic_axes={
            "latent_sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
            "sample": {0: "batch", 2: "height", 3: "width"},
        },
        make_inputs=make_inputs,
        notes=notes,
    )


def components_for(pipe: Any, architecture: str, options: ExportOptions) -> list[Component]:
    """The graphs to export, in order (the denoiser first); refuses what the architecture lacks."""
    if architecture == "sdxl":
        components = [sdxl_unet(pipe)]
        if options.text_encoders:
            components += [
                text_encoder(pipe, "text_encoder", "tokenizer"),
                text_encoder(pipe, "text_encoder_2", "tokenizer_2"),
            ]
    elif architecture == "omnigen":
        if options.text_encoders:
            raise OnnxExportError(
                "OmniGen has no separate text encoder (its transformer embeds input_ids itself); "
                "drop --text-encoders"
            )
        components = [omnigen_transformer(pipe)]
    else:
        raise OnnxExportError(
            f"cannot export a {architecture} pipeline: supported are SDXL pipelines (UNet, CLIP text "
            "encoders, VAE decoder) and OmniGen (transformer, text-to-image, and VAE decoder)"
        )
    if options.vae_decoder:
        components.append(vae_decoder(pipe))
    return components
