"""Prompt-length warnings are counted with the module's own tokenizer copies, so a request thread
counting tokens can never disturb the engine thread encoding prompts with the pipeline's tokenizers
(CI once failed a churn test with "Expected size 3 but got size 77" in ``encode_prompt``)."""

from __future__ import annotations

import threading
import time

from deft_runtime.models import build_tiny_sdxl
from deft_runtime.models.prompt_limits import truncation_warnings

LONG = "a b c " * 40  # 120 words: past the 77 tokens CLIP reads


def test_warnings_name_the_long_prompt_only():
    pipe = build_tiny_sdxl(0)
    warnings = truncation_warnings(pipe, {"prompt": LONG, "negative_prompt": "blurry"})
    assert len(warnings) == 1 and warnings[0].startswith("prompt truncated: it is 122 tokens long")
    assert truncation_warnings(pipe, {"prompt": "a dog", "negative_prompt": None}) == []


def test_counting_tokens_on_other_threads_never_breaks_prompt_encoding():
    pipe = build_tiny_sdxl(0)
    stop = time.monotonic() + 4
    errors: list[BaseException] = []
    counts = {"encoded": 0, "counted": 0}

    def count() -> None:
        while time.monotonic() < stop and not errors:
            assert len(truncation_warnings(pipe, {"prompt": LONG, "negative_prompt": "x"})) == 1
            counts["counted"] += 1

    def encode() -> None:
        while time.monotonic() < stop and not errors:
            try:  # what the engine thread does for a batch of two prompts
                pos, *_ = pipe.encode_prompt(["a dog", "a cat on a mat"], device="cpu")
            except BaseException as e:
                errors.append(e)
                return
            assert pos.shape[:2] == (2, 77)
            counts["encoded"] += 1

    threads = [
        threading.Thread(target=count),
        threading.Thread(target=count),
        threading.Thread(target=encode),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert counts["encoded"] > 10 and counts["counted"] > 10
