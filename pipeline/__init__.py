"""Shared core of the pipeline: config, run directories, model and tokenizer building, tracking,
generation and checkpointing. Stages import from here; nothing here imports a stage."""
