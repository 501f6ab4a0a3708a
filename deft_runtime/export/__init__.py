"""Exporters: a base model with adapters merged into its weights, written for other runtimes
(:mod:`deft_runtime.export.onnx`)."""
