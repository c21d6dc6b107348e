"""abi_train: one Hydra-configured trainer for GPT-2/LLaMA-style LLMs, ViTs and CLIP, with GGUF export."""

__version__ = "0.1.0"
