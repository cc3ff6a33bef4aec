"""Pretraining stage: `python -m stages.pretrain --config configs/<recipe>/pretrain.yaml`."""
