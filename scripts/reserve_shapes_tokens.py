"""Add the reserved trigger tokens (``deft_runtime.models.shapes.RESERVED_WORDS``) to the committed
``shapes-sdxl`` without retraining it: its tokenizers and both text encoders' embedding tables.

The recipe (``python -m deft_runtime.scenes.train_base``) now creates those rows at initialisation. No
caption holds them, so training would only have shrunk them by AdamW's weight decay, exactly as it
shrank every other token no caption holds: this script measures that factor on the committed model
(trained ÷ initial value of the unused byte tokens, the same for every element) and appends the
reserved rows' initial values times it. So the committed model is what the recipe now trains, and no
other weight changes (the scene vocabulary keeps its ids)::

    python scripts/reserve_shapes_tokens.py            # rewrites deft_runtime/models/shapes_sdxl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from deft_runtime.models.shapes import SHAPES_MODEL_DIR, add_reserved_embeddings, build_shapes_sdxl


def unused_token_scale(trained: torch.Tensor, initial: torch.Tensor) -> float:
    """The factor by which training scaled the byte tokens no caption holds (rows that moved by under
    5 % of their size are unused; their element-wise ratios must agree to 1e-4)."""
    rows = [i for i in range(512) if (trained[i] - initial[i]).abs().max() < 0.05 * initial[i].abs().max()]
    ratios = (trained[rows] / initial[rows]).flatten()
    if len(rows) < 400 or float(ratios.max() - ratios.min()) > 1e-4:
        raise SystemExit(f"the unused tokens were not scaled uniformly ({len(rows)} rows): not patching")
    return float(ratios.mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=SHAPES_MODEL_DIR)
    parser.add_argument("--seed", type=int, default=0, help="the recipe's seed the model was trained from")
    args = parser.parse_args(argv)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(args.model)
    before = len(pipe.tokenizer)
    initial = build_shapes_sdxl(args.seed)
    scales = [
        unused_token_scale(t.get_input_embeddings().weight.detach(), i.get_input_embeddings().weight.detach())
        for t, i in ((pipe.text_encoder, initial.text_encoder), (pipe.text_encoder_2, initial.text_encoder_2))
    ]
    pipe.tokenizer, pipe.tokenizer_2 = initial.tokenizer, initial.tokenizer_2
    if abs(scales[0] - scales[1]) > 1e-5:
        raise SystemExit(f"the text encoders' unused tokens shrank differently ({scales}): not patching")
    add_reserved_embeddings(pipe, args.seed, scale=scales[0])
    for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).save_pretrained(args.model / name)
    print(f"added {len(pipe.tokenizer) - before} reserved token(s) at scale {scales[0]:.6f} to {args.model}")


if __name__ == "__main__":
    main()
