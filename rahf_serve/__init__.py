"""rahf-serve: serve RAHF-aligned LoRA adapters and steering vectors on one base model."""

__version__ = "0.1.0"
