"""The reward-model stage's one config, shared by preference collection and RM training.

    python -m reward_model.collect --config configs/tiny/rm.yaml   # runs/<run>/prefs/{train,eval}.jsonl
    python -m reward_model.train --config configs/tiny/rm.yaml     # runs/<run>/rm/final/

Both read `configs/<recipe>/rm.yaml`, so the K, the held-out split and the data source are written once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data.loading import DatasetSpec
from pipeline.config import FieldError
from pipeline.generation import SamplingConfig
from pipeline.runs import StageConfig
from pipeline.model import LoraSpec


@dataclass
class RewardModelConfig(StageConfig):
    # ---- preference collection (reward_model.collect)
    policy: str = ""
    """The policy whose answers are ranked: a checkpoint path or hub id. Empty: the run's sft/final. (`init_from`
    sets where RM training starts, not this: an RM on another backbone still ranks the SFT policy's answers.)"""
    prompts: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="world:pref_prompts"))
    """Prompts to sample and rank responses for (schema `prompts`). The simulated annotator can judge only
    the world's prompts; on others it ranks by style alone (tone, concision, format)."""
    max_prompts: int = 0
    """Use at most this many prompts (0: all). A quick way to shrink collection without a new world."""
    responses_per_prompt: int = 4
    """K: responses sampled and ranked per prompt. InstructGPT used 4 to 9; each prompt then yields C(K,2)
    comparisons for the price of K forward passes."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48, temperature=1.0))
    """How the SFT policy samples. Temperature 1 gives the annotator varied responses to rank; lower
    temperatures give more exact duplicates (which are dropped)."""
    max_prompt_tokens: int = 0
    """Prompts longer than this (in tokens, chat template included) are dropped, with a count. 0: those that
    leave no room for sampling.max_new_tokens within the policy's max_position_embeddings."""
    generation_batch_size: int = 64
    """Sequences per sampling batch (a prompt's K copies may span two batches)."""
    eval_fraction: float = 0.1
    """Fraction of prompts held out: their rankings go to prefs/eval.jsonl and are never trained on. Also
    used to split `train_data` when no `eval_data` is given."""
    mix_static: bool = False
    """Also train on the world's static ranked set (prefs_static: the ideal response and K-1 flawed ones per
    prompt), for the training prompts only: clean contrasts the SFT policy rarely samples. Off by default: it
    is another distribution, and on tiny it lowered held-out accuracy on the SFT policy's own samples."""

    # ---- or a given preference dataset (collection is then skipped)
    train_data: DatasetSpec | None = None
    """Preference data to train on instead of collecting (schema `preferences`): ranked lists
    (`prompt`, `responses` best first) or pairs (`prompt`, `chosen`, `rejected`); local files or a hub id."""
    eval_data: DatasetSpec | None = None
    """Held-out preference data. Empty with `train_data` set: `eval_fraction` of it is held out."""

    # ---- RM training (reward_model.train)
    max_length: int = 256
    """Tokens per conversation (prompt + response); longer ones lose their start, never the reply's end."""
    batch_size: int = 16
    """Ranked prompts per process per micro-step; each brings its K responses, scored in one forward pass."""
    grad_accum: int = 1
    forward_chunk: int = 32
    """Conversations per forward pass. A micro-step's conversations are sorted by length and scored in chunks of
    this many, each padded only to its own longest (one backward pass for all): a group's long response no
    longer pads every other. 0: the whole micro-step in one pass."""
    group_by_length: bool = True
    """Batch rankings of similar length together (shuffled within windows of 50 batches): less padding, so a
    faster epoch; off: a plain shuffle."""
    epochs: int = 1
    """Passes over the training prompts. InstructGPT trained its RM for one epoch: more overfits."""
    learning_rate: float = 1e-4
    min_lr_ratio: float = 0.1
    """The cosine decay ends at learning_rate * min_lr_ratio."""
    warmup_ratio: float = 0.05
    """Fraction of the optimizer steps spent warming the learning rate up linearly."""
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    margin: float = 0.0
    """m in -log sigmoid(r_i - r_j - m) (Llama 2): asks for a gap, not just an order. 0: plain Bradley-Terry."""
    center_coef: float = 0.0
    """Weight of the reward-centering term coef * mean over prompts of (the prompt's mean score)^2 (Eisenstein et
    al. 2023, per ranking): keeps each prompt's scores centred on 0 without shrinking their differences. At K = 2
    it is their (r_chosen + r_rejected)^2 / 4: TRL's center_rewards_coefficient c is center_coef 4c."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA adapters instead of full fine-tuning (same fields as SFT's). The scalar head is always trained in
    full, and the adapters are merged into final/, which stays a plain checkpoint."""
    eval_batch_size: int = 64
    """Conversations per forward pass when scoring the held-out set."""
    eval_every: int = 50
    """Optimizer steps between held-out evaluations (one also runs before training and at the end)."""
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.responses_per_prompt < 2:
            raise FieldError("responses_per_prompt", f"must be >= 2 (a ranking needs two responses), "
                                                     f"got {self.responses_per_prompt}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise FieldError("eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        if self.eval_data is not None and self.train_data is None:
            raise FieldError("eval_data", "is read only with train_data: collected preferences hold out prompts of "
                                          "their own (prefs/eval.jsonl). Set train_data too, or score the RM on "
                                          "this data with make eval-rm ARGS=\"--data ...\"")
        if self.max_length < 2:  # a prompt token and a response token at least; 0 failed in the tokenizer
            raise FieldError("max_length", f"must be 2 or more, got {self.max_length}")
