"""Export a base model with adapters merged into its weights to ONNX (``deft export-onnx``).

What is written to the output folder (all float32, opset 17 by default)::

    unet.onnx | transformer.onnx    the denoiser, every adapter merged as W0 + weight·B·A
    text_encoder.onnx               SDXL only, with --text-encoders (CLIP-L)
    text_encoder_2.onnx             SDXL only, with --text-encoders (OpenCLIP-bigG, with projection)
    vae_decoder.onnx                with --vae-decoder
    manifest.json                   model, adapters (sha256, weight), files, inputs/outputs, validation

**Graph signatures** (symbolic dims are named; everything else is fixed):

- SDXL ``unet``: ``sample [batch, C, height, width]`` f32, ``timestep [batch]`` f32,
  ``encoder_hidden_states [batch, sequence, D]`` f32, ``text_embeds [batch, P]`` f32,
  ``time_ids [batch, T]`` f32 → ``noise_pred [batch, C, height, width]``. Batch, latent height/width
  and the text sequence length are all dynamic; ``height`` and ``width`` must be multiples of the
  UNet's overall up-sampling factor (``2**(len(up_blocks) - 1)``, 4 for SDXL: the manifest records
  it), because the graph is traced on the branch diffusers takes for such sizes.
- OmniGen ``transformer`` (text-to-image only: no input images): ``hidden_states [batch, C, height,
  width]`` f32, ``timestep [batch]`` f32, ``input_ids [batch, text_len]`` i64, ``attention_mask
  [batch, seq, seq]`` f32 (1 = attend), ``position_ids [batch, seq]`` i64, with ``seq = text_len + 1 +
  (height/p)·(width/p)`` → ``noise_pred``. The rotary embedding's long/short factor choice is made
  inside the graph (``torch.where``), not frozen at trace time.
- ``text_encoder`` / ``text_encoder_2``: ``input_ids [batch, 77]`` i64 (padded to the tokenizer's
  ``model_max_length``) → ``last_hidden_state``, ``penultimate_hidden_state`` (what SDXL conditions
  on) and ``pooler_output`` (encoder 1) or ``text_embeds`` (encoder 2, SDXL's pooled embedding).
- ``vae_decoder``: ``latent_sample [batch, C, latent_height, latent_width]`` (already divided by the
  VAE's ``scaling_factor``, recorded in the manifest) → ``sample [batch, 3, height, width]``.

**Exporter.** ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer). The ``torch.export``
based exporter (``dynamo=True``) was tried on torch 2.13: its native opset is 18, and asking for 17
runs a version converter whose output fails ``onnx.checker`` (``Split`` keeps the opset-18
``num_outputs`` attribute); it is also ~15x slower on the tiny UNet and needs hand-written
divisibility constraints for dynamic spatial dims. The tracer is exact for these graphs, whose only
Python control flow depends on shapes, which the validation below exercises at two shapes.

**Validation** (on by default): onnxruntime's CPU provider runs each file on seeded random inputs at
two batch sizes (1 and 3) and two spatial/sequence sizes, and compares with the torch module it was
exported from (adapters merged). A file passes when ``max|onnx − torch| ≤ tolerance · max(1,
max|torch|)``; the default tolerance is 1e-4 (fp32; measured errors on the tiny models are ~1e-6).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from deft_runtime import __version__
from deft_runtime.adapter import Adapter
from deft_runtime.compile import CompiledAdapter, compile_adapter, linear_weights, merge_into
from deft_runtime.errors import AdapterNotFound, DeftError
from deft_runtime.formats import DEFAULT_LIMITS, ReadLimits, load_adapter

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "MANIFEST_NAME",
    "MIN_OPSET",
    "AdapterSpec",
    "ExportResult",
    "OnnxExportError",
    "OnnxValidationError",
    "ResolvedAdapter",
    "adapter_sha256",
    "export_onnx",
    "merge_adapters",
    "resolve_adapter",
]

MIN_OPSET = 17
#: the newest opset the TorchScript exporter of the supported torch releases emits
MAX_OPSET = 20
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
MANIFEST_NAME = "manifest.json"
#: batch sizes every exported file is validated at (two, so a frozen batch axis cannot pass)
VALIDATION_BATCHES = (1, 3)
#: protobuf cannot hold a model above 2 GiB; larger ones keep their weights in ``<file>.data``
_EXTERNAL_DATA_BYTES = 1 << 30

Progress = Callable[[str], None]


class OnnxExportError(DeftError):
    """The export was refused or failed (unsupported model or option, exporter failure)."""


class OnnxValidationError(OnnxExportError):
    """onnxruntime's output differs from torch's by more than the tolerance."""


# ------------------------------------------------------------------------------------------ adapters


@dataclass(frozen=True)
class AdapterSpec:
    """One ``--adapter`` value: ``NAME_OR_PATH`` or ``NAME_OR_PATH:WEIGHT``."""

    source: str
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> AdapterSpec:
        """An existing path is taken whole (even with a ``:`` in it); otherwise a trailing
        ``:NUMBER`` is the weight."""
        if not spec:
            raise OnnxExportError("--adapter needs NAME_OR_PATH or NAME_OR_PATH:WEIGHT, got ''")
        if os.path.exists(os.path.expanduser(spec)):
            return cls(spec)
        head, sep, tail = spec.rpartition(":")
        if not sep:
            return cls(spec)
        try:
            weight = float(tail)
        except ValueError:
            raise OnnxExportError(
                f"--adapter {spec!r}: not an existing path, and {tail!r} after the last ':' is not a "
                "number; expected NAME_OR_PATH or NAME_OR_PATH:WEIGHT"
            ) from None
        if not head:
            raise OnnxExportError(f"--adapter {spec!r}: the name or path before ':' is empty")
        if not math.isfinite(weight):
            raise OnnxExportError(f"--adapter {spec!r}: the weight must be a finite number")
        return cls(head, weight)


@dataclass
class ResolvedAdapter:
    """An adapter read from disk or from a registry, with what the manifest records about it."""

    spec: AdapterSpec
    adapter: Adapter
    origin: Literal["path", "registry"]
    location: str  # absolute path, or the registry it was read from
    sha256: str  # content digest of the adapter's tensors (the same whatever the file format)
    source_sha256: str | None  # digest of the bytes on disk (file, or sorted directory tree)

    def manifest_entry(self) -> dict[str, Any]:
        a = self.adapter
        return {
            "source": self.spec.source,
            "origin": self.origin,
            "location": self.location,
            "weight": self.spec.weight,
            "kind": a.kind.value,
            "decomposition": a.decomposition.value if a.decomposition else None,
            "layers": len(a.layers),
            "ranks": sorted(set(a.ranks.values())),
            "sha256": self.sha256,
            "source_sha256": self.source_sha256,
        }


def adapter_sha256(adapter: Adapter) -> str:
    """sha256 over kind, decomposition and every layer's scale and tensors (dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(f"{adapter.kind.value}|{adapter.decomposition.value if adapter.decomposition else ''}".encode())
    for name in sorted(adapter.layers):
        layer = adapter.layers[name]
        h.update(f"\n{name}|{layer.scale!r}".encode())
        for role, t in layer.tensors().items():
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"|{role}:{t.dtype}:{list(t.shape)}:".encode())
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _path_sha256(path: Path) -> str:
    """A file's sha256, or for a directory the sha256 of ``relative/path  sha256`` lines, sorted."""
    if path.is_file():
        return _file_sha256(path)
    lines = [
        f"{p.relative_to(path).as_posix()}  {_file_sha256(p)}\n"
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def resolve_adapter(
    spec: AdapterSpec,
    *,
    data_dir: Path | None = None,
    registry: str | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
    unet_config: Mapping[str, Any] | None = None,
) -> ResolvedAdapter:
    """A path if ``spec.source`` exists on disk (any format ``load_adapter`` reads), else a name in
    the deft registry (``registry`` URL, or the SQLite registry in ``data_dir``)."""
    path = Path(spec.source).expanduser()
    if path.exists():
        adapter = load_adapter(path, limits=limits, unet_config=unet_config)
        return ResolvedAdapter(
            spec, adapter, "path", str(path.resolve()), adapter_sha256(adapter), _path_sha256(path)
        )
    neither = f"adapter {spec.source!r} is neither an existing file or directory"
    try:
        from deft_server.config import default_data_dir
        from deft_server.store import read_registered_adapter
    except ImportError as e:
        raise AdapterNotFound(
            f"{neither}, nor can it be looked up as a registered name: the registry is not available "
            f"here ({e}); install deft[server] or pass the adapter's path"
        ) from e
    folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    where = f"registry {registry}" if registry else f"the registry in {folder}"
    if registry is None and not folder.is_dir():
        raise AdapterNotFound(f"{neither} nor a registered name: {where} does not exist")
    try:
        adapter = read_registered_adapter(
            spec.source, data_dir=folder, registry=registry, limits=limits, unet_config=unet_config
        )
    except AdapterNotFound as e:
        raise AdapterNotFound(f"{neither} nor a name registered in {where} ({e})") from e
    raw = adapter.metadata.get("sha256") if adapter.metadata else None
    return ResolvedAdapter(spec, adapter, "registry", where, adapter_sha256(adapter), raw)


def merge_adapters(denoiser: nn.Module, adapters: Sequence[ResolvedAdapter]) -> list[CompiledAdapter]:
    """Merge every adapter into ``denoiser`` in place: ``W = W0 + Σ weight·B·A``.

    All adapters are compiled against the *unmerged* base first (a DEFT/PaRa update depends on W0),
    exactly as the serving path applies several adapters to one row."""
    compiled = []
    for resolved in adapters:
        try:
            base = linear_weights(denoiser, list(resolved.adapter.layers))
            compiled.append(compile_adapter(resolved.adapter, base))
        except DeftError as e:
            raise type(e)(f"adapter {resolved.spec.source!r}: {e}") from e
    for resolved, c in zip(adapters, compiled, strict=True):
        merge_into(denoiser, c, resolved.spec.weight)
    return compiled


# ---------------------------------------------------------------------------------------- components


@dataclass
class _Component:
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


class _SdxlUNet(nn.Module):
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


def _multiple_at_least(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def _sdxl_unet(pipe: Any) -> _Component:
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

    return _Component(
        name="unet",
        module=_SdxlUNet(unet),
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


class _GraphRope(nn.Module):
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


class _OmniGenTransformer(nn.Module):
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


def _omnigen_transformer(pipe: Any) -> _Component:
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

    wrapper = _OmniGenTransformer(transformer)

    @contextlib.contextmanager
    def graph_rope() -> Iterator[None]:
        original_rope = transformer.rope
        transformer.rope = _GraphRope(original_rope)
        try:
            yield
        finally:
            transformer.rope = original_rope

    return _Component(
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


class _TextEncoder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


def _text_encoder(pipe: Any, attribute: str, tokenizer_attribute: str) -> _Component:
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

    return _Component(
        name=attribute,
        module=_TextEncoder(encoder),
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


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]  # type: ignore[operator]


def _vae_decoder(pipe: Any) -> _Component:
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
    return _Component(
        name="vae_decoder",
        module=_VaeDecoder(vae),
        input_names=["latent_sample"],
        output_names=["sample"],
        dynamic_axes={
            "latent_sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
            "sample": {0: "batch", 2: "height", 3: "width"},
        },
        make_inputs=make_inputs,
        notes=notes,
    )


# -------------------------------------------------------------------------------------- export, check


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise OnnxExportError(
            f"ONNX export needs the 'onnx' extra (onnx, onnxscript, onnxruntime): pip install 'deft[onnx]' ({e})"
        ) from e
    return onnx, onnxruntime


def _export_one(component: _Component, path: Path, opset: int) -> None:
    """Trace ``component`` into ``path`` (weights beside it in ``<name>.onnx.data`` above 1 GiB)."""
    onnx, _ = _import_onnx()
    example = component.make_inputs(2, 0, torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix=f".{component.name}-", dir=path.parent) as tmp:
        raw = Path(tmp) / path.name
        try:
            with warnings.catch_warnings(), component.export_context(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings on shape-derived Python values
                torch.onnx.export(
                    component.module,
                    example,
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    input_names=component.input_names,
                    output_names=component.output_names,
                    dynamic_axes=component.dynamic_axes,
                    do_constant_folding=True,
                )
        except Exception as e:
            raise OnnxExportError(
                f"torch.onnx.export failed on {component.name}: {type(e).__name__}: {e}"
            ) from e
        # re-save in one place: either one self-contained file, or the graph plus one data file
        model = onnx.load(str(raw), load_external_data=True)
        for output in model.graph.output:
            for axis, size in component.fixed_output_dims.get(output.name, {}).items():
                output.type.tensor_type.shape.dim[axis].dim_value = size  # clears the auto dim_param
        weights = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        if weights >= _EXTERNAL_DATA_BYTES:
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def _io_spec(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs as the ONNX file declares them: name, element type, shape (dims by name)."""
    onnx, _ = _import_onnx()
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values: Any) -> list[dict[str, Any]]:
        rows = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
            rows.append(
                {
                    "name": v.name,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": dims,
                }
            )
        return rows

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def _validate(component: _Component, path: Path, tolerance: float) -> dict[str, Any]:
    """Run ``path`` in onnxruntime (CPU) at two batch sizes and shapes against the torch module."""
    _, ort = _import_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    reference = component.reference or component.module
    runs: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(1234)
    for variant, batch in enumerate(VALIDATION_BATCHES):
        inputs = component.make_inputs(batch, variant, g)
        with torch.no_grad():
            expected = reference(*inputs)
        expected_t = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {n: t.numpy() for n, t in zip(component.input_names, inputs, strict=True)})
        error, scale = 0.0, 0.0
        for name, want, have in zip(component.output_names, expected_t, got, strict=True):
            want_np = want.detach().float().numpy()
            if tuple(have.shape) != tuple(want_np.shape):
                raise OnnxValidationError(
                    f"{path.name}: output {name!r} has shape {list(have.shape)} in onnxruntime but "
                    f"{list(want_np.shape)} in torch (batch {batch})"
                )
            error = max(error, float(np.max(np.abs(have.astype(np.float64) - want_np))))
            scale = max(scale, float(np.max(np.abs(want_np))))
        bound = tolerance * max(1.0, scale)
        runs.append(
            {
                "batch": batch,
                "input_shapes": {
                    n: list(t.shape) for n, t in zip(component.input_names, inputs, strict=True)
                },
                "max_abs_error": error,
                "output_max_abs": scale,
                "bound": bound,
                "passed": bool(error <= bound),
            }
        )
    return {
        "provider": "CPUExecutionProvider",
        "rule": "max|onnx - torch| <= tolerance * max(1, max|torch|)",
        "tolerance": tolerance,
        "max_abs_error": max(r["max_abs_error"] for r in runs),
        "passed": all(r["passed"] for r in runs),
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------ the entry


@dataclass
class ExportResult:
    out_dir: Path
    manifest_path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.out_dir / entry["path"] for name, entry in self.manifest["files"].items()}


def _components(pipe: Any, architecture: str, text_encoders: bool, vae_decoder: bool) -> list[_Component]:
    if architecture == "sdxl":
        components = [_sdxl_unet(pipe)]
        if text_encoders:
            components += [
                _text_encoder(pipe, "text_encoder", "tokenizer"),
                _text_encoder(pipe, "text_encoder_2", "tokenizer_2"),
            ]
    elif architecture == "omnigen":
        if text_encoders:
            raise OnnxExportError(
                "OmniGen has no separate text encoder (its transformer embeds input_ids itself); "
                "drop --text-encoders"
            )
        components = [_omnigen_transformer(pipe)]
    else:
        raise OnnxExportError(
            f"cannot export a {architecture} pipeline: supported are SDXL pipelines (UNet, CLIP text "
            "encoders, VAE decoder) and OmniGen (transformer, text-to-image, and VAE decoder)"
        )
    if vae_decoder:
        components.append(_vae_decoder(pipe))
    return components


def export_onnx(
    model: str,
    out_dir: str | os.PathLike[str],
    *,
    adapters: Sequence[AdapterSpec | str] = (),
    text_encoders: bool = False,
    vae_decoder: bool = False,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    data_dir: Path | None = None,
    registry: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
    progress: Progress | None = None,
) -> ExportResult:
    """Export ``model``'s denoiser with ``adapters`` merged (and optionally its text encoders and VAE
    decoder) into ``out_dir``, validate each file with onnxruntime, and write ``manifest.json``.

    Raises :class:`OnnxValidationError` (after writing the manifest, which records the failure) when
    a file differs from torch by more than ``tolerance``."""
    from deft_runtime.models import architecture_of, denoiser_of, load_pipeline

    say = progress or (lambda _message: None)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise OnnxExportError(f"--tolerance must be a positive number, got {tolerance}")
    _import_onnx()
    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec.parse(a) for a in adapters]
    started = time.monotonic()

    say(f"loading {model}")
    pipe = load_pipeline(model, torch_dtype=torch.float32, device="cpu", cache_dir=cache_dir)
    architecture = architecture_of(pipe)
    components = _components(pipe, architecture, text_encoders, vae_decoder)  # refuse early
    denoiser = denoiser_of(pipe).eval()
    unet_config = dict(denoiser.config) if architecture == "sdxl" else None  # type: ignore[arg-type]
    resolved = []
    for spec in specs:
        say(f"reading adapter {spec.source}")
        resolved.append(
            resolve_adapter(
                spec, data_dir=data_dir, registry=registry, limits=limits, unet_config=unet_config
            )
        )
    if resolved:
        say(f"merging {len(resolved)} adapter(s) into the {components[0].name}")
        merge_adapters(denoiser, resolved)
    for module in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "vae")):
        if isinstance(module, nn.Module):
            module.eval()

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    failures = []
    for component in components:
        path = out / f"{component.name}.onnx"
        say(f"exporting {component.name} → {path}")
        t0 = time.monotonic()
        _export_one(component, path, opset)
        entry: dict[str, Any] = {"path": path.name, **_io_spec(path)}
        if path.with_name(path.name + ".data").exists():
            entry["external_data"] = path.name + ".data"
        entry["export_seconds"] = round(time.monotonic() - t0, 3)
        entry["notes"] = component.notes
        if validate:
            say(f"validating {component.name} with onnxruntime at batch sizes {list(VALIDATION_BATCHES)}")
            entry["validation"] = _validate(component, path, tolerance)
            if not entry["validation"]["passed"]:
                failures.append(f"{component.name}: max abs error {entry['validation']['max_abs_error']:.3g}")
        entry["sha256"] = _file_sha256(path)
        files[component.name] = entry

    manifest: dict[str, Any] = {
        "format": "deft.onnx-export",
        "format_version": 1,
        "deft_version": __version__,
        "torch_version": torch.__version__,
        "exporter": "torch.onnx.export (TorchScript tracer, dynamo=False)",
        "opset": opset,
        "dtype": "float32",
        "model": {"name": model, "architecture": architecture, "pipeline": type(pipe).__name__},
        "adapters": [r.manifest_entry() for r in resolved],
        "merge": "W = W0 + sum(weight * B @ A) per target Linear, every adapter compiled against W0",
        "files": files,
        "validation": None,
        "seconds": 0.0,
    }
    if validate:
        manifest["validation"] = {
            "rule": "max|onnx - torch| <= tolerance * max(1, max|torch|), per file and batch size",
            "tolerance": tolerance,
            "batch_sizes": list(VALIDATION_BATCHES),
            "max_abs_error": max(f["validation"]["max_abs_error"] for f in files.values()),
            "passed": not failures,
        }
    manifest["seconds"] = round(time.monotonic() - started, 3)
    manifest_path = out / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if failures:
        raise OnnxValidationError(
            f"onnxruntime output differs from torch beyond tolerance {tolerance:g} "
            f"(rule: max|onnx - torch| <= tolerance * max(1, max|torch|)): {'; '.join(failures)}. "
            f"Details in {manifest_path}"
        )
    return ExportResult(out, manifest_path, manifest)
