"""Supervised fine-tuning stage: `python -m stages.sft --config configs/<recipe>/sft.yaml`."""
