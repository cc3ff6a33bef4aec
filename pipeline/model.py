"""The one model definition: a standard transformers architecture (Llama by default) built from a YAML spec.

Every stage uses it. The policy is `AutoModelForCausalLM`; the reward model and the PPO critic are the same
backbone with a scalar head (`AutoModelForSequenceClassification`, `num_labels=1`), which scores a sequence
at its last non-pad token. Checkpoints load with plain `from_pretrained`: no project code, no remote code.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import linecache
import math
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from pipeline.checkpoint import CheckpointError, checkpoint_config, loading_from, require_checkpoint
from pipeline.config import ConfigError

POLICY_STAGES = ("pretrain", "sft", "ppo")
SCALAR_STAGES = ("rm",)


@dataclass
class ModelSpec:
    """Architecture of a model trained from scratch. Ignored when `pretrained` names a checkpoint."""

    architecture: str = "llama"
    """Any transformers `model_type` (llama, qwen2, mistral, ...). Llama: RoPE, RMSNorm, SwiGLU, causal attention."""
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    """Fewer than num_attention_heads gives grouped-query attention."""
    intermediate_size: int = 704
    max_position_embeddings: int = 256
    """Longest sequence the model sees; also the pretraining block size cap."""
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    """Share input embeddings and LM head: saves vocab*hidden parameters, which matter at small sizes."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the transformers config (e.g. attention_dropout). A number YAML reads as text
    (1e-5) counts as a number where the config's setting is one."""
    tokenizer: str = ""
    """An existing tokenizer (path or hub id). Empty: the `pretrained` checkpoint's own when that is set (its
    embeddings are indexed by that vocabulary), else a byte-level BPE trained on the pretraining corpus."""
    vocab_size: int = 2048
    """Vocabulary size of the BPE tokenizer trained here (special tokens included)."""
    pretrained: str = ""
    """Start pretraining from this causal-LM checkpoint (path or hub id) instead of random weights."""

    def __post_init__(self) -> None:
        from pipeline.config import FieldError
        from pipeline.tokenizer import SPECIAL_TOKENS

        if self.pretrained:  # the checkpoint decides the architecture and its tokenizer the vocabulary
            return
        # refused here, before any data is read: transformers would fail deep in model building, or build a
        # model with no layers
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise FieldError(key, f"must be 1 or more, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads and "head_dim" not in self.extra:  # qwen3, mistral: own
            raise FieldError(("hidden_size", "num_attention_heads"), f"each head gets hidden_size / "
                             f"num_attention_heads dimensions: {self.hidden_size} is not a multiple of "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FieldError(("num_attention_heads", "num_key_value_heads"), f"grouped-query attention shares each "
                             f"key/value head among whole groups of heads: {self.num_attention_heads} is not a "
                             f"multiple of {self.num_key_value_heads}")
        if self.rope_theta <= 0:
            raise FieldError("rope_theta", f"must be above 0, got {self.rope_theta}")
        if not self.tokenizer and self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise FieldError("vocab_size", f"the byte-level BPE holds the 256 bytes and {len(SPECIAL_TOKENS)} "
                                           f"special tokens before any merge: use {256 + len(SPECIAL_TOKENS)} or "
                                           f"more, got {self.vocab_size}")
        check_architecture(self)


@dataclass
class LoraSpec:
    """Low-rank adapters (PEFT LoRA) instead of training every weight."""

    enabled: bool = False
    """On: train adapters only; final/ holds the merged plain checkpoint (SFT and PPO keep the adapter alone in
    adapter/ too)."""
    rank: int = 16
    """Adapter rank r: each adapted matrix gets r * (d_in + d_out) trainable parameters."""
    alpha: int = 32
    """The update is scaled by alpha / rank; alpha = 2 * rank is the usual choice."""
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Modules to adapt (Llama/Qwen/Mistral names: every attention and MLP projection).
    ["all-linear"]: every linear layer except the LM head."""

    def __post_init__(self) -> None:
        from pipeline.config import FieldError

        for key in ("rank", "alpha"):  # peft fails with a traceback at 0
            if getattr(self, key) < 1:
                raise FieldError(key, f"must be 1 or more, got {getattr(self, key)}")

    def peft_config(self, task_type: str, model: torch.nn.Module):
        """The PEFT LoraConfig for this spec on `model`; task_type "CAUSAL_LM" (policies) or "SEQ_CLS" (RM: the new
        scalar head stays fully trainable, as peft's modules_to_save). Targets the model lacks are refused by key:
        peft would fail with a traceback (the default names Llama's layers; GPT-2 calls them c_attn, c_fc, ...)."""
        from peft import LoraConfig

        targets = "all-linear" if self.target_modules == ["all-linear"] else self.target_modules
        # as peft matches a target: a module's whole name, or its end after a dot ("q_proj", "self_attn.q_proj");
        # of the layers it matches, peft adapts linear, embedding and convolution layers (not a block like "mlp")
        adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        matched = [module for name, module in model.named_modules()
                   if targets != "all-linear" and any(name == t or name.endswith(f".{t}") for t in targets)]
        if targets != "all-linear" and not any(isinstance(m, adaptable) or type(m).__name__ == "Conv1D"
                                               for m in matched):
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"})
            raise ConfigError(f"key 'lora.target_modules': no layer of this model that LoRA can adapt is named "
                              f"{targets}; its linear layers are {linear}. Name some of those, or set it to "
                              "['all-linear']")
        return LoraConfig(task_type=task_type, r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets)


def resume_lora(model, adapters: Path, needed_by: str):
    """`model` with a training checkpoint's LoRA adapters, trainable. A missing or cut-short adapter file is named
    (peft would look a missing one up on the hub, or fail in the safetensors reader)."""
    from peft import PeftModel

    weights = adapters / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{needed_by}: cannot resume from {adapters}: {weights.name} is missing. Remove this "
                              "checkpoint to resume from the one before, or start afresh without resume=true")
    with loading_from(adapters, needed_by):
        return PeftModel.from_pretrained(model, str(adapters), is_trainable=True)


# Weights (and so the optimizer state) stay fp32 in every stage, whatever dtype a checkpoint was saved in (a hub
# model in bf16, a ZeRO-3 16-bit save): mixed precision is autocast for the passes, not bf16 weights
# (transformers 5 would otherwise load a checkpoint in its saved dtype).
WEIGHTS_DTYPE = torch.float32


def build_causal_lm(spec: ModelSpec, tokenizer: Any, trust_remote_code: bool = False) -> torch.nn.Module:
    """A fresh model from `spec` (or the `pretrained` checkpoint), sized to the tokenizer's vocabulary."""
    if spec.pretrained:  # which stage made it is the caller's to check (pretraining does, before loading data)
        require_causal_lm(spec.pretrained, "key 'model.pretrained'")  # that it has an LM head is checked here too
        with loading_from(spec.pretrained, "key 'model.pretrained'"):
            model = AutoModelForCausalLM.from_pretrained(spec.pretrained, trust_remote_code=trust_remote_code,
                                                         dtype=WEIGHTS_DTYPE)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:  # the spec's own check refused an architecture and extra keys that do not fit (check_architecture)
        # no pad id: it would freeze the pad embedding
        config = model_config(spec, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
        try:  # some values pass the config and fail only in the layers (head_dim=0, hidden_act=foo)
            model = AutoModelForCausalLM.from_config(config)
        except BAD_VALUE_ERRORS as e:
            if not spec.extra:  # the spec's own fields are checked: not a setting's fault
                raise
            raise refused_extra(spec, e, "model's layers") from None
    set_special_token_ids(model, tokenizer)
    return model


# what transformers raises on a setting's value it cannot use, in a config or in the layers built from it (not
# RuntimeError: an allocation that fails is no setting's fault)
BAD_VALUE_ERRORS = (StrictDataclassError, ArithmeticError, LookupError, TypeError, ValueError)


def model_config(spec: ModelSpec, **tokens: Any) -> Any:
    """The transformers config of a model built from scratch: the spec's sizes and `model.extra`, plus `tokens`
    (the vocabulary size and special ids, once the tokenizer is known). A value it refuses is named by key."""
    try:
        return AutoConfig.for_model(
            spec.architecture, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
            intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position_embeddings,
            rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings, **tokens,
            **copy.deepcopy(spec.extra))  # a copy: transformers fills rope_scaling in place
    except BAD_VALUE_ERRORS as e:
        if not spec.extra:
            raise
        raise refused_extra(spec, e, "config") from None


def refused_extra(spec: ModelSpec, error: Exception, part: str) -> ConfigError:
    """A `model.extra` value that the architecture's `part` (its config, its layers) could not take, named by its
    key where the error shows which one."""
    key = extra_key_blamed(error, spec.extra)
    name, value = (f"model.extra.{key}", spec.extra[key]) if key else ("model.extra", spec.extra)
    said = str(error.__cause__ or error).strip().splitlines()[0]  # a strict config's cause says it in one line
    return ConfigError(f"key '{name}': the {spec.architecture} {part} cannot take {value!r} "
                       f"({type(error.__cause__ or error).__name__}: {said})")


def extra_key_blamed(error: Exception, extra: dict[str, Any]) -> str | None:
    """The `model.extra` key an error from transformers is about: named in its message or, innermost first, in a
    line of code it went through (`self.scaling = self.head_dim**-0.5`); else the one whose value a lookup missed
    (rope_scaling's rope_type). None if none is."""
    statements = ["".join(linecache.getline(frame.filename, line) for line in range(frame.lineno, (frame.end_lineno
                                                                                        or frame.lineno) + 1))
                  for frame in reversed(traceback.extract_tb(error.__traceback__))]  # whole, over several lines
    for text in (str(error), *statements):
        named = [key for key in extra if re.search(rf"\b{re.escape(key)}\b", text)]
        if named:
            return named[0]
    missing = error.args[0] if isinstance(error, KeyError) and error.args else None
    return next((key for key, value in extra.items() if isinstance(missing, str)
                 and (value == missing or isinstance(value, dict) and missing in value.values())), None)


# keyword arguments a config takes without keeping them as attributes
RUNTIME_CONFIG_KEYS = ("attn_implementation",)
# ModelSpec's own fields, which build_causal_lm passes to the config itself
SPEC_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings")


def check_architecture(spec: ModelSpec) -> None:
    """A model built from scratch: its architecture must be a transformers causal LM, and a typo in `model.extra`
    (attention_dropuot), which a transformers config would store as a new attribute, changing nothing, is refused
    with the keys the architecture's config does have. Its values are typed as the config's (as_number), and one
    the config refuses is named by its key."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if spec.architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        from transformers import CONFIG_MAPPING

        what = "a transformers causal language model" if spec.architecture in CONFIG_MAPPING else \
            "a transformers model_type"
        close = difflib.get_close_matches(spec.architecture, list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=1)
        raise ConfigError(f"key 'model.architecture': {spec.architecture!r} is not {what}"
                          + (f" (did you mean '{close[0]}'?)" if close else " (llama, qwen2, mistral, ...)"))
    defaults = AutoConfig.for_model(spec.architecture)
    for key in spec.extra:
        if key in SPEC_CONFIG_KEYS:
            raise ConfigError(f"key 'model.extra.{key}': set it as model.{key}")
        if key not in RUNTIME_CONFIG_KEYS and not hasattr(defaults, key):
            known = [k for k in defaults.to_dict() if not k.startswith("_")] + list(RUNTIME_CONFIG_KEYS)
            close = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"key 'model.extra.{key}': the {spec.architecture} config has no such setting"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))
    spec.extra = {key: as_number(key, value, getattr(defaults, key, None)) for key, value in spec.extra.items()}
    model_config(spec)  # its values too, before any data is read


def as_number(key: str, value: Any, default: Any) -> Any:
    """The `model.extra` value of `key` as the config's `default` types it: YAML reads 1e-5 (no dot) as text, and 1
    as an integer, both of which a transformers config refuses for a float setting (rms_norm_eps); 16.0 for an
    integer setting is 16."""
    if isinstance(default, bool) or not isinstance(default, (int, float)) or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"key 'model.extra.{key}': expected a finite number (the config's default is "
                              f"{default!r}), got {value!r}")
        return int(number) if isinstance(default, int) and number.is_integer() else number
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():  # 16.0 for head_dim
        return int(value)
    return float(value) if isinstance(default, float) and isinstance(value, int) else value


def fit_embeddings(model: Any, tokenizer: Any, needed_by: str = "") -> None:
    """Grow the embeddings of an outside model whose tokenizer was given our chat or pad tokens (load_tokenizer),
    so those ids do not index past the table. The new rows start untrained."""
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        print(f"[{needed_by or 'model'}] {len(tokenizer) - n_embeddings} chat/pad token(s) added to the vocabulary "
              "(untrained embeddings)", file=sys.stderr)
        model.resize_token_embeddings(len(tokenizer))


def check_lora_can_train(tokenizer: Any, init: str) -> None:
    """Refuse LoRA on a model whose chat role tokens are untrained embedding rows (untrained_role_tokens): adapters
    leave them at their start, the role markers all but identical, and TRL's fused LM head reads the head's weight
    directly, past peft's trainable-token wrappers."""
    from pipeline.tokenizer import untrained_role_tokens

    untrained = untrained_role_tokens(tokenizer)
    if untrained:
        raise ConfigError(f"key 'lora.enabled': {init} got our role tokens ({', '.join(untrained)}) where its "
                          "tokenizer had no chat template, and no stage has trained their embeddings since; LoRA "
                          "cannot train them. Fine-tune it in full (lora.enabled=false), as SFT then does, or start "
                          "from a checkpoint whose tokenizer has a chat template")


def check_length_fits(model: Any, length: int, key: str, hint: str = "") -> None:
    """Refuse sequences of `length` tokens (config `key`) beyond the model's positions: a Llama would run past
    them without a word, on positions it never learnt, and a GPT-2 crashes mid-run with an IndexError."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and length > positions:
        raise ConfigError(f"key {key!r}: {length} tokens per sequence, but the model has {positions} positions "
                          f"(max_position_embeddings in its config); lower {key}{hint}")


def set_special_token_ids(model: Any, tokenizer: Any) -> None:
    """Record BOS/EOS/PAD in the model and generation configs, so plain `generate` stops at end of turn. Stop
    tokens a hub model's generation config lists besides (<|endoftext|> beside <|im_end|>) are kept after ours."""
    generation = getattr(model, "generation_config", None)
    for cfg in (model.config, generation):
        if cfg is not None:
            cfg.bos_token_id, cfg.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if generation is not None:
        from pipeline.generation import stop_token_ids

        stops = stop_token_ids(model, tokenizer)
        generation.eos_token_id = stops if len(stops) > 1 else stops[0]


def load_causal_lm(path: str, needed_by: str, trust_remote_code: bool = False,
                   allowed_stages: tuple[str, ...] = POLICY_STAGES, tokenizer: Any = None) -> torch.nn.Module:
    """A policy checkpoint: a local stage output (checked for its stage) or any HF causal LM (path or hub id).
    With `tokenizer`, the embeddings are grown to fit it (fit_embeddings)."""
    if Path(path).exists():
        require_checkpoint(path, allowed_stages, needed_by)
        require_causal_lm(path, needed_by)
    with loading_from(path, needed_by):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=WEIGHTS_DTYPE)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer, needed_by)
    return model


def require_causal_lm(path: str | Path, needed_by: str) -> None:
    """Refuse a local scalar-head model from elsewhere (our own say which stage made them) as a causal LM: its LM
    head would be the tied embeddings, or random, and it would answer in noise. A hub id passes (no config here)."""
    architectures = (checkpoint_config(path) or {}).get("architectures") or []
    if architectures and all(a.endswith(("ForSequenceClassification", "ForTokenClassification"))
                             for a in architectures):
        raise CheckpointError(f"{needed_by}: {path} is a {architectures[0]} (a reward or classifier model), "
                              "not a causal language model")


def load_scalar_model(path: str, needed_by: str, tokenizer: Any, trust_remote_code: bool = False,
                      allowed_stages: tuple[str, ...] = POLICY_STAGES + SCALAR_STAGES,
                      trained_head: bool = False) -> torch.nn.Module:
    """The backbone at `path` with a scalar head: a trained RM, or a policy checkpoint whose new head starts random
    (refused with `trained_head`: a scorer with a random head scores nothing)."""
    if Path(path).exists():
        require_checkpoint(path, allowed_stages, needed_by)
    # transformers prints a table for every key a load misses; from a policy checkpoint the scalar head is the one
    # expected miss, so check the keys here and say in one line what was new
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with loading_from(path, needed_by):
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, trust_remote_code=trust_remote_code, output_loading_info=True, dtype=WEIGHTS_DTYPE)
    finally:
        hf_logging.set_verbosity(verbosity)
    head = {name for name, _ in model.named_parameters() if name.split(".")[0] in ("score", "classifier")}
    if loading["missing_keys"] - head:
        print(f"[{needed_by}] warning: {path} lacks weights for {sorted(loading['missing_keys'] - head)}; "
              f"they start random", file=sys.stderr)
    elif loading["missing_keys"] and trained_head:
        missing = ", ".join(sorted(loading["missing_keys"]))
        raise CheckpointError(f"{needed_by}: {path} has no trained scalar head ({missing} would start random): "
                              "it is no reward model")
    elif loading["missing_keys"]:
        print(f"[{needed_by}] {path}: backbone loaded, new scalar head ({', '.join(sorted(loading['missing_keys']))})"
              f" starts random")
    fit_embeddings(model, tokenizer, needed_by)
    # the score is read at the last non-pad token, which needs the pad id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    # ZeRO-3 leaves each rank an empty tensor per parameter and the whole count in `ds_numel`
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters that cost FLOPs per token (for MFU): all but the input embedding table, a lookup. A table tied
    to the LM head is counted once, and the head's matmul costs: then nothing is left out."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    return count_parameters(model) - (0 if tied else embeddings.weight.numel())


@contextlib.contextmanager
def fp32_forward(model: torch.nn.Module):
    """Run `model` with its own fp32 forward inside this block, even while accelerate's mixed-precision autocast
    wrapper is on it (prepare() keeps the original as `_original_forward`). Evaluations use it so that the
    figures a stage reports are the ones a plain `from_pretrained` load reproduces. A flash-attention model runs on
    SDPA meanwhile: flash kernels refuse fp32 (pretraining may train with one: a runtime choice, not saved)."""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if isinstance(attention, str) and "flash" in attention:  # its kernels take half precision only: SDPA in fp32
        config._attn_implementation = "sdpa"
    original = model.__dict__.get("_original_forward")
    patched = model.__dict__.get("forward")
    if original is not None:  # (not wrapped: no autocast to undo)
        model.forward = original
    try:
        yield model
    finally:
        if original is not None:
            model.forward = patched
        if config is not None and attention != getattr(config, "_attn_implementation", None):
            config._attn_implementation = attention
