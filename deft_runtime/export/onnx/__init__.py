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

**Modules.** :mod:`.options` (what may be asked, errors), :mod:`.adapters` (``--adapter`` values, the
injected :class:`AdapterSource` for names, the merge), :mod:`.wrappers` and :mod:`.components` (per
architecture: the traced modules, their signatures and inputs), :mod:`.trace` (one file),
:mod:`.validation` (onnxruntime against torch), :mod:`.manifest` (the typed ``manifest.json``) and
:mod:`.exporter` (the stages in order).
"""

from deft_runtime.export.onnx.adapters import (
    AdapterSource,
    AdapterSpec,
    ResolvedAdapter,
    adapter_sha256,
    merge_adapters,
    resolve_adapter,
)
from deft_runtime.export.onnx.exporter import export_onnx
from deft_runtime.export.onnx.manifest import ExportResult, Manifest
from deft_runtime.export.onnx.options import (
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    MANIFEST_NAME,
    MAX_OPSET,
    MIN_OPSET,
    ExportOptions,
    OnnxExportError,
    OnnxValidationError,
)

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "MANIFEST_NAME",
    "MAX_OPSET",
    "MIN_OPSET",
    "AdapterSource",
    "AdapterSpec",
    "ExportOptions",
    "ExportResult",
    "Manifest",
    "OnnxExportError",
    "OnnxValidationError",
    "ResolvedAdapter",
    "adapter_sha256",
    "export_onnx",
    "merge_adapters",
    "resolve_adapter",
]
