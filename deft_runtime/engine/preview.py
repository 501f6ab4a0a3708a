"""Cheap low-resolution previews: a linear latent→RGB projection fitted to the model's own VAE.

Decoding with the VAE every few steps would cost as much as a denoising step. Instead, the first time
a preview is asked for, a handful of random latents are decoded once and a least-squares map
``rgb ≈ M·z + b`` (per latent pixel, ``z`` of C channels) is fitted against the decoded images averaged
down to latent resolution. A preview is then one tiny matmul, at latent resolution, for any family.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class LatentPreviewer:
    def __init__(
        self, pipe: Any, family: Any, device: torch.device, *, fit_samples: int = 4, fit_side: int = 8
    ) -> None:
        self.pipe = pipe
        self.family = family
        self.device = device
        self.fit_samples = fit_samples
        self.fit_side = fit_side
        self._map: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def _fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.family.latent_channels()
        g = torch.Generator("cpu").manual_seed(0)
        z = torch.randn(self.fit_samples, c, self.fit_side, self.fit_side, generator=g)
        with torch.no_grad():
            images = self.family.decode(z.to(self.device))
        rgb = torch.stack(
            [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images]
        )
        rgb = F.adaptive_avg_pool2d(rgb, self.fit_side)  # [N, 3, s, s], one RGB value per latent pixel
        X = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, c), torch.ones(z.numel() // c, 1)], dim=1)
        Y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(X, Y).solution  # [c + 1, 3]
        return solution[:c], solution[c]

    def preview(self, latents: torch.Tensor) -> Image.Image:
        """A PIL image (latent resolution) of the first image in ``latents`` ``[n, C, h, w]``."""
        with self._lock:
            if self._map is None:
                self._map = self._fit()
        M, b = self._map
        z = latents[0].detach().float().cpu().permute(1, 2, 0)  # [h, w, C]
        rgb = (z @ M + b).clamp(0, 1)
        return Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8))
