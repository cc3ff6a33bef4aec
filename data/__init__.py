"""Data for the RLHF pipeline.

- `data.world`: the embedded synthetic world (entities, pretraining corpus, task
  families, SFT demos, prompt splits, gold judge and simulated annotator).
- `data.loading`: dataset schemas and the loader every stage uses
  (`DatasetSpec`, `load_dataset_for`, `DataError`).
"""
