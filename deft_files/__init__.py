"""File conventions shared by the client and the runtime: pure Python (no torch, no grpc), the lowest
layer, so ``deft_client`` installs and runs without ``deft_runtime``.

- :mod:`deft_files.folders`: the adapter a folder holds (a ``deft train`` output, a PEFT directory, a
  folder with one ``.safetensors`` file).
- :mod:`deft_files.text_encoder_keys`: which LoRA tensors belong to a text encoder.
"""
