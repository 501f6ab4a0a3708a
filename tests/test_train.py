"""The offline trainer on the tiny models: it learns, it starts where it should, what it saves is what
it trained (deft's format, PEFT, merged weights), and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from denoisers import forward, omnigen_inputs, sdxl_inputs, tiny_omnigen, tiny_sdxl
from PIL import Image

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.compile import compile_adapter, linear_weights, merge_into
from deft_runtime.errors import RankError
from deft_runtime.formats import load_adapter
from deft_runtime.train.config import Concept, PriorPreservation, TrainConfig, TrainingInputError, Validation
from deft_runtime.train.data import DatasetError, ImageTransform, TrainingData, load_concepts
from deft_runtime.train.loop import TrainingSession, train
from deft_runtime.train.modules import TrainableAdapter
from deft_runtime.train.optim import build_optimizer

TARGETS = (r"to_q", r"to_k", r"to_v", r"to_out\.0")
DEFT = [AdapterKind.DEFT]
DEFT_MODES = ["plain", "relu", "qr", "svd"]
PARA_MODES = ["qr", "tsvd", "lrmf", "nmf", "eig"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: two OpenMP threads contend and run ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_images(folder: Path, count: int = 2, seed: int = 0, size: tuple[int, int] = (40, 36)) -> Path:
    """``count`` small striped RGB images (different colors) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 40, (size[1], size[0], 3), dtype=np.uint8)
        pixels[..., i % 3] += 200
        pixels[::4] = 30
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_images(tmp_path / "instance")


def pipe_for(arch: str) -> Any:
    return copy.deepcopy(tiny_sdxl() if arch == "sdxl" else tiny_omnigen())


def make_config(tmp_path: Path, data: Path, **overrides: Any) -> TrainConfig:
    options: dict[str, Any] = {
        "model": "tiny-sdxl",
        "concepts": (Concept(data, "a photo of sks dog"),),
        "out": tmp_path / "out",
        "lr": 1e-2,
        "steps": 4,
        "resolution": 32,
        "seed": 0,
    }
    options.update(overrides)
    return TrainConfig(**options)


def attach(denoiser: torch.nn.Module, method: str, mode: str | None, **kwargs: Any) -> TrainableAdapter:
    return TrainableAdapter.attach(
        denoiser,
        kind=AdapterKind(method),
        decomposition=Decomposition(mode) if mode else None,
        rank=4,
        targets=TARGETS,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------- learning

LEARNING_CASES = [
    *[("sdxl", "deft", m) for m in DEFT_MODES],
    *[("sdxl", "para", m) for m in PARA_MODES],
    ("sdxl", "lora", None),
    ("omnigen", "deft", "qr"),
    ("omnigen", "para", "eig"),
]


@pytest.mark.parametrize(("arch", "method", "mode"), LEARNING_CASES, ids=lambda v: str(v))
def test_loss_goes_down(tmp_path, data, arch, method, mode):
    config = make_config(
        tmp_path,
        data,
        model=f"tiny-{arch}",
        method=AdapterKind(method),
        decomposition=Decomposition(mode) if mode else None,
        steps=40,
        batch_size=2,
        p_lr_scale=1.0 if method == "para" else 0.1,  # P is all PaRa trains
    )
    session = TrainingSession.prepare(config, pipe_for(arch))
    before = session.evaluate(range(8))  # the same 8 batches (images, noise, timesteps) before and after
    session.run()
    after = session.evaluate(range(8))
    losses = [r.loss for r in session.history]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < np.mean(losses[:8]), losses
    assert after < before - 0.01, (before, after)
    assert all(torch.isfinite(t).all() for t in session.adapter.state_tensors().values())


# ---------------------------------------------------------------------------------------------- optimizer


def test_param_groups_carry_the_two_learning_rates(tmp_path, data):
    config = make_config(tmp_path, data, lr=3e-4, p_lr_scale=0.1, gate=True)
    unet = copy.deepcopy(tiny_sdxl().unet)
    adapter = attach(unet, "deft", "qr", gated=True)
    optimizer = build_optimizer(adapter, config)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"R", "P", "gate"}
    assert groups["R"]["lr"] == 3e-4 and groups["gate"]["lr"] == 3e-4
    assert groups["P"]["lr"] == pytest.approx(3e-5)
    named = adapter.named_parameters()
    by_role = {
        role: {id(p) for k, p in named.items() if k.endswith("." + role)} for role in ("P", "R", "gate")
    }
    assert {id(p) for p in groups["P"]["params"]} == by_role["P"]
    assert {id(p) for p in groups["R"]["params"]} == by_role["R"]
    assert len(groups["P"]["params"]) == len(adapter.layers) == 48


def test_para_trains_P_and_H_in_the_P_group_and_lora_everything_at_lr(tmp_path, data):
    unet = copy.deepcopy(tiny_sdxl().unet)
    para = attach(unet, "para", "nmf")
    groups = build_optimizer(para, make_config(tmp_path, data, method=AdapterKind.PARA)).param_groups
    assert [(g["name"], len(g["params"])) for g in groups] == [("P", 96)]  # P and H of 48 layers
    para.detach()
    lora = attach(unet, "lora", None)
    groups = build_optimizer(lora, make_config(tmp_path, data, method=AdapterKind.LORA, lr=2e-3)).param_groups
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("R", 2e-3, 96)]


def test_the_log_records_each_groups_learning_rate_and_the_schedule(tmp_path, data):
    config = make_config(tmp_path, data, steps=4, lr=1e-3, schedule="cosine", warmup_steps=2)
    session = TrainingSession.prepare(config, pipe_for("sdxl"))
    session.run()
    lines = [json.loads(line) for line in session.log.path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[0]["lr"] == {"R": 0.0, "P": 0.0}  # warm-up starts at 0
    assert lines[1]["lr"]["R"] == pytest.approx(5e-4) and lines[1]["lr"]["P"] == pytest.approx(5e-5)
    assert lines[2]["lr"]["R"] == pytest.approx(1e-3)
    assert all(line["seconds"] > 0 and np.isfinite(line["loss"]) for line in lines)
    session.close()


GRADIENT_CASES = [
    *[("deft", m, {}) for m in DEFT_MODES],
    ("deft", "qr", {"gated": True}),
    ("deft", "relu", {"random_init": True}),
    *[("para", m, {}) for m in PARA_MODES],
]


@pytest.mark.parametrize(("method", "mode", "options"), GRADIENT_CASES, ids=str)
def test_P_receives_gradient_in_every_mode(method, mode, options):
    unet = copy.deepcopy(tiny_sdxl().unet)
    adapter = attach(unet, method, mode, **options)
    inputs = sdxl_inputs(unet, rows=1)
    target = torch.randn_like(forward(unet, inputs))
    (unet(**inputs, return_dict=False)[0] - target).square().mean().backward()
    for key, p in adapter.named_parameters().items():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{key} got no gradient"
    roles = {key.rpartition(".")[2] for key in adapter.named_parameters()}
    expected = {"P"} | ({"R"} if method == "deft" else set()) | ({"H"} if mode == "nmf" else set())
    assert roles == expected | ({"gate"} if options.get("gated") else set())


def test_cache_projector_freezes_P_and_computes_the_same_function():
    unet = copy.deepcopy(tiny_sdxl().unet)
    inputs = sdxl_inputs(unet, rows=1)
    outputs = {}
    for cache in (False, True):
        denoiser = copy.deepcopy(unet)
        adapter = attach(denoiser, "deft", "qr", random_init=True, cache_projector=cache)
        out = denoiser(**inputs, return_dict=False)[0]
        out.square().mean().backward()
        outputs[cache] = out.detach()
        keys = {k.rpartition(".")[2] for k in adapter.named_parameters()}
        assert keys == ({"R"} if cache else {"P", "R"})
        assert all(p.grad is not None for p in adapter.named_parameters().values())
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- initialization

IDENTITY_CASES = [
    *[("sdxl", "deft", m, {}) for m in DEFT_MODES],
    ("sdxl", "deft", "qr", {"gated": True, "scale": 2.0}),
    ("sdxl", "lora", None, {}),
    ("omnigen", "deft", "relu", {}),
    ("omnigen", "lora", None, {}),
]


def _denoiser_and_inputs(arch: str) -> tuple[torch.nn.Module, dict]:
    if arch == "sdxl":
        unet = copy.deepcopy(tiny_sdxl().unet)
        return unet, sdxl_inputs(unet)
    transformer = copy.deepcopy(tiny_omnigen().transformer)
    return transformer, omnigen_inputs(transformer)


@pytest.mark.parametrize(("arch", "method", "mode", "options"), IDENTITY_CASES, ids=str)
def test_identity_init_leaves_the_denoiser_unchanged(arch, method, mode, options):
    denoiser, inputs = _denoiser_and_inputs(arch)
    base = forward(denoiser, inputs)
    attach(denoiser, method, mode, **options)
    adapted = forward(denoiser, inputs)
    if not options:  # s = 1, no gate: R = rightᵀ·W0 exactly, so A = R − rightᵀ·W0 = 0 exactly
        assert torch.equal(adapted, base)
    torch.testing.assert_close(adapted, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["deft", "lora"])
def test_random_init_changes_the_output(method):
    denoiser, inputs = _denoiser_and_inputs("sdxl")
    base = forward(denoiser, inputs)
    adapter = attach(denoiser, method, "relu" if method == "deft" else None, random_init=True)
    if method == "lora":  # N(0, 0.02²) up-projections are a small change; scale them to see it
        with torch.no_grad():
            for key, p in adapter.named_parameters().items():
                p.mul_(20.0 if key.endswith(".up") else 1.0)
    assert (forward(denoiser, inputs) - base).abs().max() > 1e-3


@pytest.mark.parametrize("mode", PARA_MODES)
def test_para_starts_with_the_removal_only(mode):
    """PaRa has no injection to cancel: at step 0 the output is exactly the base with Π·W0 removed."""
    denoiser, inputs = _denoiser_and_inputs("sdxl")
    base_denoiser = copy.deepcopy(denoiser)
    base = forward(denoiser, inputs)
    adapter = attach(denoiser, "para", mode)
    adapted = forward(denoiser, inputs)
    assert (adapted - base).abs().max() > 1e-6
    exported = adapter.to_adapter()
    assert all(layer.R is None for layer in exported.layers.values())
    compiled = compile_adapter(exported, linear_weights(base_denoiser, list(exported.layers)))
    removed = forward(merge_into(base_denoiser, compiled), inputs)
    torch.testing.assert_close(adapted, removed, atol=1e-5, rtol=1e-4)


def test_rank_larger_than_a_layer_is_refused():
    unet = copy.deepcopy(tiny_sdxl().unet)
    with pytest.raises(RankError, match=r"--rank 65 is impossible .*at most 64"):
        TrainableAdapter.attach(
            unet, kind=AdapterKind.DEFT, decomposition=Decomposition.QR, rank=65, targets=TARGETS
        )
    assert not any(type(m).__name__ == "AdaptedLinear" for m in unet.modules())


# ---------------------------------------------------------------------------------------------- outputs

SAVE_CASES = [
    ("sdxl", "deft", "qr", {}, True),
    ("sdxl", "deft", "relu", {"alpha": 8.0}, True),
    ("sdxl", "para", "qr", {}, True),
    ("sdxl", "deft", "svd", {"gate": True}, False),
    ("sdxl", "lora", None, {"alpha": 2.0}, True),
    ("omnigen", "deft", "qr", {}, True),
]


@pytest.mark.parametrize(("arch", "method", "mode", "options", "peft"), SAVE_CASES, ids=str)
def test_saved_adapter_reloads_to_the_trained_model(tmp_path, data, arch, method, mode, options, peft):
    from peft import PeftModel

    config = make_config(
        tmp_path,
        data,
        model=f"tiny-{arch}",
        method=AdapterKind(method),
        decomposition=Decomposition(mode) if mode else None,
        steps=3,
        **options,
    )
    session = TrainingSession.prepare(config, pipe_for(arch))
    session.run()
    base, inputs = _denoiser_and_inputs(arch)
    trained = forward(session.denoiser, inputs)
    assert (trained - forward(base, inputs)).abs().max() > 1e-4, "training must have changed the model"
    result = session.finish()
    session.close()

    loaded = load_adapter(config.out / "adapter.deft.safetensors")
    assert (loaded.kind.value, loaded.decomposition) == (method, Decomposition(mode) if mode else None)
    assert loaded.metadata["steps"] == "3" and loaded.metadata["base_model"] == f"tiny-{arch}"
    assert loaded.fingerprint == result.adapter.fingerprint
    compiled = compile_adapter(loaded, linear_weights(base, list(loaded.layers)))
    merged = forward(merge_into(copy.deepcopy(base), compiled), inputs)
    torch.testing.assert_close(merged, trained, atol=2e-5, rtol=1e-4)

    assert (config.out / "peft").is_dir() == peft
    summary = json.loads((config.out / "training.json").read_text())
    assert summary["steps"] == 3 and "adapter.deft.safetensors" in summary["files"]
    if peft:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), config.out / "peft")
        torch.testing.assert_close(forward(peft_model, inputs), trained, atol=2e-5, rtol=1e-4)
    else:
        assert summary["peft"] != "written"


def test_a_crash_while_writing_leaves_no_output(tmp_path, data, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("deft_runtime.formats.peft.write_dir_atomic", broken)  # after the deft file
    config = make_config(tmp_path, data, steps=1)
    with pytest.raises(OSError, match="disk full"):
        train(config, pipe=pipe_for("sdxl"))
    assert not config.out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instance", "out.run"]  # the log, no partial output


def test_overwrite_replaces_a_finished_output(tmp_path, data):
    config = make_config(tmp_path, data, steps=1)
    train(config, pipe=pipe_for("sdxl"))
    with pytest.raises(TrainingInputError, match="already exists"):
        TrainingSession.prepare(config, pipe_for("sdxl"))
    again = make_config(tmp_path, data, steps=2, overwrite=True)
    result = train(again, pipe=pipe_for("sdxl"))
    assert load_adapter(result.out / "adapter.deft.safetensors").metadata["steps"] == "2"
    assert not (tmp_path / "out.run").exists()  # no checkpoints: the run directory is removed


# ---------------------------------------------------------------------------------------------- resume


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, data):
    common = {
        "steps": 6,
        "gate": True,
        "schedule": "cosine",
        "warmup_steps": 2,
        "random_flip": True,
        "batch_size": 2,
    }
    whole = train(make_config(tmp_path / "a", data, **common), pipe=pipe_for("sdxl"))

    interrupted = make_config(tmp_path / "b", data, checkpoint_every=2, keep_checkpoints=1, **common)
    first = TrainingSession.prepare(interrupted, pipe_for("sdxl"))
    first.run(until=4)  # "crash" after step 4: checkpoints at 2 and 4, only the newest kept
    first.close()
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "out.run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000004"]
    assert not interrupted.out.exists()

    resumed = TrainingSession.prepare(
        make_config(tmp_path / "b", data, checkpoint_every=2, keep_checkpoints=1, resume="latest", **common),
        pipe_for("sdxl"),
    )
    assert resumed.step == 4
    resumed.run()
    result = resumed.finish()
    resumed.close()
    for name, layer in whole.adapter.layers.items():
        for role, tensor in layer.tensors().items():
            assert torch.equal(result.adapter.layers[name].tensors()[role], tensor), f"{name}.{role}"
    log = [json.loads(line) for line in (result.out / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2, 3, 4, 5, 6]
    assert [line["loss"] for line in log] == whole.losses


def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path, data):
    config = make_config(tmp_path, data, steps=2, checkpoint_every=1)
    session = TrainingSession.prepare(config, pipe_for("sdxl"))
    session.run(until=1)
    session.close()
    changed = make_config(tmp_path, data, steps=2, checkpoint_every=1, rank=2, resume="latest")
    with pytest.raises(TrainingInputError, match="different settings for rank"):
        TrainingSession.prepare(changed, pipe_for("sdxl"))
    with pytest.raises(TrainingInputError, match="holds checkpoints of an earlier run"):
        TrainingSession.prepare(config, pipe_for("sdxl"))


def test_gradient_checkpointing_and_cpu_mixed_precision_do_not_change_the_result(tmp_path, data):
    plain = train(make_config(tmp_path / "a", data, steps=2), pipe=pipe_for("sdxl"))
    flagged = make_config(tmp_path / "b", data, steps=2, gradient_checkpointing=True, mixed_precision="bf16")
    other = train(flagged, pipe=pipe_for("sdxl"))  # CPU: bf16 is ignored (float32, with a warning)
    assert plain.losses == other.losses


# ---------------------------------------------------------------------------------------------- data


def test_captions_concepts_and_transform(tmp_path):
    first = make_images(tmp_path / "dog", count=2)
    (first / "img1.txt").write_text("  a photo of sks dog on grass \n")
    second = make_images(tmp_path / "cat", count=1, size=(30, 50))
    examples = load_concepts([Concept(first, "a photo of sks dog"), Concept(second, "a photo of zwx cat")])
    assert [e.prompt for e in examples] == [
        "a photo of sks dog",
        "a photo of sks dog on grass",
        "a photo of zwx cat",
    ]

    transform = ImageTransform(32, center_crop=True)
    pixels, original, origin = transform(examples[2].image, torch.Generator().manual_seed(0))
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert original == (50, 30) and origin == (10, 0)  # 30x50 → 32x53, centered: round(10.5)
    data = TrainingData(examples, ImageTransform(32, random_flip=True), batch_size=2, seed=3)
    assert data.prompts() == [e.prompt for e in examples]
    a, b = data.batch(5, torch.Generator().manual_seed(9)), data.batch(5, torch.Generator().manual_seed(9))
    assert torch.equal(a.pixels, b.pixels) and a.prompts == b.prompts
    seen = [p for step in range(3) for p in data.batch(step, torch.Generator()).prompts[:2]]
    assert sorted(seen[:3]) == sorted(e.prompt for e in examples)  # one epoch visits every image once


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "holds no images"),
        (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "holds no images"),
        (
            lambda d: (d.mkdir(), (d / "broken.png").write_bytes(b"\x89PNG not really")),
            "not a readable image",
        ),
    ],
    ids=["missing", "empty", "only-text", "unreadable"],
)
def test_bad_image_folders_are_reported(tmp_path, setup, message):
    folder = tmp_path / "images"
    setup(folder)
    with pytest.raises(DatasetError, match=message):
        load_concepts([Concept(folder, "x")])


# ---------------------------------------------------------------------------------------------- prior, validation


def test_prior_preservation_generates_class_images_once_and_trains_on_both(tmp_path, data):
    prior = PriorPreservation(tmp_path / "class", "a photo of a dog", num_images=2, generation_steps=2)
    config = make_config(tmp_path, data, steps=2, batch_size=1, prior=prior)
    session = TrainingSession.prepare(config, pipe_for("sdxl"))
    made = sorted((tmp_path / "class").iterdir())
    assert [p.name for p in made] == ["class-00000.png", "class-00001.png"]
    assert Image.open(made[0]).size == (32, 32)
    batch = session.data.batch(0, torch.Generator())
    assert batch.size == 2 and batch.num_instance == 1 and batch.prompts[1] == "a photo of a dog"
    session.run()
    assert all(r.prior_loss is not None and r.loss > r.instance_loss for r in session.history)
    session.close()

    (tmp_path / "class" / "class-00001.png").unlink()  # regenerated identically, the other one kept
    before = made[0].read_bytes()
    TrainingSession.prepare(make_config(tmp_path / "again", data, prior=prior), pipe_for("sdxl")).close()
    assert made[0].read_bytes() == before and (tmp_path / "class" / "class-00001.png").is_file()


def test_validation_images_come_from_the_merged_adapter(tmp_path, data):
    validation = Validation(prompt="a photo of sks dog", every=2, num_images=1, inference_steps=2, seed=7)
    config = make_config(tmp_path, data, steps=2, validation=validation)
    session = TrainingSession.prepare(config, pipe_for("sdxl"))
    session.run()
    sample = np.asarray(Image.open(session.run_dir / "validation" / "step-000002-0.png"))

    pipe = pipe_for("sdxl")  # the same image from diffusers with the adapter merged into the weights
    adapter = session.adapter.to_adapter()
    merge_into(pipe.unet, compile_adapter(adapter, linear_weights(pipe.unet, list(adapter.layers))))
    expected = pipe(
        prompt="a photo of sks dog",
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    assert np.abs(sample.astype(int) - np.asarray(expected).astype(int)).max() <= 1
    result = session.finish()
    session.close()
    assert Path("validation/step-000002-0.png") in result.files
