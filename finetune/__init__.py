"""finetune: declarative fine-tuning of torchvision image classifiers."""

__version__ = "0.1.0"
