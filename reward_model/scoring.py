"""Score (prompt, response) pairs with any reward-model checkpoint: the API PPO and evaluation import.

A response is scored as the whole chat turn (the user prompt, then the assistant's reply ending with the
end-of-turn token) by a scalar-head model, read at the last non-pad token. The RM stage stores the mean and
std of its scores over SFT samples in the checkpoint's config (`reward_mean`, `reward_std`), so PPO can
normalise rewards; a checkpoint without them normalises with (0, 1). It also stores the token length it was
trained at (`rm_max_length`), which scoring uses unless told otherwise (else 512, or the model's positions if
fewer).
"""
from __future__ import annotations

import jinja2
import torch

from pipeline.checkpoint import CheckpointError
from pipeline.model import load_scalar_model
from pipeline.tokenizer import first_refused, load_tokenizer, prompt_messages, quoted


def conversation_text(tokenizer, prompt: str, response: str) -> str:
    """The exact text the RM reads for one (prompt, response) pair: the policy's prompt (chat_prompt) and the reply,
    without surrounding whitespace (as it trained: replies are decoded and stripped, or loaded stripped)."""
    return tokenizer.apply_chat_template([*prompt_messages(prompt), {"role": "assistant", "content": response.strip()}],
                                         tokenize=False)


def encode_conversations(tokenizer, prompts: list[str], responses: list[str], max_length: int = 512,
                         device: torch.device | str = "cpu") -> dict:
    """Right-padded token batch of the conversations (truncated on the left so the reply's end survives)."""
    texts = [conversation_text(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    side, trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                          add_special_tokens=False)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc
    return {k: v.to(device) for k, v in batch.items()}


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score per row, read at the last non-pad token (transformers' sequence-classification pooling).

    Positions count real tokens only, so a row scores the same whether it is padded on the right, on the
    left (PPO's left-padded prompts) or not at all.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids).logits.squeeze(-1).float()


class RewardScorer:
    """A frozen reward model: `scorer.score(prompts, responses)` -> tensor of scores."""

    def __init__(self, path: str, device: torch.device | str = "cpu", trust_remote_code: bool = False,
                 needed_by: str = "scoring"):
        self.tokenizer = load_tokenizer(path, trust_remote_code, keep_pad=True)  # where its score was trained
        self.model = load_scalar_model(path, needed_by, self.tokenizer, trust_remote_code, allowed_stages=("rm",),
                                       trained_head=True).to(device).eval()
        self.model.requires_grad_(False)
        self.path, self.needed_by, self.device = path, needed_by, device
        self.mean = float(getattr(self.model.config, "reward_mean", 0.0))
        self.std = float(getattr(self.model.config, "reward_std", 1.0)) or 1.0
        # an RM from elsewhere: 512 tokens, or its positions if it has fewer
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = int(getattr(self.model.config, "rm_max_length", 0) or min(512, positions))

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64, normalize: bool = False,
              max_length: int = 0) -> torch.Tensor:
        """`max_length` 0: the length the RM was trained at (cut on the left beyond it)."""
        max_length = max_length or self.max_length
        scores = []
        for start in range(0, len(prompts), batch_size):
            some_prompts, some_responses = prompts[start:start + batch_size], responses[start:start + batch_size]
            try:
                batch = encode_conversations(self.tokenizer, some_prompts, some_responses, max_length, self.device)
            except jinja2.TemplateError as error:
                raise self.refusal(list(zip(some_prompts, some_responses)), error) from None
            scores.append(sequence_scores(self.model, batch["input_ids"], batch["attention_mask"]))
        out = torch.cat(scores) if scores else torch.empty(0)
        return (out - self.mean) / self.std if normalize else out

    def refusal(self, pairs: list[tuple[str, str]], error: jinja2.TemplateError) -> CheckpointError:
        """A conversation this RM's chat template refuses (a reply too long for it, a role it does not take) ended
        in a Jinja traceback mid-run (PPO scores each rollout): named by its prompt and reply, under the key that
        chose this RM."""
        which = "a conversation"
        if found := first_refused(pairs, lambda pair: conversation_text(self.tokenizer, *pair)):
            _, (prompt, response), error = found
            which = f"the conversation of prompt {quoted(prompt)} and reply {quoted(response)}"
        return CheckpointError(f"{self.needed_by}: the chat template of {self.path} refuses {which}: {error}. Score "
                               "with a reward model whose template takes it")
