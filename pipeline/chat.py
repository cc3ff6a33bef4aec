"""Chat with any stage's model in the terminal: `make chat STAGE=sft|ppo|pretrain|path/to/checkpoint`.

    python -m pipeline.chat --config configs/tiny/ppo.yaml run_name=tiny --stage ppo [--temperature 0.7 ...]
    python -m pipeline.chat --config configs/tiny/ppo.yaml --stage sft --prompt "What is 12 plus 30?"

The conversation goes through the chat template, so the model sees the format it was trained on. Replies
stream token by token (the KV-cache loop of pipeline.generation.sample, for one conversation: a greedy reply
is the one `make eval` scores), and the history is kept across turns; the oldest turns are dropped when it
outgrows the model's context. Commands: /reset starts a new conversation, /quit (or Ctrl-D) leaves.

`--prompt "..."` answers once and exits, for scripts: the reply alone goes to stdout, everything else to stderr.
"""
from __future__ import annotations

import argparse
import random
import sys
from typing import Iterator

import torch

from pipeline.checkpoint import DEFAULT_MAX_NEW_TOKENS
from pipeline.evaluate import (RUN_KEYS, SAMPLING_FLAGS, add_run_arguments, add_sampling_arguments, default_device,
                               describe_sampling, load_policy, load_run_config, resolve_checkpoint, sampling_from_args)
from pipeline.generation import SamplingConfig, sample_steps, stop_token_ids
from pipeline.runs import run_main

CHAT_SAMPLING = SamplingConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.7, top_k=0, top_p=0.95)
"""Defaults for chatting: some variety, the unlikely tail cut off. --temperature 0 gives the greedy reply."""

HELP = "/reset starts a new conversation, /quit (or Ctrl-D) leaves."


def stream_tokens(model, input_ids: torch.Tensor, sampling: SamplingConfig, stops: list[int],
                  generator: torch.Generator | None = None) -> Iterator[int]:
    """Sample one reply to a [1, T] prompt, yielding each token as soon as it is chosen (the stop token included;
    `stops`: stop_token_ids()).

    The same loop as batched generation (pipeline.generation.sample_steps), so a greedy reply equals make eval's.
    """
    for token in sample_steps(model, input_ids, torch.ones_like(input_ids), sampling, stops, stops[0],
                              generator):
        yield int(token[0])
        if int(token[0]) in stops:
            return


class MessageTooLong(ValueError):
    """A message that leaves no room for a reply within the model's context."""


class Conversation:
    """Multi-turn history in the chat format, and replies streamed as text."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, system: str = "",
                 generator: torch.Generator | None = None):
        self.model, self.tokenizer, self.sampling, self.generator = model, tokenizer, sampling, generator
        self.system = system
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, messages: list[dict] | None = None) -> tuple[torch.Tensor, int, list[dict]]:
        """`messages` (default: the history) as model input: (ids [1, T], reply budget, the messages kept: the
        oldest exchanges are left out until a reply of max_new_tokens fits the context, or only the last message is
        left). The history itself is not changed."""
        kept = list(self.messages if messages is None else messages)
        first = 1 if self.system else 0
        while True:
            # as pipeline.generation.encode_prompts: the template's text, tokenized without extra special tokens
            text = self.tokenizer.apply_chat_template(kept, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            budget = self.sampling.max_new_tokens
            if self.context:
                budget = min(budget, self.context - ids.size(1))
            if budget >= self.sampling.max_new_tokens or len(kept) - first <= 1:
                return ids, budget, kept
            del kept[first:first + 2]  # the oldest exchange: a user turn and its reply

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to a user turn. The turn, its reply and any exchanges dropped to fit the context change
        the history only once the reply is complete: a message too long, or an interrupted reply, leaves it as
        it was."""
        asked = [*self.messages, {"role": "user", "content": text}]
        ids, budget, kept = self.prompt_ids(asked)
        if budget <= 0:
            raise MessageTooLong(f"the message is {ids.size(1)} tokens; the model's context is {self.context}")
        dropped = (len(asked) - len(kept)) // 2
        if dropped:
            print(f"(dropped the {dropped} oldest exchange(s) to fit the model's {self.context}-token context)",
                  file=sys.stderr, flush=True)
        device = next(self.model.parameters()).device
        stops = stop_token_ids(self.model, self.tokenizer)
        tokens: list[int] = []
        shown, stopped = "", False
        for token in stream_tokens(self.model, ids.to(device), SamplingConfig(
                budget, self.sampling.temperature, self.sampling.top_k, self.sampling.top_p),
                stops, self.generator):
            if token in stops:
                stopped = True
                break
            tokens.append(token)
            # as eval decodes a reply (decode_responses): a stray special token stays, the whitespace around
            # the reply goes (trailing whitespace waits for what follows it)
            text_so_far = self.tokenizer.decode(tokens).strip()
            if text_so_far.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            yield text_so_far[len(shown):]
            shown = text_so_far
        reply = self.tokenizer.decode(tokens).strip()
        if reply != shown:  # the end of a reply cut at the length cap in the middle of a character
            yield reply[len(shown):]
        if not stopped:  # it is kept as said, but it did not end: say so rather than pass it off as finished
            limit = "--max-new-tokens" if budget == self.sampling.max_new_tokens else \
                f"the model's {self.context}-token context"
            print(f"\n(reply cut at {budget} tokens by {limit})", file=sys.stderr, flush=True)
        self.messages = [*kept, {"role": "assistant", "content": reply}]


def readable(text: str) -> str:
    """Text as typed, with bytes that are not UTF-8 (read or passed as surrogate escapes) shown as U+FFFD: the
    tokenizer refuses lone surrogates, and the session would end with its history."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    add_sampling_arguments(parser, CHAT_SAMPLING)
    parser.add_argument("--prompt", help="answer this one message and exit (the reply alone goes to stdout)")
    parser.add_argument("--system", default="", help="a system message at the start of the conversation")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampling (default: a fresh one)")
    args = parser.parse_intermixed_args(argv)
    # the seed is --seed (no seed= override: the run's seed would give every chat the same replies)
    cfg = load_run_config(args.config, args.overrides, "chat", RUN_KEYS, {**SAMPLING_FLAGS, "seed": "--seed"})
    sampling = sampling_from_args(args, parser)
    path, label = resolve_checkpoint(cfg, args.stage)
    device = default_device()
    model, tokenizer = load_policy(path, cfg.trust_remote_code, device, "chat")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    chat = Conversation(model, tokenizer, sampling, readable(args.system),
                        torch.Generator(device=device).manual_seed(seed))

    if args.prompt is not None:
        try:
            for piece in chat.reply(readable(args.prompt)):
                print(piece, end="", flush=True)
        except MessageTooLong as e:
            raise SystemExit(f"--prompt: {e}") from None
        print()
        return

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    if hasattr(sys.stdin, "reconfigure"):  # a byte that is not UTF-8 reaches readable(), not a UnicodeDecodeError
        sys.stdin.reconfigure(errors="surrogateescape")
    print(f"Chatting with {label} ({path}); {describe_sampling(sampling)}.\n{HELP}", flush=True)
    while True:
        try:
            text = readable(input("you> ")).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            chat.reset()
            print("(new conversation)", flush=True)
            continue
        if text.startswith("/") or not text:
            if text:
                print(f"unknown command {text}. {HELP}", flush=True)
            continue
        print("model> ", end="", flush=True)
        try:
            for piece in chat.reply(text):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        except MessageTooLong as e:
            print(f"({e})", end="")
        print(flush=True)


if __name__ == "__main__":
    run_main(main, interrupted="interrupted")
