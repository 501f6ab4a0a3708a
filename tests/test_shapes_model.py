"""The committed ``shapes-sdxl`` model: it loads by name, and fixed prompts and seeds decode, through
diffusers and through deft's Engine, to the prompted scene as the exact parser reads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deft_runtime.engine import Engine, EngineConfig, GenerationRequest
from deft_runtime.errors import ModelLoadError
from deft_runtime.models import (
    SHAPES_MODEL_NAME,
    architecture_of,
    build_shapes_sdxl,
    load_pipeline,
    shapes_defaults,
)
from deft_runtime.models.shapes import RESERVED_WORDS, SHAPES_WORDS, build_shapes_tokenizer, reserved_rows
from deft_runtime.pool import PoolConfig
from deft_runtime.runtime import MultiAdapterModel
from deft_runtime.scenes import Scene, parse_image, parse_prompt, render_image
from deft_runtime.scenes.train_base import encode_prompts

# A fixed handful on the committed weights: all five shapes, several colours, four with a position.
# The model gets ~90% of prompts fully right (benchmarks/README.md; circles are its weak shape, often
# drawn as a rounded diamond), so each case is one it gets right with a clear margin between the
# parser's best and second-best shape template (0.04-0.22 IoU), so that another CPU's rounding cannot
# flip it; the test pins that the committed weights and both generation paths keep producing them.
CASES: tuple[tuple[str, int], ...] = (
    ("a white triangle on a purple background, in the center", 0),
    ("a green diamond on a white background, on the right", 0),
    ("a orange star on a blue background, at the bottom", 0),
    ("a yellow circle on a black background", 2),
    ("a black square on a yellow background, at the top", 0),
)


@pytest.fixture(scope="module")
def shapes_pipe():
    return load_pipeline(SHAPES_MODEL_NAME)


def _check_scene(prompt: str, image: np.ndarray) -> None:
    fg, shape, bg, position = parse_prompt(prompt)
    parsed = parse_image(image)
    assert (parsed.background, parsed.foreground, parsed.shape) == (bg, fg, shape), (prompt, parsed)
    if position is not None:
        assert parsed.position == position, (prompt, parsed)


def test_loads_by_name_as_an_sdxl_pipeline(shapes_pipe) -> None:
    assert architecture_of(shapes_pipe) == "sdxl"
    assert type(shapes_pipe).__name__ == "StableDiffusionXLPipeline"
    assert shapes_pipe.unet.config.addition_embed_type == "text_time"
    assert int(shapes_pipe.default_sample_size * shapes_pipe.vae_scale_factor) == 64
    defaults = shapes_defaults()
    assert defaults["width"] == defaults["height"] == 64


def test_missing_weights_say_how_to_get_them(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr("deft_runtime.models.loading.SHAPES_MODEL_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="train_base"):
        load_pipeline(SHAPES_MODEL_NAME)


def test_fixed_prompts_decode_to_the_prompted_scene(shapes_pipe) -> None:
    defaults = shapes_defaults()
    for prompt, seed in CASES:
        image = shapes_pipe(
            prompt=prompt,
            num_inference_steps=int(defaults["num_inference_steps"]),
            guidance_scale=float(defaults["guidance_scale"]),
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        _check_scene(prompt, np.rint(image * 255).astype(np.uint8))


def _engine(shapes_pipe) -> Engine:
    mam = MultiAdapterModel(
        shapes_pipe.unet, pool_config=PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20), backend="torch"
    )
    return Engine(shapes_pipe, mam, EngineConfig(max_batch_rows=16))


def test_engine_generates_the_prompted_scene_like_diffusers(shapes_pipe) -> None:
    """Engine at the model's defaults == diffusers' pipeline (same seed), and both parse right."""
    defaults = shapes_defaults()
    steps, guidance = int(defaults["num_inference_steps"]), float(defaults["guidance_scale"])
    engine = _engine(shapes_pipe)
    try:
        handles = [
            engine.submit(
                GenerationRequest(prompt=p, seed=s, num_inference_steps=steps, guidance_scale=guidance)
            )
            for p, s in CASES[:3]
        ]
        results = [h.result(300) for h in handles]
    finally:
        engine.shutdown()
    for (prompt, seed), result in zip(CASES[:3], results, strict=True):
        got = np.asarray(result.images[0], dtype=np.uint8)
        reference = shapes_pipe(
            prompt=prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        # same kernels on different batch compositions: a few 8-bit levels, not bit-exact
        assert np.abs(got.astype(np.float32) / 255 - reference).max() <= 4 / 255
        _check_scene(prompt, got)


def test_img2img_recolours_a_rendered_scene_as_prompted() -> None:
    """A rendered red circle on blue, img2img'd through the Engine: at strength 0.8 "a blue circle on a
    red background" parses blue on red and the scene's own prompt (same seeds) keeps red on blue; at
    0.1 the image wins over that prompt and the background stays blue. Colours only: circles are the
    model's weak shape, often drawn as rounded diamonds."""
    source = render_image(Scene("red", "circle", "blue"))
    swap, own = "a blue circle on a red background", "a red circle on a blue background"
    cases = {(swap, 0.8): ("blue", "red"), (own, 0.8): ("red", "blue"), (swap, 0.1): (None, "blue")}
    defaults = shapes_defaults()
    steps, guidance = int(defaults["num_inference_steps"]), float(defaults["guidance_scale"])
    engine = _engine(load_pipeline(SHAPES_MODEL_NAME))  # its own: an Engine rewires the UNet it serves
    try:
        handles = {
            (prompt, strength, seed): engine.submit(
                GenerationRequest(
                    prompt=prompt,
                    seed=seed,
                    input_images=(source,),
                    strength=strength,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                )
            )
            for prompt, strength in cases
            for seed in range(4)
        }
        parsed = {key: parse_image(h.result(300).images[0]) for key, h in handles.items()}
    finally:
        engine.shutdown()
    for (prompt, strength, seed), scene in parsed.items():
        foreground, background = cases[prompt, strength]
        assert scene.background == background, (prompt, strength, seed, scene)
        assert foreground in (None, scene.foreground), (prompt, strength, seed, scene)


def test_every_scene_word_and_the_trigger_is_one_token_and_new_words_still_tokenize() -> None:
    tokenizer = build_shapes_tokenizer()
    for word in (*SHAPES_WORDS, *RESERVED_WORDS):
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))  # start, word, end
    other = tokenizer.convert_ids_to_tokens(tokenizer("a red zq").input_ids)
    assert other[1:-1] == ["a</w>", "red</w>", "z", "q</w>"]
    # the trigger takes the shape's place: every later word keeps its position
    with_trigger = tokenizer("a green sks on a yellow background, on the left").input_ids
    with_shape = tokenizer("a green star on a yellow background, on the left").input_ids
    assert len(with_trigger) == len(with_shape)
    assert [a == b for a, b in zip(with_trigger, with_shape, strict=True)].count(False) == 1
    # the scene vocabulary keeps its ids: the reserved tokens come after it
    assert tokenizer.convert_tokens_to_ids("sks</w>") == len(tokenizer) - 1 > tokenizer.eos_token_id


def test_committed_model_has_the_trigger_rows_the_recipe_would_have_left() -> None:
    """No caption holds ``sks``, so the recipe leaves its embeddings at their initial values shrunk by
    weight decay, like every other unused token (scripts/reserve_shapes_tokens.py); the committed model
    holds exactly that, and the rest of its vocabulary is the trained one."""
    pipe, initial = load_pipeline(SHAPES_MODEL_NAME), build_shapes_sdxl(0)
    for index, (encoder, fresh) in enumerate(
        ((pipe.text_encoder, initial.text_encoder), (pipe.text_encoder_2, initial.text_encoder_2))
    ):
        trained = encoder.get_input_embeddings().weight.detach()
        init = fresh.get_input_embeddings().weight.detach()
        assert trained.shape == init.shape == (len(pipe.tokenizer), encoder.config.hidden_size)
        unused = pipe.tokenizer.convert_tokens_to_ids("q</w>")  # a byte token no caption holds
        scale = float((trained[unused] / init[unused]).mean())
        assert 0.9 < scale < 1.0  # AdamW's decay over the recipe's steps
        count = len(RESERVED_WORDS) + 1  # "sk" and "sks</w>"
        torch.testing.assert_close(trained[-count:], init[-count:] * scale, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(init[-count:], reserved_rows(fresh, count, 0, index))


def test_the_base_model_keeps_the_prompted_colours_and_position_around_the_trigger(shapes_pipe) -> None:
    """With ``sks`` one token in the shape's place, the base model (no adapter) still draws the prompted
    colours at the prompted position: an adapter has only the shape to learn."""
    prompts = [
        ("a green sks on a yellow background, on the left", "green", "yellow", "left"),
        ("a white sks on a purple background, at the top", "white", "purple", "top"),
        ("a red sks on a black background, on the right", "red", "black", "right"),
        ("a blue sks on a orange background, at the bottom", "blue", "orange", "bottom"),
    ]
    images = shapes_pipe(
        [p for p, *_ in prompts],
        num_inference_steps=25,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
    ).images
    for (prompt, foreground, background, position), image in zip(prompts, images, strict=True):
        scene = parse_image(image)
        assert (scene.foreground, scene.background, scene.position) == (foreground, background, position), (
            prompt,
            scene,
        )


def test_recipe_encodes_prompts_exactly_like_the_pipeline() -> None:
    """The training recipe's differentiable text encoding must equal what inference computes."""
    pipe = build_shapes_sdxl(0)
    prompts = ["a red circle on a blue background, on the left", "a white star on a black background"]
    with torch.no_grad():
        embeds, pooled = encode_prompts(pipe, prompts)
        ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(
            prompt=prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    torch.testing.assert_close(embeds, ref_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-6)
