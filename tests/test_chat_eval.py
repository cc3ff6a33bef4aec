"""`make chat` in a real terminal (a pty): a typed world question gets the streamed greedy answer, the history
carries into the next turn, /reset forgets it and /quit leaves; and the one-shot `--prompt` mode for scripts."""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MICRO, REPO
from pipeline import chat
from pipeline.evaluation import load_prompts
from pipeline.generation import SamplingConfig, generate_responses
from test_report import ensure_micro_ppo

MAX_NEW = 24
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


@pytest.fixture(scope="session")
def micro_ppo(micro_sft, micro_rm, micro_runs) -> Path:
    return ensure_micro_ppo(micro_runs)


def world_question(micro_runs: Path, family: str) -> str:
    """The first held-out world prompt of a task family."""
    rows = load_prompts(micro_runs / "micro" / "world" / "eval_prompts.jsonl")
    return next(r["prompt"] for r in rows if r["family"] == family)


class Terminal:
    """A child process on a pseudo-terminal: what it prints is read back as a user would see it."""

    def __init__(self, argv: list[str], log: Path):
        master, slave = os.openpty()
        self.log = log.open("wb")
        env = {**os.environ, "TERM": "xterm", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=self.log, cwd=REPO, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.master, self.seen = master, b""

    def read_until(self, marker: str, timeout: float = 90.0) -> str:
        """Everything printed until `marker` (consumed), with terminal escape sequences removed."""
        deadline = time.monotonic() + timeout
        while marker.encode() not in ANSI.sub(b"", self.seen):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"no {marker!r} on the terminal; saw {self.seen!r}")
            if select.select([self.master], [], [], min(left, 1.0))[0]:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    pass
        text = ANSI.sub(b"", self.seen).decode()
        before, _, after = text.partition(marker)
        self.seen = after.encode()
        return before

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)
        self.log.close()


def greedy(model, tokenizer, prompt: str) -> str:
    return generate_responses(model, tokenizer, [prompt], SamplingConfig(MAX_NEW, temperature=0.0))[0][0]


@torch.no_grad()
def hf_greedy(model, tokenizer, messages: list[dict]) -> str:
    """Plain transformers `generate` on the chat-formatted history: an independent reference."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
    return tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True).strip()


def test_chat_streams_greedy_answers_keeps_history_resets_and_quits(micro_ppo, micro_runs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(micro_ppo).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_ppo)
    question, follow_up = world_question(micro_runs, "arithmetic"), world_question(micro_runs, "fact")
    first = greedy(model, tokenizer, question)
    second = hf_greedy(model, tokenizer, [{"role": "user", "content": question},
                                          {"role": "assistant", "content": first},
                                          {"role": "user", "content": follow_up}])
    assert first and second

    term = Terminal([sys.executable, "-m", "pipeline.chat", "--config", str(MICRO / "ppo.yaml"),
                     f"runs_dir={micro_runs}", "run_name=micro", "--stage", str(micro_ppo),
                     "--temperature", "0", "--max-new-tokens", str(MAX_NEW)], tmp_path / "stderr.log")
    try:
        banner = term.read_until("you> ")
        assert "/reset" in banner and "/quit" in banner and "greedy" in banner
        term.type(question)
        term.read_until("model> ")
        assert term.read_until("you> ").strip() == first
        term.type(follow_up)  # answered with the first exchange in its context
        term.read_until("model> ")
        assert term.read_until("you> ").strip() == second
        term.type("/reset")
        assert "new conversation" in term.read_until("you> ")
        term.type(question)
        term.read_until("model> ")
        assert term.read_until("you> ").strip() == first
        term.type("/quit")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()


def test_conversation_keeps_each_exchange_and_reset_forgets_them(micro_ppo, micro_runs):
    """What the terminal test cannot show when a tiny model answers alike with or without context: the
    history the next turn is prompted with, and that /reset empties it (back to the system message)."""
    model = AutoModelForCausalLM.from_pretrained(micro_ppo).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_ppo)
    question, follow_up = world_question(micro_runs, "arithmetic"), world_question(micro_runs, "fact")
    talk = chat.Conversation(model, tokenizer, SamplingConfig(MAX_NEW, temperature=0.0), system="Be brief.")
    first = "".join(talk.reply(question))
    assert first.strip()
    ids, _, _ = talk.prompt_ids([*talk.messages, {"role": "user", "content": follow_up}])  # the second turn's input
    prompted = tokenizer.decode(ids[0])
    assert question in prompted and first.strip() in prompted and follow_up in prompted  # the first exchange, then it
    second = "".join(talk.reply(follow_up))
    history = [("system", "Be brief."), ("user", question), ("assistant", first.strip()), ("user", follow_up),
               ("assistant", second.strip())]
    assert [(m["role"], m["content"]) for m in talk.messages] == history
    # a message longer than the context is refused and the history stays whole (it was emptied looking for room)
    with pytest.raises(chat.MessageTooLong):
        "".join(talk.reply("tell me more " * model.config.max_position_embeddings))
    assert [(m["role"], m["content"]) for m in talk.messages] == history
    # a reply cut short (Ctrl-C while it streams) leaves no trace either
    streaming = talk.reply(question)
    next(streaming)
    streaming.close()
    assert [(m["role"], m["content"]) for m in talk.messages] == history
    talk.reset()
    assert talk.messages == [{"role": "system", "content": "Be brief."}]


def test_one_shot_prompt_prints_the_answer_alone(micro_ppo, micro_runs, capsys):
    model = AutoModelForCausalLM.from_pretrained(micro_ppo).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_ppo)
    question = world_question(micro_runs, "word")
    chat.main(["--config", str(MICRO / "ppo.yaml"), f"runs_dir={micro_runs}", "run_name=micro", "--stage", "ppo",
               "--prompt", question, "--temperature", "0", "--max-new-tokens", str(MAX_NEW)])
    assert capsys.readouterr().out == greedy(model, tokenizer, question) + "\n"
    # a message longer than the model's context, and flags out of range: a message, not a traceback
    args = ["--config", str(MICRO / "ppo.yaml"), f"runs_dir={micro_runs}", "run_name=micro", "--stage", "ppo"]
    with pytest.raises(SystemExit, match=r"^--prompt: the message is \d+ tokens; the model's context is"):
        chat.main([*args, "--prompt", question * model.config.max_position_embeddings])
    with pytest.raises(SystemExit) as error:
        chat.main([*args, "--prompt", question, "--max-new-tokens", "0"])
    assert error.value.code == 2 and "--max-new-tokens: expected 1 or more, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:  # refused by SamplingConfig, named by the flag rather than its key
        chat.main([*args, "--prompt", question, "--top-p", "1.5"])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "--top-p:" in err and "key 'top_p'" not in err, err
    # a byte that is not UTF-8 (argv and stdin carry it as a surrogate escape): the tokenizer refused it
    assert chat.readable("caf\udcc3 ok") == "caf\ufffd ok" and chat.readable("café") == "café"
    chat.main([*args, "--prompt", "What\udcff is 2 plus 3?", "--temperature", "0", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.endswith("\n")


def test_sampled_chat_is_seeded_and_history_fits_the_context(micro_ppo):
    model = AutoModelForCausalLM.from_pretrained(micro_ppo).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_ppo)
    sampling = SamplingConfig(MAX_NEW, temperature=1.0, top_k=20, top_p=0.9)

    def reply(seed: int, conversation: chat.Conversation | None = None, text: str = "What is 12 plus 30?") -> str:
        conversation = conversation or chat.Conversation(model, tokenizer, sampling,
                                                         generator=torch.Generator().manual_seed(seed))
        return "".join(conversation.reply(text))

    assert reply(1) == reply(1)
    assert len({reply(s) for s in range(6)}) > 1  # sampling, not greedy
    # a long conversation never outgrows the model's context: the oldest exchanges are dropped
    conversation = chat.Conversation(model, tokenizer, sampling, generator=torch.Generator().manual_seed(0))
    for _ in range(12):
        reply(0, conversation, "Please write a short note inviting everyone to the big meadow picnic.")
        ids, budget, _ = conversation.prompt_ids()
        assert ids.size(1) + budget <= model.config.max_position_embeddings and budget == MAX_NEW
    assert conversation.messages[-1]["role"] == "assistant" and len(conversation.messages) < 24


def test_a_reply_cut_at_the_length_cap_says_so(micro_ppo, capsys):
    model = AutoModelForCausalLM.from_pretrained(micro_ppo).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_ppo)
    conversation = chat.Conversation(model, tokenizer, SamplingConfig(2, temperature=0.0))
    "".join(conversation.reply("Please write a short note inviting everyone to the big meadow picnic."))
    assert "(reply cut at 2 tokens by --max-new-tokens)" in capsys.readouterr().err
    # replies near the context's size: the next one gets its whole budget, earlier exchanges making room
    roomy = chat.Conversation(model, tokenizer, SamplingConfig(100, temperature=0.0))
    roomy.messages = [{"role": "user", "content": "Please write a short note inviting everyone to the picnic."},
                      {"role": "assistant", "content": "Dear friends, please come to the big meadow picnic. " * 2}]
    ids, budget, kept = roomy.prompt_ids([*roomy.messages, {"role": "user", "content": "What is 12 plus 30?"}])
    assert budget == 100 and len(kept) == 1 and ids.size(1) + budget <= model.config.max_position_embeddings


def test_eval_refuses_replies_that_would_run_past_the_models_positions(micro_sft):
    """Chat cuts a reply at the context's end; evaluation sampled on past it: a model with learnt positions failed
    in an IndexError, a RoPE one was scored on positions it never saw."""
    from pipeline.config import ConfigError

    model = AutoModelForCausalLM.from_pretrained(micro_sft).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_sft)
    prompts = ["What is 12 plus 30?", "Please write a short note inviting everyone to the big meadow picnic."]
    model.config.max_position_embeddings = 40
    with pytest.raises(ConfigError, match=r"key 'max_new_tokens': (\d+) tokens per sequence, but the model has 40 "
                                          r"positions") as refused:
        generate_responses(model, tokenizer, prompts, SamplingConfig(30, temperature=0.0))
    assert int(re.search(r"(\d+) tokens per sequence", str(refused.value)).group(1)) > 40  # prompt and its reply
    responses, _ = generate_responses(model, tokenizer, prompts[:1], SamplingConfig(8, temperature=0.0))
    assert len(responses) == 1  # within the positions: answered


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_a_greedy_chat_reply_is_the_answer_eval_gives(micro_sft, micro_runs, stage):
    """A weak model emits stray role tokens and runs to the length cap: chat dropped those tokens (eval keeps them,
    for the judge) and kept a cut reply's trailing whitespace, so its reply differed from eval's."""
    from pipeline.tokenizer import load_tokenizer

    final = micro_runs / "micro" / stage / "final"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(final).eval(), load_tokenizer(str(final))
    prompts = [r["prompt"] for r in load_prompts(micro_runs / "micro" / "world" / "eval_prompts.jsonl")][:24]
    greedy = SamplingConfig(MAX_NEW, temperature=0.0)
    answers, _ = generate_responses(model, tokenizer, prompts, greedy, batch_size=8)
    assert ["".join(chat.Conversation(model, tokenizer, greedy).reply(p)) for p in prompts] == answers
