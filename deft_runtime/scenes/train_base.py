"""Train ``shapes-sdxl`` from scratch: ``python -m deft_runtime.scenes.train_base --out DIR``.

Four stages, all from one seed, on at most two CPU threads:

1. render the training scenes (the held-out 10% of combinations never appear);
2. train the x8 VAE on them (L1 + MSE reconstruction, a whisper of KL, and a colour anchor: latent
   channels 0-2 regress each 8x8 cell's mean colour), decoding the posterior mean (a fresh encoder's
   posterior noise would drown its signal), then encode every scene and
   set ``scaling_factor`` so latents have unit spread;
3. sharpen the decoder alone on the frozen encoder's latents (the latent space the UNet will learn
   is unchanged; the parser's verdict on VAE round trips, the ceiling of every later figure, is
   logged before and after);
4. train the UNet and both CLIP text encoders jointly on the denoising loss (epsilon prediction,
   min-SNR weighting, 10% of captions dropped to the all-zero embedding that SDXL's pipeline uses
   for classifier-free guidance), keeping an exponential moving average whose weights are saved.

``DIR/pipeline`` becomes an ordinary ``StableDiffusionXLPipeline`` directory plus ``deft.json`` (the
generation defaults); ``DIR/train_log.jsonl`` has one JSON object per logged step and per evaluation.
During stage 3 a checkpoint is saved to ``DIR/checkpoint`` every ``--checkpoint-every`` steps with a
quick parser evaluation of the EMA weights, so an interrupted run still leaves a model behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from tqdm import tqdm

from deft_runtime.models.shapes import DEFAULTS_FILE, build_shapes_sdxl
from deft_runtime.scenes.language import Scene, caption, sample_scene
from deft_runtime.scenes.quality import ATTRIBUTES, evaluate_pipeline, evaluation_scenes, score
from deft_runtime.scenes.render import render

__all__ = ["TrainBaseConfig", "encode_prompts", "main", "train_base"]


@dataclass(frozen=True)
class TrainBaseConfig:
    seed: int = 0
    threads: int = (
        2  # the recipe's machine has 2 cores; on a shared machine use 1 (two fighting is ~4x slower)
    )
    num_images: int = 24_000
    vae_steps: int = 2_000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    colour_anchor: float = 1.0
    decoder_steps: int = 1_500
    decoder_lr: float = 1e-3
    unet_steps: int = 4_000
    unet_batch: int = (
        128  # small forwards are overhead-bound on a CPU: 128 rows train ~1.6x faster per row than 32
    )
    unet_lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 500
    eval_scenes: int = 40
    log_every: int = 20
    steps: int = 50  # the generation defaults recorded in deft.json (= deft's SDXL defaults)
    guidance_scale: float = 5.0


class RunLog:
    """JSON lines to ``path`` (flushed per line) so a long run can be followed with ``tail -f``."""

    def __init__(self, path: Path) -> None:
        self.file: TextIO = path.open("a", encoding="utf-8")
        self.start = time.monotonic()

    def write(self, **record: Any) -> None:
        record["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def render_dataset(config: TrainBaseConfig) -> tuple[torch.Tensor, list[str]]:
    """``[N, 3, 64, 64]`` uint8 images and their captions, from the training combinations only."""
    rng = np.random.default_rng(config.seed)
    scenes: list[Scene] = [sample_scene(rng, held_out=False) for _ in range(config.num_images)]
    images = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).contiguous()
    return images, [caption(s) for s in scenes]


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + np.cos(np.pi * progress))


def train_vae(
    pipe: StableDiffusionXLPipeline, images: torch.Tensor, config: TrainBaseConfig, log: RunLog
) -> None:
    vae = pipe.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 10)
    bar = tqdm(range(config.vae_steps), desc="vae", dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * _cosine_lr(step, config.vae_steps, 50)
        index = torch.randint(len(images), (config.vae_batch,), generator=generator)
        x = _to_unit(images[index])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mode()).sample  # see the module docstring
        rec = (recon - x).pow(2).mean() + (recon - x).abs().mean()
        kl = posterior.kl().mean()
        # colour anchor: latent channels 0-2 regress each 8x8 cell's mean colour, so colour is in the
        # latent from the first steps (without it the encoder merged red/orange/yellow for 1600 steps)
        anchor = (posterior.mean[:, :3] - torch.nn.functional.avg_pool2d(x, 8)).pow(2).mean()
        loss = rec + config.colour_anchor * anchor + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % config.log_every == 0 or step == config.vae_steps - 1:
            bar.set_postfix(rec=f"{rec.item():.4f}")
            log.write(stage="vae", step=step, reconstruction=rec.item(), kl=kl.item())
    vae.eval()


def refine_decoder(
    pipe: StableDiffusionXLPipeline,
    images: torch.Tensor,
    latents: torch.Tensor,
    config: TrainBaseConfig,
    log: RunLog,
    on_checkpoint: Callable[[int], None] | None = None,
) -> None:
    """Train the decoder alone on the frozen encoder's latents (``latents`` as the UNet sees them).

    The joint VAE stage gets colours exact but rounds corners; the latent space is fixed once the
    UNet trains on it, so sharpening the decoder afterwards changes nothing the UNet relies on.
    """
    vae = pipe.vae
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.decoder_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 30)
    scaling = float(vae.config.scaling_factor)
    vae.decoder.train()
    for step in tqdm(range(config.decoder_steps), desc="decoder", dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = config.decoder_lr * _cosine_lr(step, config.decoder_steps, 20)
        index = torch.randint(len(images), (config.vae_batch,), generator=generator)
        x = _to_unit(images[index])
        recon = vae.decode(latents[index] / scaling).sample
        rec = (recon - x).pow(2).mean() + (recon - x).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        rec.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % config.log_every == 0 or step == config.decoder_steps - 1:
            log.write(stage="decoder", step=step, reconstruction=rec.item())
        if on_checkpoint is not None and (step + 1) % config.checkpoint_every == 0:
            vae.decoder.eval()
            on_checkpoint(step + 1)
            vae.decoder.train()
    vae.decoder.eval()


@torch.no_grad()
def log_roundtrip(pipe: StableDiffusionXLPipeline, log: RunLog, stage: str, count: int = 200) -> None:
    """Parse VAE round trips (encode, decode the mean) of ``count`` rendered scenes: the VAE's ceiling."""
    scenes = evaluation_scenes(count, seed=5)
    x = _to_unit(torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2))
    decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    pixels = decoded.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    summary = score(scenes, list(pixels)).summary()
    log.write(stage=f"{stage}-roundtrip", **{k: summary[k] for k in ATTRIBUTES})
    tqdm.write(f"{stage} round trip: {json.dumps({k: summary[k] for k in ATTRIBUTES})}")


@torch.no_grad()
def encode_dataset(pipe: StableDiffusionXLPipeline, images: torch.Tensor, log: RunLog) -> torch.Tensor:
    """Posterior means of every image; sets the VAE's ``scaling_factor`` so they have unit spread."""
    means = [
        pipe.vae.encode(_to_unit(chunk)).latent_dist.mean for chunk in tqdm(images.split(256), desc="encode")
    ]
    mean = torch.cat(means)
    scaling = float(1.0 / mean.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    log.write(stage="encode", scaling_factor=scaling, latent_mean=float(mean.mean()))
    return mean * scaling


def encode_prompts(
    pipe: StableDiffusionXLPipeline, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds [B, L, 128], pooled [B, 64])`` exactly as ``pipe.encode_prompt`` computes them, with grad."""
    hidden = []
    pooled = torch.empty(0)
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # text_encoder_2's projected pooled embedding (the loop's last value is kept)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


class EMA:
    """Exponential moving average of a set of parameters (warm-up: decay ramps from 0.9)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights in for the duration of the block."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)


def _denoiser_loss(
    pipe: StableDiffusionXLPipeline,
    x0: torch.Tensor,
    prompts: list[str],
    generator: torch.Generator,
    config: TrainBaseConfig,
    time_ids: torch.Tensor,
) -> torch.Tensor:
    batch = x0.shape[0]
    alphas = pipe.scheduler.alphas_cumprod
    t = torch.randint(0, len(alphas), (batch,), generator=generator)
    a = alphas[t].view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    embeds, pooled = encode_prompts(pipe, prompts)
    keep = (torch.rand(batch, generator=generator) >= config.caption_dropout).float()
    embeds, pooled = embeds * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)  # dropped = zeros, as in CFG
    pred = pipe.unet(
        noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(batch, -1)}
    ).sample
    snr = a.view(-1) / (1 - a.view(-1))
    weight = torch.clamp(snr, max=config.min_snr_gamma) / snr
    return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()


def _time_ids(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    size = int(pipe.default_sample_size * pipe.vae_scale_factor)
    return pipe._get_add_time_ids(
        (size, size),
        (0, 0),
        (size, size),
        dtype=torch.float32,
        text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim),
    )


def train_denoiser(
    pipe: StableDiffusionXLPipeline,
    latents: torch.Tensor,
    captions: list[str],
    config: TrainBaseConfig,
    out: Path,
    log: RunLog,
) -> EMA:
    text_params = [*pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()]
    unet_params = list(pipe.unet.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": unet_params, "lr": config.unet_lr}, {"params": text_params, "lr": config.text_lr}],
        weight_decay=0.01,
    )
    peaks = [config.unet_lr, config.text_lr]
    ema = EMA(unet_params + text_params, config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed + 20)
    time_ids = _time_ids(pipe)
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.train()
    bar = tqdm(range(config.unet_steps), desc="unet+text", dynamic_ncols=True)
    for step in bar:
        for group, peak in zip(optimizer.param_groups, peaks, strict=True):
            group["lr"] = peak * _cosine_lr(step, config.unet_steps, config.warmup_steps)
        index = torch.randint(len(captions), (config.unet_batch,), generator=generator)
        loss = _denoiser_loss(
            pipe, latents[index], [captions[i] for i in index.tolist()], generator, config, time_ids
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet_params + text_params, 1.0)
        optimizer.step()
        ema.update()
        if step % config.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.write(stage="unet", step=step, loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.unet_steps:
            with ema.applied():
                _checkpoint(pipe, config, out / "checkpoint", log, step + 1)
    return ema


def _checkpoint(
    pipe: StableDiffusionXLPipeline, config: TrainBaseConfig, target: Path, log: RunLog, step: int
) -> None:
    """Save the pipeline (atomically replacing ``target``) and log a quick parser evaluation."""
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    save_pipeline(pipe, config, target)
    scores = evaluate_pipeline(
        pipe,
        evaluation_scenes(config.eval_scenes, seed=1),
        steps=config.steps,
        guidance_scale=config.guidance_scale,
    )
    log.write(stage="eval", step=step, **scores.summary())
    tqdm.write(f"step {step}: {json.dumps(scores.summary())}")
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.train()


def save_pipeline(pipe: StableDiffusionXLPipeline, config: TrainBaseConfig, target: Path) -> None:
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    size = int(pipe.default_sample_size * pipe.vae_scale_factor)
    defaults = {
        "num_inference_steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "width": size,
        "height": size,
        "recipe": dataclasses.asdict(config),
    }
    (staging / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n", encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def train_base(config: TrainBaseConfig, out: Path) -> StableDiffusionXLPipeline:
    torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "train_log.jsonl")
    log.write(stage="start", config=dataclasses.asdict(config))
    pipe = build_shapes_sdxl(config.seed)
    pipe.set_progress_bar_config(disable=True)
    images, captions = render_dataset(config)
    log.write(stage="data", images=len(captions))
    train_vae(pipe, images, config, log)
    log_roundtrip(pipe, log, "vae")
    latents = encode_dataset(pipe, images, log)
    refine_decoder(
        pipe, images, latents, config, log, on_checkpoint=lambda _step: log_roundtrip(pipe, log, "decoder")
    )
    pipe.vae.save_pretrained(out / "vae-stage")  # inspectable while the denoiser trains
    ema = train_denoiser(pipe, latents, captions, config, out, log)
    with ema.applied():
        final = out / "pipeline"
        _checkpoint(pipe, config, final, log, config.unet_steps)
        ema_pipe = StableDiffusionXLPipeline.from_pretrained(final)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    log.write(stage="done")
    return ema_pipe


def _parse_args(argv: Sequence[str] | None) -> tuple[TrainBaseConfig, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m deft_runtime.scenes.train_base", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="run directory; the model lands in OUT/pipeline"
    )
    parser.add_argument("--pilot", action="store_true", help="a 2-3 minute smoke run of the whole recipe")
    for field in dataclasses.fields(TrainBaseConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None)
    args = parser.parse_args(argv)
    config = TrainBaseConfig()
    if args.pilot:
        config = dataclasses.replace(
            config,
            num_images=2000,
            vae_steps=60,
            decoder_steps=40,
            unet_steps=60,
            unet_batch=32,
            checkpoint_every=30,
            eval_scenes=16,
        )
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(config) if getattr(args, f.name) is not None
    }
    return dataclasses.replace(config, **overrides), args.out


def main(argv: Sequence[str] | None = None) -> None:
    config, out = _parse_args(argv)
    train_base(config, out)
    print(f"saved {out / 'pipeline'}")


if __name__ == "__main__":
    main()
