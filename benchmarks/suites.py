"""What the end-to-end suites share: presets, model shapes, synthetic adapters and server processes.

The suites (``adapters-scale``, ``mixed-vs-base``, ``cold-load``, ``memory``) drive real server
processes over loopback gRPC with :mod:`benchmarks.loadgen`: deft (``python -m deft_server``) and the
baseline (``python -m benchmarks.baseline_server``, diffusers + PEFT, one request at a time or grouped).

Two presets:

- ``tiny``: the built-in ``tiny-sdxl`` pipeline on this CPU machine (minutes);
- ``sdxl``: the real SDXL architecture (UNet, both CLIP text encoders, VAE at their real sizes) with
  random weights, built from configs written here (no download), in float16 on one CUDA GPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.formats import save_adapter
from deft_runtime.layers import DEFAULT_TARGETS, find_targets
from deft_runtime.testing import random_adapter

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
ServerKind = Literal["deft", "baseline", "baseline-grouped"]

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the fields that differ from diffusers'
# defaults, plus the ones that define the architecture), written here so nothing is downloaded.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),  # diffusers' legacy name: heads per level
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
#: Attention projections SDXL serving adapts: 70 transformer blocks x (attn1, attn2) x 4 = 560 Linears.
SDXL_TARGET_COUNT = 560
SDXL_UNET_PARAMETERS = 2_567_463_684
# The two text encoders at their real widths and depths (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14).


class TextEncoderSize(NamedTuple):
    hidden: int
    intermediate: int
    layers: int
    heads: int
    act: str


SDXL_TEXT_ENCODERS = (
    TextEncoderSize(hidden=768, intermediate=3072, layers=12, heads=12, act="quick_gelu"),
    TextEncoderSize(hidden=1280, intermediate=5120, layers=32, heads=20, act="gelu"),
)
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


# ------------------------------------------------------------------------------------------ presets


@dataclass(frozen=True)
class Preset:
    """One size of the end-to-end suites: the model, the workload mix and how much of it to run."""

    name: str
    model: Literal["tiny-sdxl", "sdxl"]
    device: str
    dtype: str
    #: torch threads of every server process (None: torch's default). One thread on a shared 2-core
    #: machine: with two, a busy neighbour makes OpenMP barriers spin and timings swing by 10x.
    threads: int | None
    steps: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    ranks: tuple[int, ...]
    guidance: float
    requests: int  # per measured run
    adapter_counts: tuple[int, ...]
    baseline_max_adapters: int  # the baseline runs only at N up to this
    load: float  # offered load as a multiple of one-at-a-time capacity (>1: overload, measures capacity)
    mixed_adapters: int  # mixed-vs-base: registered adapters
    mixed_rounds: int
    cold_adapters: int
    deft_flags: tuple[str, ...] = ()
    baseline_flags: tuple[str, ...] = ()
    max_group: int = 8  # grouped baseline: images per pipeline call (16 CFG rows = deft's max batch)
    run_timeout_s: float = 600.0

    def describe(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        model="tiny-sdxl",
        device="cpu",
        dtype="float32",
        threads=1,
        steps=(4, 8, 12),
        sizes=((64, 64), (32, 32)),
        ranks=(4, 4, 8, 8, 16),  # mostly small ranks, cycled over the adapters
        guidance=5.0,
        requests=30,
        adapter_counts=(1, 10, 100, 1000),
        baseline_max_adapters=1000,
        load=4.0,
        mixed_adapters=100,
        mixed_rounds=4,
        cold_adapters=8,
        deft_flags=("--backend", "torch"),
    ),
    "sdxl": Preset(
        name="sdxl",
        model="sdxl",
        device="cuda",
        dtype="float16",
        threads=None,
        steps=(8, 16),
        sizes=((1024, 1024), (768, 768)),
        ranks=(4, 8, 16),
        guidance=5.0,
        requests=12,
        adapter_counts=(1, 10, 100),
        baseline_max_adapters=100,
        load=4.0,
        mixed_adapters=48,
        mixed_rounds=1,
        cold_adapters=3,
        deft_flags=(
            "--adapter-memory",
            "16GiB",
            "--max-resident-adapters",
            "128",
            "--max-upload-size",
            "2GiB",
        ),
        baseline_flags=("--max-upload-size", "2GiB"),
        run_timeout_s=240.0,
    ),
}


def preset_argument(parser: Any) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")


# ------------------------------------------------------------------------------------- SDXL model


def build_sdxl_unet(
    device: str | torch.device = "meta", dtype: torch.dtype = torch.float32
) -> UNet2DConditionModel:
    """SDXL's UNet (2.57 B parameters) with random weights; on ``meta`` it costs no memory."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return unet if dtype == torch.float32 else unet.to(dtype)


def build_random_sdxl_pipeline(device: str = "cuda", dtype: torch.dtype = torch.float16) -> Any:
    """The whole SDXL pipeline at its real sizes, random weights, built on ``device`` (fast on a GPU).

    Tokenizers are the tiny local ones (no download), so the token embeddings are narrower than the
    real vocabulary; every other shape is SDXL's.
    """
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from deft_runtime.models.tiny import build_clip_tokenizer

    tokenizers = build_clip_tokenizer("<|endoftext|>"), build_clip_tokenizer("!")
    configs = [
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=enc.hidden,
            intermediate_size=enc.intermediate,
            num_hidden_layers=enc.layers,
            num_attention_heads=enc.heads,
            hidden_act=enc.act,
            projection_dim=enc.hidden,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        for tok, enc in zip(tokenizers, SDXL_TEXT_ENCODERS, strict=True)
    ]
    torch.manual_seed(0)
    with torch.device(device):
        text_encoder = CLIPTextModel(configs[0])
        text_encoder_2 = CLIPTextModelWithProjection(configs[1])
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    unet = build_sdxl_unet(device, torch.float32)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    for module in (text_encoder, text_encoder_2, vae, unet):
        module.eval()
    return pipe.to(dtype=dtype)


def ensure_model(preset: Preset, cache_dir: Path) -> str:
    """What the servers get as ``--model``: ``tiny-sdxl``, or a saved random SDXL pipeline directory."""
    if preset.model == "tiny-sdxl":
        return "tiny-sdxl"
    target = cache_dir / "sdxl-random-v1"
    if not (target / "model_index.json").is_file():
        pipe = build_random_sdxl_pipeline(preset.device, getattr(torch, preset.dtype))
        pipe.save_pretrained(target, safe_serialization=True)
        del pipe
    return str(target)


def target_shapes(model: str) -> dict[str, tuple[int, int]]:
    """Adapter target layers of ``model`` (``tiny-sdxl`` or ``sdxl``): module path → ``(d_out, d_in)``."""
    if model == "sdxl":
        unet = build_sdxl_unet("meta")
    elif model == "tiny-sdxl":
        from deft_runtime.models import build_tiny_sdxl

        unet = build_tiny_sdxl(0).unet
    else:
        raise ValueError(f"no target shapes known for {model!r}; use tiny-sdxl or sdxl")
    return {name: (m.out_features, m.in_features) for name, m in find_targets(unet, DEFAULT_TARGETS).items()}


# ------------------------------------------------------------------------------ synthetic adapters


def adapter_name(index: int, prefix: str = "bench") -> str:
    return f"{prefix}-{index:04d}"


def write_peft_adapters(
    shapes: Mapping[str, tuple[int, int]],
    indices: Sequence[int],
    ranks: Sequence[int],
    root: Path,
    *,
    prefix: str = "bench",
    magnitude: float = 0.05,
) -> dict[str, Path]:
    """Seeded DEFT (relu) adapters as PEFT directories, rank ``ranks[i % len(ranks)]`` for index ``i``.

    PEFT directories are what both servers accept and what PEFT itself loads, so deft and the
    baseline serve byte-identical uploads. Existing directories are reused.
    """
    out = {}
    for i in indices:
        name = adapter_name(i, prefix)
        path = root / name
        if not (path / "adapter_model.safetensors").is_file():
            adapter = random_adapter(
                AdapterKind.DEFT,
                shapes,
                rank=ranks[i % len(ranks)],
                decomposition=Decomposition.RELU,
                seed=10_000 + i,
                magnitude=magnitude,
            )
            save_adapter(adapter, path, format="peft")
        out[name] = path
    return out


# ---------------------------------------------------------------------------------- server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A deft or baseline server on free loopback ports, logging to ``log_path``."""

    kind: ServerKind
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path
    data_dir: Path
    command: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        from deft_client import DeftClient, DeftError

        end = time.monotonic() + timeout_s
        with DeftClient(self.address) as client:
            while time.monotonic() < end:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.kind} server exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                try:
                    client.wait_ready(timeout=2)
                    return
                except DeftError:
                    continue
        raise TimeoutError(f"{self.kind} server not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def server_env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def start_server(
    kind: ServerKind, preset: Preset, model: str, workdir: Path, *, extra: Sequence[str] = ()
) -> ServerProcess:
    """Start (without waiting) one server process for ``preset`` with its data and log under ``workdir``."""
    port, metrics_port = free_port(), free_port()
    data_dir = workdir / f"{kind}-data-{port}"
    common = ["--model", model, "--port", str(port), "--data-dir", str(data_dir), "--device", preset.device]
    common += ["--dtype", preset.dtype]
    if kind == "deft":
        command = [sys.executable, "-m", "deft_server", *common, "--metrics-port", str(metrics_port)]
        command += ["--http-port", "0"]  # benchmarks measure gRPC; several servers must not share port 8000
        command += ["--log-level", "WARNING", *preset.deft_flags]
    else:
        command = [sys.executable, "-m", "benchmarks.baseline_server", *common, *preset.baseline_flags]
        if kind == "baseline-grouped":
            command += ["--grouped", "--max-group", str(preset.max_group)]
    command += list(extra)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{kind}-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=server_env(preset.threads), cwd=ROOT
        )
    return ServerProcess(kind, process, port, metrics_port, log_path, data_dir, command)


@contextlib.contextmanager
def running_servers(
    kinds: Sequence[ServerKind],
    preset: Preset,
    model: str,
    workdir: Path,
    extra: Mapping[ServerKind, Sequence[str]] | None = None,
) -> Iterator[dict[ServerKind, ServerProcess]]:
    """Start every server in ``kinds`` at once (they load in parallel), wait for all, stop all at the end."""
    servers: dict[ServerKind, ServerProcess] = {}
    try:
        for kind in kinds:
            servers[kind] = start_server(kind, preset, model, workdir, extra=(extra or {}).get(kind, ()))
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


# ------------------------------------------------------------------------------------------ reporting


def environment(preset: Preset) -> dict[str, Any]:
    """Machine info plus the versions and settings every end-to-end report records."""
    import diffusers
    import grpc
    import peft

    from benchmarks.common import machine_info

    device = torch.device(preset.device if torch.cuda.is_available() or preset.device == "cpu" else "cpu")
    return {
        **machine_info(device),
        **source_tree(),
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "grpcio": grpc.__version__,
        "server_torch_threads": preset.threads or "torch default",
    }


def source_tree() -> dict[str, Any]:
    """The commit measured, and the tracked files that differed from it (results of a dirty tree say so)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"git_commit": git("rev-parse", "HEAD").strip() or "unknown", "git_modified_files": changed}


def judge(measured: float | None, threshold: float, *, at_most: bool = False) -> dict[str, Any]:
    """A target's verdict: met or not, and by how much it is missed (relative to the threshold)."""
    if measured is None or measured != measured:
        return {"measured": None, "threshold": threshold, "met": False, "verdict": "not measured"}
    met = measured <= threshold if at_most else measured >= threshold
    sign = "≤" if at_most else "≥"
    if met:
        verdict = f"met ({measured:.3g} {sign} {threshold:g})"
    else:
        gap = (measured / threshold - 1.0) if at_most else (1.0 - measured / threshold)
        verdict = f"MISSED by {100 * gap:.1f}% ({measured:.3g}, needs {sign} {threshold:g})"
    return {"measured": measured, "threshold": threshold, "at_most": at_most, "met": met, "verdict": verdict}


def single_request_seconds(address: str, preset: Preset, repeats: int = 1) -> float:
    """Mean seconds of one request alone (each step count x size, no adapter): one-at-a-time capacity.

    A one-step request per size warms the server up first and is not counted.
    """
    from deft_client import DeftClient

    shapes = [(s, w, h) for s in preset.steps for (w, h) in preset.sizes]
    with DeftClient(address, timeout=preset.run_timeout_s) as client:
        for w, h in preset.sizes:
            client.generate("warm-up", steps=1, width=w, height=h, seed=0, guidance_scale=preset.guidance)
        start = time.perf_counter()
        for _ in range(repeats):
            for steps, w, h in shapes:
                client.generate(
                    "calibration", steps=steps, width=w, height=h, seed=1, guidance_scale=preset.guidance
                )
        return (time.perf_counter() - start) / (repeats * len(shapes))


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
