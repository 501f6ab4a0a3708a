"""Image-conditioned generation against diffusers (+PEFT): SDXL img2img and inpainting, OmniGen with
input images; alone, several images per request, and mixed with each other and with text-to-image
requests in shared forwards. Same inputs → the same image within 2/255."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from peft import DeftConfig, LoraConfig, PeftModel
from PIL import Image
from test_engine import TARGETS, as_array, make_peft_dir, serving_engine

from deft_runtime.engine import GenerationRequest
from deft_runtime.errors import InvalidRequest
from deft_runtime.models import build_tiny_omnigen, build_tiny_sdxl

TOL = 2 / 255


def picture(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def square_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("cond_adapters"))


def make_adapters(root):
    """dog: a PEFT DEFT directory, style: a PEFT LoRA one, both for tiny-sdxl (seed 0)."""
    unet = build_tiny_sdxl(0).unet
    deft = DeftConfig(r=4, target_modules=TARGETS, decomposition_method="qr", init_weights=False)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
    return {
        "dog": make_peft_dir(unet, deft, root / "dog", 1),
        "style": make_peft_dir(unet, lora, root / "style", 2),
    }


@pytest.fixture(scope="module")
def engine(adapters):
    eng = serving_engine(build_tiny_sdxl(0), adapters, max_batch_rows=32)
    yield eng
    eng.shutdown()


def sdxl_reference(kind, adapter_dir, **kwargs) -> np.ndarray:
    pipe = build_tiny_sdxl(0)
    if adapter_dir is not None:
        pipe.unet = PeftModel.from_pretrained(pipe.unet, adapter_dir).get_base_model()
    pipe = kind.from_pipe(pipe)
    seed = kwargs.pop("seed")
    gen = torch.Generator("cpu").manual_seed(seed)
    return pipe(generator=gen, output_type="np", guidance_scale=5.0, **kwargs).images


IMG2IMG = dict(prompt="a dog on a beach", strength=0.6, num_inference_steps=6, seed=3)
INPAINT = dict(prompt="a red ball", strength=0.8, num_inference_steps=5, seed=4)


def inpaint_reference(adapter_dir, image: Image.Image, mask: Image.Image) -> np.ndarray:
    kind = StableDiffusionXLInpaintPipeline
    return sdxl_reference(kind, adapter_dir, image=image, mask_image=mask, height=64, width=64, **INPAINT)


def test_img2img_matches_diffusers_with_peft(engine, adapters):
    image = picture(0)
    res = engine.generate(
        GenerationRequest(input_images=(image,), adapters=(("dog", 1.0),), **IMG2IMG), timeout=300
    )
    ref = sdxl_reference(StableDiffusionXLImg2ImgPipeline, adapters["dog"], image=image, **IMG2IMG)
    assert np.abs(as_array(res.images) - ref).max() <= TOL
    assert res.steps == 6  # as asked; int(6 x 0.6) = 3 of them run


def test_inpainting_matches_diffusers_and_keeps_the_unmasked_region(engine, adapters):
    image, mask = picture(1), square_mask()
    res = engine.generate(
        GenerationRequest(input_images=(image,), mask_image=mask, adapters=(("style", 1.0),), **INPAINT),
        timeout=300,
    )
    ref = inpaint_reference(adapters["style"], image, mask)
    got = as_array(res.images)
    assert np.abs(got - ref).max() <= TOL
    text_only = engine.generate(
        GenerationRequest(prompt=INPAINT["prompt"], num_inference_steps=5, seed=4), timeout=300
    )
    assert np.abs(got - as_array(text_only.images)).max() > 0.05  # it really started from the image


def test_mixed_img2img_inpaint_and_text_requests_share_forwards_and_match(engine, adapters):
    image, mask = picture(2), square_mask()
    specs = [
        ("i2i", dict(input_images=(image,), adapters=(("dog", 1.0),), num_images=2, **IMG2IMG)),
        ("inp", dict(input_images=(image,), mask_image=mask, adapters=(("style", 1.0),), **INPAINT)),
        ("t2i", dict(prompt="a cat", num_inference_steps=4, seed=9)),
    ]
    rows_seen: list[int] = []
    original = engine.runner.observer.on_forward

    def spy(rows, distinct, seconds):
        rows_seen.append(rows)
        original(rows, distinct, seconds)

    engine.runner.observer.on_forward = spy
    try:
        handles = [engine.submit(GenerationRequest(**spec)) for _, spec in specs]
        results = [h.result(timeout=600) for h in handles]
    finally:
        engine.runner.observer.on_forward = original
    assert max(rows_seen) > 4, f"the requests never shared a forward: rows per forward {rows_seen}"
    refs = [
        sdxl_reference(
            StableDiffusionXLImg2ImgPipeline, adapters["dog"], image=image, num_images_per_prompt=2, **IMG2IMG
        ),
        inpaint_reference(adapters["style"], image, mask),
    ]
    for res, ref in zip(results[:2], refs, strict=True):
        assert np.abs(as_array(res.images) - ref).max() <= TOL


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(input_images=(picture(0), picture(1))), "one input image"),
        (dict(input_images=(picture(0),), mask_image=square_mask(32)), "send a mask of the image's size"),
        (dict(input_images=(picture(0),), strength=0.1, num_inference_steps=5), "runs no step"),
        (dict(input_images=(picture(0),), image_guidance_scale=2.0), "applies to OmniGen"),
        (dict(strength=0.5), "send an input image"),
        (dict(mask_image=square_mask()), "needs the input image"),
    ],
)
def test_bad_sdxl_image_requests_are_refused_with_what_to_fix(engine, fields, words):
    with pytest.raises(InvalidRequest, match=words):
        engine.submit(GenerationRequest(prompt="a dog", **fields))


def test_img2img_defaults_to_the_input_image_size(engine):
    res = engine.generate(
        GenerationRequest(prompt="a dog", input_images=(picture(5, 40),), num_inference_steps=4, seed=1),
        timeout=300,
    )
    assert res.images[0].size == (40, 40)


# ---- OmniGen


@pytest.fixture(scope="module")
def omnigen_engine():
    eng = serving_engine(build_tiny_omnigen(0), {}, max_batch_rows=32)
    yield eng
    eng.shutdown()


def omnigen_reference(seed: int, adapter_dir=None, **kwargs) -> np.ndarray:
    pipe = build_tiny_omnigen(0)
    if adapter_dir is not None:
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, adapter_dir).get_base_model()
    torch.manual_seed(seed)  # the pipeline samples input-image latents from torch's global generator
    gen = torch.Generator("cpu").manual_seed(seed)
    return pipe(generator=gen, output_type="np", **kwargs).images


EDIT = dict(prompt="make <img><|image_1|></img> blue", width=32, height=32, num_inference_steps=4)
TWO = dict(
    prompt="put <img><|image_2|></img> next to <img><|image_1|></img>",
    width=32,
    height=32,
    num_inference_steps=3,
)


def test_omnigen_edit_matches_the_pipeline(omnigen_engine):
    image = picture(3, 32)
    res = omnigen_engine.generate(
        GenerationRequest(input_images=(image,), seed=5, num_images=2, **EDIT), timeout=300
    )
    ref = omnigen_reference(5, input_images=[image], num_images_per_prompt=2, **EDIT)
    assert np.abs(as_array(res.images) - ref).max() <= TOL


def test_omnigen_two_images_and_a_text_request_mixed_match(omnigen_engine):
    a, b = picture(6, 32), picture(7, 32)
    handles = [
        omnigen_engine.submit(
            GenerationRequest(input_images=(a, b), seed=8, image_guidance_scale=2.0, **TWO)
        ),
        omnigen_engine.submit(GenerationRequest(input_images=(a,), seed=5, **EDIT)),
        omnigen_engine.submit(
            GenerationRequest(prompt="a cat", width=32, height=32, num_inference_steps=3, seed=2)
        ),
    ]
    results = [h.result(timeout=600) for h in handles]
    refs = [
        omnigen_reference(8, input_images=[a, b], img_guidance_scale=2.0, **TWO),
        omnigen_reference(5, input_images=[a], **EDIT),
        omnigen_reference(2, prompt="a cat", width=32, height=32, num_inference_steps=3),
    ]
    for res, ref in zip(results, refs, strict=True):
        assert np.abs(as_array(res.images) - ref).max() <= TOL


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(prompt="make <img><|image_1|></img> blue"), "0 input image"),
        (dict(prompt="a cat", input_images=(picture(0, 32),)), "references images none"),
        (dict(prompt="<img><|image_2|></img>", input_images=(picture(0, 32),)), "none skipped"),
        (
            dict(prompt="<img><|image_1|></img>", input_images=(picture(0, 32),), mask_image=square_mask(32)),
            "no inpainting mask",
        ),
        (dict(prompt="<img><|image_1|></img>", input_images=(picture(0, 32),), strength=0.5), "SDXL img2img"),
    ],
)
def test_bad_omnigen_image_requests_are_refused(omnigen_engine, fields, words):
    with pytest.raises(InvalidRequest, match=words):
        omnigen_engine.submit(GenerationRequest(width=32, height=32, **fields))


@pytest.fixture(scope="module")
def omnigen_adapters(tmp_path_factory):
    """edit: a PEFT DEFT directory, text: a PEFT LoRA one, both for tiny-omnigen (seed 0)."""
    root = tmp_path_factory.mktemp("omnigen_adapters")
    transformer = build_tiny_omnigen(0).transformer
    deft = DeftConfig(r=2, target_modules=TARGETS, decomposition_method="relu", init_weights=False)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False)
    return {
        "edit": make_peft_dir(transformer, deft, root / "edit", 3, boost=100.0),
        "text": make_peft_dir(transformer, lora, root / "text", 4),
    }


def test_omnigen_edit_and_text_requests_with_their_own_adapters_match_peft(omnigen_adapters):
    """An edit with a DEFT adapter and a text-to-image request with a LoRA adapter, submitted together,
    each equal OmniGenPipeline with its adapter attached through PEFT."""
    engine = serving_engine(build_tiny_omnigen(0), omnigen_adapters, max_batch_rows=32)
    try:
        image = picture(9, 32)
        handles = [
            engine.submit(GenerationRequest(input_images=(image,), seed=3, adapters=(("edit", 1.0),), **EDIT)),
            engine.submit(
                GenerationRequest(
                    prompt="a red cat", width=32, height=32, num_inference_steps=4, seed=4,
                    adapters=(("text", 1.0),),
                )
            ),
        ]  # fmt: skip
        results = [h.result(timeout=600) for h in handles]
    finally:
        engine.shutdown()
    refs = [
        omnigen_reference(3, omnigen_adapters["edit"], input_images=[image], **EDIT),
        omnigen_reference(
            4, omnigen_adapters["text"], prompt="a red cat", width=32, height=32, num_inference_steps=4
        ),
    ]
    plain = omnigen_reference(3, input_images=[image], **EDIT)
    for res, ref in zip(results, refs, strict=True):
        assert np.abs(as_array(res.images) - ref).max() <= TOL
    assert np.abs(refs[0] - plain).max() > 4 * TOL  # the adapter changes the edit (15/255 here): it applied
