"""dinokit: DINOv2 self-supervised pre-training of Vision Transformers, as a course kit."""

__version__ = "0.1.0"
