"""Diffusion pipelines: presets, hooks on their blocks, tiny pipelines, the tokenizer."""
