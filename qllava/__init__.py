"""qllava: fine-tune LLaVA-style vision-language models with QLoRA on one 24 GB GPU."""

__version__ = "0.1.0"
