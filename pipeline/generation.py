"""Batched sampling with the KV cache: one code path for evaluation, preference collection and PPO rollouts.

Prompts are left-padded so every row's next token sits in the last column. Sampling stops per row at a stop
token (our end-of-turn token, and any other the model's generation config lists, as plain `generate` does), and
the loop ends when every row has stopped or the length cap is hit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from data.loading import DataError
from pipeline.config import ConfigError, FieldError
from pipeline.model import check_length_fits
from pipeline.tokenizer import chat_prompt


@dataclass
class SamplingConfig:
    max_new_tokens: int = 48
    """Response length cap (tokens)."""
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0: off)."""

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:  # NaN fails this too
            raise FieldError("temperature", f"must be 0 (greedy) or a finite number above, got {self.temperature}")
        if self.top_k < 0:
            raise FieldError("top_k", f"must be 0 (off) or above, got {self.top_k}")
        if not 0 < self.top_p <= 1:  # top_p 0 would drop every token; greedy is temperature 0
            raise FieldError("top_p", f"must be above 0 and at most 1 (1: off; for greedy set temperature: 0), "
                                      f"got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside top-k and outside the top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS (our end-of-turn token) first, then any other the model's
    generation config lists (a hub model's <|endoftext|> beside <|im_end|>), where plain `generate` stops too."""
    config = getattr(getattr(model, "module", model), "generation_config", None)  # under DDP: the wrapped model
    listed = getattr(config, "eos_token_id", None)
    listed = listed if isinstance(listed, (list, tuple)) else [listed]
    return [tokenizer.eos_token_id, *(i for i in listed if i is not None and i != tokenizer.eos_token_id)]


def _as_ids(stop_token_ids: int | Sequence[int]) -> list[int]:
    return [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)


def kv_cache_keyword(model) -> str:
    """The forward's keyword for the KV cache: `cache` since transformers 5.24, where `past_key_values` warns (and
    goes in 5.40); a model's own code (trust_remote_code) or an older transformers takes `past_key_values`. Read
    from the bare model's signature: DDP, torch.compile and PEFT wrappers take **kwargs."""
    import inspect

    bare = model
    while True:
        inner = getattr(bare, "module", None) or getattr(bare, "_orig_mod", None) or \
            (bare.get_base_model() if hasattr(bare, "get_base_model") else None)
        if inner is None or inner is bare:
            break
        bare = inner
    return "cache" if "cache" in inspect.signature(bare.forward).parameters else "past_key_values"


def kv_cache_of(out) -> Any:
    """The KV cache a forward returned, under its name in the installed transformers (kv_cache_keyword)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def sample_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig,
                 stop_token_ids: int | Sequence[int], pad_token_id: int, generator: torch.Generator | None = None
                 ) -> Iterator[torch.Tensor]:
    """Yield each row's next token ([B]), step by step, for left-padded prompts. After a stop token (EOS, or one of
    `stop_token_ids`: see stop_token_ids()) a row yields pad.

    One loop serves batched sampling (`sample`) and streaming chat (a batch of one).
    """
    batch = input_ids.size(0)
    cache_keyword = kv_cache_keyword(model)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    cache, logits = kv_cache_of(out), out.logits[:, -1, :]
    next_position = position_ids[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    stops = torch.tensor(_as_ids(stop_token_ids), device=input_ids.device)
    for _ in range(sampling.max_new_tokens):
        if sampling.temperature <= 0:
            token = logits.argmax(-1)
        else:
            probs = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        yield token
        finished |= torch.isin(token, stops)
        if finished.all():
            return
        # finished rows keep decoding pad; their outputs are discarded, so their mask value does not matter
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    use_cache=True, **{cache_keyword: cache})
        cache, logits = kv_cache_of(out), out.logits[:, -1, :]
        next_position = next_position + 1


def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig,
           stop_token_ids: int | Sequence[int], pad_token_id: int, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Sample continuations of left-padded prompts. Returns [B, T_new] tokens; after a stop token a row holds pad."""
    steps = list(sample_steps(model, input_ids, attention_mask, sampling, stop_token_ids, pad_token_id, generator))
    if not steps:
        return input_ids.new_empty(input_ids.size(0), 0)
    return torch.stack(steps, dim=1)


def encode_prompts(tokenizer, prompts: list[str], device: torch.device | str = "cpu") -> dict:
    """Chat-format single-turn prompts and left-pad them into a batch."""
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in batch.items()}


def prompts_that_fit(rows: list[dict], tokenizer, model, max_new_tokens: int, max_prompt_tokens: int, source: str,
                     needed_by: str, report: bool = True) -> list[dict]:
    """The rows whose chat-formatted prompt is at most `max_prompt_tokens` tokens long (0: whatever leaves room for
    `max_new_tokens` within the model's positions; `model` may be a tuple of the models that read prompt and reply,
    as PPO's policy and critic: then within the fewest positions). Longer prompts are dropped, with a count: past the
    positions a model has, sampling breaks, and one long prompt pads its whole batch to its length."""
    models = model if isinstance(model, tuple) else (model,)
    positions = min((n for m in models if (n := getattr(m.config, "max_position_embeddings", None))), default=None)
    room = positions - max_new_tokens if positions else None
    if room is not None and room <= 0:
        raise ConfigError(f"key 'sampling.max_new_tokens': {max_new_tokens} new tokens leave no room for a prompt "
                          f"within the model's {positions} positions")
    caps = [cap for cap in (max_prompt_tokens, room) if cap]
    if not caps:
        return rows
    limit = min(caps)
    lengths = [len(ids) for ids in tokenizer([chat_prompt(tokenizer, r["prompt"]) for r in rows],
                                             add_special_tokens=False)["input_ids"]]
    kept = [row for row, n in zip(rows, lengths) if n <= limit]
    if not kept:
        raise DataError(source, f"every prompt is longer than {limit} tokens (max_prompt_tokens"
                                + (f" {max_prompt_tokens})" if max_prompt_tokens else
                                   f" 0: the model's {positions} positions less {max_new_tokens} new tokens)"))
    if len(kept) < len(rows) and report:
        print(f"[{needed_by}] {len(rows) - len(kept)} of {len(rows)} prompts from {source} are longer than {limit} "
              f"tokens: dropped (max_prompt_tokens)")
    return kept


def decode_responses(tokenizer, response_tokens: torch.Tensor, stop_token_ids: int | Sequence[int] | None = None
                     ) -> list[str]:
    """Each sampled reply's text up to its stop token (default: EOS, our end-of-turn token). Any other special
    token the policy emitted (a stray `<|user|>`) stays in the text: the RM and the gold judge must see a broken
    turn to penalise it."""
    stops = set(_as_ids(tokenizer.eos_token_id if stop_token_ids is None else stop_token_ids))
    texts = []
    for row in response_tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        texts.append(tokenizer.decode(row[:end]).strip())  # the sampler pads only after a stop: no pad is left
    return texts


def ended_with_stop(response_tokens: torch.Tensor, stop_token_ids: int | Sequence[int]) -> list[bool]:
    """Whether each sampled reply ended with a stop token, rather than at the length cap."""
    stops = torch.tensor(_as_ids(stop_token_ids), device=response_tokens.device)
    return torch.isin(response_tokens, stops).any(-1).tolist()


def generate_responses(model, tokenizer, prompts: list[str], sampling: SamplingConfig, batch_size: int = 32,
                       seed: int | None = None) -> tuple[list[str], list[bool]]:
    """Answer each prompt in the chat format. Returns the responses and whether each ended with a stop token."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    responses, ended = [], []
    stops = stop_token_ids(model, tokenizer)
    for start in range(0, len(prompts), batch_size):
        batch = encode_prompts(tokenizer, prompts[start:start + batch_size], device)
        longest = int(batch["attention_mask"].sum(1).max()) if len(batch["input_ids"]) else 0
        # the longest prompt and its reply within the model's positions, as chat cuts a reply at the context's end
        check_length_fits(model, longest + sampling.max_new_tokens, "max_new_tokens",
                          f" (make eval: --max-new-tokens) or leave out the prompts longer than {longest - 1} tokens")
        tokens = sample(model, batch["input_ids"], batch["attention_mask"], sampling, stops, tokenizer.pad_token_id,
                        generator)
        responses += decode_responses(tokenizer, tokens, stops)
        ended += ended_with_stop(tokens, stops)
    model.train(was_training)
    return responses, ended
