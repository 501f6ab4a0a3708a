"""The torch modules that are traced: each architecture's denoiser (and text encoders, VAE decoder)
behind a ``forward`` of positional tensors with the graph's input names, and OmniGen's rotary
embedding rewritten so that tracing keeps its data-dependent branch."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["GraphRope", "OmniGenTransformer", "SdxlUNet", "TextEncoder", "VaeDecoder"]


class SdxlUNet(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[
            0
        ]


class GraphRope(nn.Module):
    """OmniGen's ``OmniGenSuScaledRotaryEmbedding`` with its long/short factor choice as a tensor op.

    The original picks ``long_factor`` with a Python ``if`` on ``max(position_ids)``, which tracing
    would freeze to whichever branch the example took. Same arithmetic otherwise."""

    short: torch.Tensor
    long: torch.Tensor

    def __init__(self, rope: Any) -> None:
        super().__init__()
        self.dim = int(rope.dim)
        self.base = float(rope.base)
        self.original = int(rope.original_max_position_embeddings)
        self.register_buffer("short", torch.tensor(rope.short_factor, dtype=torch.float32), persistent=False)
        self.register_buffer("long", torch.tensor(rope.long_factor, dtype=torch.float32), persistent=False)
        scale = rope.max_position_embeddings / rope.original_max_position_embeddings
        self.scaling = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(self.original))

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ext = torch.where(position_ids.max() + 1 > self.original, self.long, self.short)
        exponent = (
            torch.arange(0, self.dim, 2, dtype=torch.int64, device=hidden_states.device).float() / self.dim
        )
        inv_freq = 1.0 / (ext * self.base**exponent)
        inv = inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)[0]
        return emb.cos() * self.scaling, emb.sin() * self.scaling


class OmniGenTransformer(nn.Module):
    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        out = self.transformer(
            hidden_states, timestep, input_ids, [], {}, attention_mask, position_ids, return_dict=False
        )
        return out[0]


class TextEncoder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


class VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]  # type: ignore[operator]
