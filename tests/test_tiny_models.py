"""The built-in tiny pipelines and the model loader.

Everything else in the suite stands on these models, so this file pins down what the rest assumes:
bit-exact seeding, a lossless save/load round trip, real end-to-end generation in which the prompt
matters, and the exact ``nn.Linear`` module names adapters target.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, OmniGenPipeline, StableDiffusionXLPipeline
from PIL import Image

from deft_runtime.errors import ModelLoadError
from deft_runtime.models import (
    TINY_MODELS,
    architecture_of,
    build_tiny_omnigen,
    build_tiny_sdxl,
    denoiser_of,
    ensure_omnigen_support,
    ensure_tiny_model,
    load_pipeline,
    loading,
    tiny,
)

NAMES = sorted(TINY_MODELS)
# OmniGenPipeline hard-codes its default size (256 px here), so generation tests ask for 64 px.
SIZE_KWARGS: dict[str, dict[str, int]] = {"tiny-sdxl": {}, "tiny-omnigen": {"height": 64, "width": 64}}
EXPECTED_CLASS = {"tiny-sdxl": StableDiffusionXLPipeline, "tiny-omnigen": OmniGenPipeline}
DENOISER_DIR = {"tiny-sdxl": "unet", "tiny-omnigen": "transformer"}


@pytest.fixture(autouse=True)
def _offline_and_private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never touch the network or the user's real cache, whatever a test does.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the constant is patched as well.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("DEFT_CACHE_DIR", str(tmp_path / "env-cache"))


@pytest.fixture(scope="module")
def built() -> dict[str, DiffusionPipeline]:
    """One seed-0 build of each tiny model, shared by the read-only tests."""
    return {name: TINY_MODELS[name](0) for name in NAMES}


def _module_state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every tensor of every nn.Module component, keyed ``component.param``."""
    state: dict[str, torch.Tensor] = {}
    for component_name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for key, value in component.state_dict().items():
                state[f"{component_name}.{key}"] = value
    return state


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    worst = {key: (a[key].double() - b[key].double()).abs().max().item() for key in different[:5]}
    assert not different, f"{len(different)} tensors differ, e.g. (max abs diff) {worst}"


def _generate(pipe: DiffusionPipeline, name: str, prompt: str, seed: int = 0) -> np.ndarray:
    result = pipe(
        prompt=prompt,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **SIZE_KWARGS[name],
    )
    return np.asarray(result.images)


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def test_registry_names_builders_and_classes(built: dict[str, DiffusionPipeline]) -> None:
    assert set(TINY_MODELS) == {"tiny-sdxl", "tiny-omnigen"}
    assert TINY_MODELS["tiny-sdxl"] is build_tiny_sdxl
    assert TINY_MODELS["tiny-omnigen"] is build_tiny_omnigen
    for name, pipe in built.items():
        assert type(pipe) is EXPECTED_CLASS[name]
    assert architecture_of(built["tiny-sdxl"]) == "sdxl"
    assert architecture_of(built["tiny-omnigen"]) == "omnigen"


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_is_bit_identical_and_other_seed_differs(name: str) -> None:
    builder: Callable[[int], DiffusionPipeline] = TINY_MODELS[name]
    first, again, other = builder(3), builder(3), builder(4)
    _assert_same_tensors(_module_state(first), _module_state(again))
    first_state, other_state = _module_state(first), _module_state(other)
    assert first_state.keys() == other_state.keys()
    # Every randomly initialised tensor must change with the seed (constants such as norm weights
    # and the sin-cos position table do not depend on it).
    random_keys = [
        key
        for key, value in first_state.items()
        if value.is_floating_point() and value.std() > 0 and "pos_embed" not in key
    ]
    unchanged = [key for key in random_keys if torch.equal(first_state[key], other_state[key])]
    assert len(random_keys) > 20 and not unchanged, unchanged[:5]


def test_sdxl_geometry_and_conditioning_dims(built: dict[str, DiffusionPipeline]) -> None:
    pipe = built["tiny-sdxl"]
    unet = pipe.unet.config
    assert pipe.vae_scale_factor == 2 and pipe.default_sample_size * pipe.vae_scale_factor == 64
    assert unet.addition_embed_type == "text_time"
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == hidden
    expected_add = 6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == expected_add
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        assert encoder.config.vocab_size == len(tokenizer)
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        assert tokenizer.model_max_length == encoder.config.max_position_embeddings == 77
    assert pipe.tokenizer_2.pad_token == "!"
    scheduler = pipe.scheduler.config
    assert (scheduler.beta_schedule, scheduler.timestep_spacing, scheduler.steps_offset) == (
        "scaled_linear",
        "leading",
        1,
    )


def test_omnigen_pos_embed_is_diffusers_table_computed_reproducibly(
    built: dict[str, DiffusionPipeline],
) -> None:
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    transformer = built["tiny-omnigen"].transformer
    size, hidden = transformer.config.pos_embed_max_size, transformer.config.hidden_size
    table = tiny.sincos_pos_embed_table(hidden, size)
    assert torch.equal(transformer.patch_embedding.pos_embed, table)
    reference = get_2d_sincos_pos_embed(hidden, size, base_size=64, output_type="pt").float().unsqueeze(0)
    torch.testing.assert_close(table, reference, rtol=0, atol=1e-6)


def test_omnigen_tokenizer_matches_transformer_and_processor(built: dict[str, DiffusionPipeline]) -> None:
    pipe = built["tiny-omnigen"]
    tokenizer, config = pipe.tokenizer, pipe.transformer.config
    assert config.vocab_size == len(tokenizer)
    assert config.pad_token_id == tokenizer.pad_token_id == 2  # the id OmniGen's collator pads with
    text = pipe.multimodal_processor.add_prefix_instruction("a dog")
    ids = tokenizer(text).input_ids
    assert ids[0] == 1  # BOS, which the processor strips from later prompt chunks
    for marker in ("<|user|>", "<|assistant|>", "<|end|>", "<|diffusion|>"):
        assert tokenizer.convert_tokens_to_ids(marker) in ids, marker
    assert tokenizer.decode(ids, skip_special_tokens=True).strip().endswith("a dog")
    assert max(ids) < config.vocab_size


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_generates_deterministic_prompt_dependent_images(
    name: str, built: dict[str, DiffusionPipeline]
) -> None:
    pipe = built[name]
    image = _generate(pipe, name, "a photo of a dog")
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.01  # not a blank image
    np.testing.assert_array_equal(image, _generate(pipe, name, "a photo of a dog"))
    other_prompt = _generate(pipe, name, "an oil painting of a red bicycle")
    assert np.abs(image - other_prompt).max() > 1e-3, "the prompt does not reach the denoiser"
    other_seed = _generate(pipe, name, "a photo of a dog", seed=1)
    assert np.abs(image - other_seed).max() > 1e-3


def test_omnigen_default_size_and_image_conditioning(built: dict[str, DiffusionPipeline]) -> None:
    pipe = built["tiny-omnigen"]
    assert pipe.default_sample_size * pipe.vae_scale_factor == 256  # fixed by diffusers, see tiny.py
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    result = pipe(
        prompt="<img><|image_1|></img> make it blue",
        input_images=[picture],
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert result.images.shape == (1, 64, 64, 3) and np.isfinite(result.images).all()


def test_omnigen_image_transform_matches_torchvision_semantics() -> None:
    """The stand-in transforms (used when torchvision is absent) crop to 16 px and map to [-1, 1]."""
    ensure_omnigen_support()
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenMultiModalProcessor

    processor = OmniGenMultiModalProcessor(text_tokenizer=None, max_image_size=1024)
    tensor = processor.process_image(Image.new("RGB", (40, 36), (255, 0, 51)))
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[:, 5, 7], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]))


# --------------------------------------------------------------------------------------------------
# Adapter target modules
# --------------------------------------------------------------------------------------------------


def test_sdxl_unet_attention_projections_are_linear(built: dict[str, DiffusionPipeline]) -> None:
    unet = built["tiny-sdxl"].unet
    modules = dict(unet.named_modules())
    attention_names = [name for name in modules if re.fullmatch(r".*transformer_blocks\.\d+\.attn[12]", name)]
    assert len(attention_names) == 12
    for attn in attention_names:
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            assert isinstance(modules[f"{attn}.{projection}"], torch.nn.Linear), f"{attn}.{projection}"
        channels = modules[f"{attn}.to_q"].in_features
        kv_in = unet.config.cross_attention_dim if attn.endswith("attn2") else channels
        assert modules[f"{attn}.to_k"].in_features == modules[f"{attn}.to_v"].in_features == kv_in
        assert modules[f"{attn}.to_out.0"].out_features == channels
    assert unet.config.cross_attention_dim != 64  # keeps cross-attention to_k/to_v non-square


def test_omnigen_attention_projections_are_linear(built: dict[str, DiffusionPipeline]) -> None:
    transformer = built["tiny-omnigen"].transformer
    modules = dict(transformer.named_modules())
    hidden = transformer.config.hidden_size
    for layer in range(transformer.config.num_layers):
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            module = modules[f"layers.{layer}.self_attn.{projection}"]
            assert isinstance(module, torch.nn.Linear)
            assert (module.in_features, module.out_features) == (hidden, hidden)


def test_module_names_documented_in_tiny_docstring_exist(built: dict[str, DiffusionPipeline]) -> None:
    """Other modules copy target names from ``tiny.py``'s docstring, so keep it truthful."""
    doc = tiny.__doc__ or ""
    pattern = re.compile(r"^\s{4}([\w.]+)\s+in (\d+) -> out (\d+)", re.MULTILINE)
    listed = pattern.findall(doc)
    assert len(listed) >= 10
    modules = {name: dict(denoiser_of(pipe).named_modules()) for name, pipe in built.items()}
    for path, in_features, out_features in listed:
        owner = "tiny-sdxl" if "blocks" in path else "tiny-omnigen"
        module = modules[owner][path]
        assert isinstance(module, torch.nn.Linear), path
        assert (module.in_features, module.out_features) == (int(in_features), int(out_features)), path


# --------------------------------------------------------------------------------------------------
# Cache and loading
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name: str, tmp_path: Path, built: dict[str, DiffusionPipeline]) -> None:
    directory = ensure_tiny_model(name, tmp_path)
    assert directory == tmp_path / f"{name}-v1"
    assert (directory / "model_index.json").is_file()
    assert (directory / DENOISER_DIR[name] / "diffusion_pytorch_model.safetensors").is_file()
    assert (directory / "tokenizer" / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory.name]  # no staging leftovers

    loaded = load_pipeline(name, cache_dir=tmp_path)
    assert type(loaded) is EXPECTED_CLASS[name]
    _assert_same_tensors(denoiser_of(loaded).state_dict(), denoiser_of(built[name]).state_dict())
    _assert_same_tensors(_module_state(loaded), _module_state(built[name]))
    # Tokenizers and schedulers survive too: the loaded pipeline draws the same image. Not bit-exact:
    # the same weights in freshly allocated tensors can take other SIMD paths (seen: 7e-7 apart on an
    # AVX-512 EPYC); a wrong tokenizer or scheduler moves pixels by far more than float32 rounding.
    np.testing.assert_allclose(
        _generate(loaded, name, "a dog"), _generate(built[name], name, "a dog"), rtol=0, atol=1e-5
    )

    by_path = load_pipeline(str(directory))
    assert architecture_of(by_path) == architecture_of(loaded)


def test_ensure_reuses_cache_and_honours_env(tmp_path: Path) -> None:
    directory = ensure_tiny_model("tiny-omnigen")
    assert directory == tmp_path / "env-cache" / "tiny-omnigen-v1"
    index = directory / "model_index.json"
    stamp = index.stat().st_mtime_ns
    assert ensure_tiny_model("tiny-omnigen") == directory
    assert index.stat().st_mtime_ns == stamp


def test_losing_a_cache_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate another process finishing first: our copy is discarded, theirs is returned intact."""
    directory = ensure_tiny_model("tiny-omnigen", tmp_path)
    stamp = (directory / "model_index.json").stat().st_mtime_ns
    real_check = loading._is_saved_pipeline
    calls: list[Path] = []

    def miss_first_check(path: Path) -> bool:
        calls.append(path)
        return len(calls) > 1 and real_check(path)

    monkeypatch.setattr(loading, "_is_saved_pipeline", miss_first_check)
    assert ensure_tiny_model("tiny-omnigen", tmp_path) == directory
    assert len(calls) == 2  # it really built a second copy and tried to publish it
    assert (directory / "model_index.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory.name]


def test_half_written_cache_directory_is_reported(tmp_path: Path) -> None:
    broken = tmp_path / "tiny-sdxl-v1"
    (broken / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="delete it"):
        ensure_tiny_model("tiny-sdxl", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [broken.name]


def test_unknown_tiny_model_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tiny-sdxl"):
        ensure_tiny_model("tiny-flux", tmp_path)


@pytest.mark.parametrize("relative", [False, True])
def test_missing_local_directory_raises_model_load_error(
    relative: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = "./no-such-model" if relative else str(tmp_path / "models" / "no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist") as excinfo:
        load_pipeline(missing)
    assert "no-such-model" in str(excinfo.value)


def test_file_instead_of_directory_raises_model_load_error(tmp_path: Path) -> None:
    single_file = tmp_path / "model.safetensors"
    single_file.write_bytes(b"not a pipeline")
    with pytest.raises(ModelLoadError, match="not a diffusers directory"):
        load_pipeline(str(single_file))


def test_unreachable_hub_id_raises_model_load_error_with_cause() -> None:
    with pytest.raises(ModelLoadError, match="deft-tests/no-such-model") as excinfo:
        load_pipeline("deft-tests/no-such-model")
    assert excinfo.value.__cause__ is not None


def test_denoiser_and_architecture_of_other_pipelines() -> None:
    class NoDenoiserPipeline:
        unet = None

    class SomeDiTPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ModelLoadError, match="neither"):
        denoiser_of(NoDenoiserPipeline())  # type: ignore[arg-type]
    assert denoiser_of(SomeDiTPipeline()) is SomeDiTPipeline.transformer  # type: ignore[arg-type]
    assert architecture_of(SomeDiTPipeline()) == "SomeDiTPipeline"  # type: ignore[arg-type]
