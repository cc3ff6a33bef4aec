"""The PPO stage's settings: one typed dataclass, read from configs/<recipe>/ppo.yaml and key=value overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data.loading import DatasetSpec
from pipeline.config import FieldError
from pipeline.generation import SamplingConfig
from pipeline.model import LoraSpec
from pipeline.runs import StageConfig


FP16_UNSUPPORTED = ("PPO cannot run in fp16 (the policy and the critic have two optimizers, and "
                    "accelerate's one GradScaler would unscale and update twice per step); use bf16 or fp32")


@dataclass
class PPOStageConfig(StageConfig):
    reward_model: str = ""
    """The frozen RM (an `rm`-stage checkpoint); empty: runs/<run>/rm/final. The critic starts from it too."""
    prompts: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="world:ppo_prompts"))
    """Training prompts (schema `prompts`): the world's PPO split, or local/hub data."""
    max_steps: int = 100
    """PPO iterations: one batch of rollouts, then ppo_epochs passes over it."""
    rollout_batch_size: int = 64
    """Prompts per process per iteration."""
    minibatch_size: int = 16
    """Rollouts per process per optimizer step."""
    grad_accum: int = 1
    """Micro-batches per minibatch (micro-batch = minibatch_size / grad_accum, also the scoring chunk)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch: more reuses samples harder and moves further per step."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48, temperature=0.7))
    """Rollout sampling: length cap, temperature (> 0; log-probs use the same scaled logits, N+), top-k/top-p."""
    max_prompt_tokens: int = 0
    """Training prompts longer than this (in tokens, chat template included) are dropped, with a count. 0: those
    that leave no room for sampling.max_new_tokens within the max_position_embeddings of the policy and of the
    RM (the critic reads prompt and reply as well)."""
    policy_lr: float = 1e-5
    critic_lr: float = 3e-5
    """Separate optimizers; the critic's targets move every step, so it learns faster."""
    anneal_lr: bool = True
    """Decay both learning rates linearly to 0 over the policy's steps (N+)."""
    adam_eps: float = 1e-5
    """N+ uses 1e-5 rather than PyTorch's 1e-8."""
    grad_clip: float = 1.0
    """Max gradient norm, for policy and critic separately."""
    gamma: float = 1.0
    lam: float = 0.95
    """GAE discount and lambda; a reply is a short episode with a terminal reward, so gamma = 1 (N+)."""
    cliprange: float = 0.2
    """PPO clip epsilon of the probability ratio."""
    cliprange_value: float = 0.2
    """Value clip around the rollout-time values (normalised reward units)."""
    vf_coef: float = 0.1
    """Weight of the value loss. The policy and the critic have their own AdamW, which is blind to a loss's scale,
    so this only sets where the critic's gradient clipping bites (at grad_clip / vf_coef of the value loss's own
    gradient norm); tune the critic with critic_lr."""
    whiten_advantages: bool = True
    """Normalise advantages over every response token of the global batch."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance before GAE (an N+ option). Scale only: x / std, where
    lm-human-preferences' whiten(shift_mean=False) keeps the mean as it is, (x - mean) / std + mean."""
    init_kl_coef: float = 0.05
    """beta, the weight of the per-token KL penalty to the SFT model."""
    kl_target: float | None = None
    """KL per reply (nats) that the adaptive controller (Ziegler et al.) steers beta towards; null: fixed beta."""
    kl_horizon: int = 10000
    """Adaptive controller horizon in rollouts: larger adapts beta more slowly."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL in the reward: k1 = log p - log p_ref (InstructGPT), or k3 (non-negative)."""
    missing_eos_penalty: float | None = -1.0
    """Normalised score given instead of the RM's to a reply that hit the length cap without EOS (N+), or that
    is empty (an answer the RM never saw); null: off."""
    reward_clip: float = 5.0
    """Clip normalised scores to [-reward_clip, reward_clip]."""
    critic_warmup_steps: int = 0
    """The first steps (counted in max_steps) train only the critic, so early advantages are not noise."""
    ptx: bool = False
    """PPO-ptx (InstructGPT): add a pretraining LM loss to the policy loss, against forgetting."""
    ptx_coef: float = 0.1
    """Its weight (per-token mean LM loss). DeepSpeed-Chat's 27.8 collapses our tiny run within 15 steps (KL to
    SFT 30 nats, EOS rate 0.6, gold win rate 24%); 0.1 keeps it within KL ~1 of a run without PPO-ptx."""
    ptx_data: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="world:pretrain"))
    ptx_batch_size: int = 4
    """Pretraining blocks of ptx_block_size tokens per micro-batch."""
    ptx_block_size: int = 128
    ema_decay: float = 0.0
    """Keep an EMA of the policy's weights (e.g. 0.99); final/ then holds the EMA. 0: off."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA for the policy: the reference is then the policy with its adapter off (no second copy); final/ is
    merged and adapter/ holds the adapter. Its dropout stays off: the policy runs in eval mode throughout."""
    eval_prompts: int = 200
    """Held-out world prompts (eval_prompts.jsonl) answered at each evaluation; 0: no evaluation."""
    eval_every: int = 20
    """Evaluate every N steps and at the end."""
    eval_batch_size: int = 64
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    rm_max_length: int = 0
    """Token cap of a conversation as the RM reads it (cut on the left). 0: the length the RM was trained at
    (`rm_max_length` in its config; for an RM from elsewhere 512, or its positions if fewer)."""

    def __post_init__(self):
        super().__post_init__()
        if self.max_steps < 1:  # 0 steps would save the SFT policy unchanged as ppo/final/
            raise FieldError("max_steps", f"must be 1 or more, got {self.max_steps}")
        if self.sampling.temperature <= 0:
            raise FieldError("sampling.temperature", "PPO samples its rollouts; expected > 0")
        if self.sampling.top_k or self.sampling.top_p < 1.0:
            # the ratio and the KL are computed from the full softmax; a truncated sampler is another policy
            raise FieldError(("sampling.top_k", "sampling.top_p"),
                             f"PPO's log-probabilities must be those of the sampler; set top_k: 0 and top_p: 1.0 "
                             f"(use temperature to sharpen), got {self.sampling.top_k} and {self.sampling.top_p}")
        if self.precision == "fp16":
            raise FieldError("precision", FP16_UNSUPPORTED)
        if not 0 <= self.critic_warmup_steps < self.max_steps:  # else the policy never trains
            raise FieldError(("critic_warmup_steps", "max_steps"), f"warmup must be 0 or more and leave steps for the "
                             f"policy, got {self.critic_warmup_steps} of {self.max_steps}")
        if self.init_kl_coef < 0:
            raise FieldError("init_kl_coef", f"must be 0 or more (a negative beta rewards leaving SFT), got "
                                              f"{self.init_kl_coef}")
        if self.kl_target is not None:
            if self.kl_target <= 0 or self.kl_horizon <= 0:
                raise FieldError(("kl_target", "kl_horizon"), f"must be > 0, got {self.kl_target} and "
                                                               f"{self.kl_horizon}")
            if self.init_kl_coef == 0:  # the controller scales beta: from 0 it never moves
                raise FieldError(("init_kl_coef", "kl_target"), "the adaptive controller scales beta, which stays 0 "
                                                                 "from 0: start it above 0, or set kl_target: null")
        for key, value, lowest, highest in (("gamma", self.gamma, 0.0, 1.0), ("lam", self.lam, 0.0, 1.0)):
            if not lowest <= value <= highest:
                raise FieldError(key, f"must be in [{lowest}, {highest}], got {value}")
        for key in ("cliprange", "cliprange_value", "adam_eps", "reward_clip"):
            if getattr(self, key) <= 0:  # clipping at 0 would zero every update / reward
                raise FieldError(key, f"must be > 0, got {getattr(self, key)}")
        if self.missing_eos_penalty is not None and abs(self.missing_eos_penalty) > self.reward_clip:
            # the penalty replaces the score before the clip: beyond it, -10 and -50 would both train as -5
            raise FieldError(("missing_eos_penalty", "reward_clip"),
                             f"a penalty of {self.missing_eos_penalty} is beyond reward_clip {self.reward_clip}, "
                             "which would clip it; raise reward_clip or lower the penalty")
        if self.ptx_block_size < 2:  # a block predicts its tokens from the ones before
            raise FieldError("ptx_block_size", f"must be 2 or more, got {self.ptx_block_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise FieldError("ema_decay", f"must be in [0, 1) (0: off), got {self.ema_decay}")
        if self.rollout_batch_size % self.minibatch_size or self.minibatch_size % self.grad_accum:
            raise FieldError(("rollout_batch_size", "minibatch_size", "grad_accum"),
                             f"each must divide the one before, got {self.rollout_batch_size}, "
                             f"{self.minibatch_size}, {self.grad_accum}")
