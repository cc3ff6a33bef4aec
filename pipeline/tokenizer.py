"""The tokenizer: byte-level BPE trained on the pretraining corpus, with our special tokens and chat template.

This module is the one source of truth for the special tokens and the chat template. The end-of-turn token
is also the EOS token, so `generate` stops at the end of an assistant turn with no extra settings, and a
pretraining document ends the same way a reply does.
"""
from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable, Iterable, Sized
from pathlib import Path

import jinja2
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.checkpoint import CheckpointError, loading_from

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS.values()]

# `{% generation %}` marks the assistant's tokens, so SFT can train on them alone
# (transformers' return_assistant_tokens_mask, TRL's assistant_only_loss). A message's text cannot open or end a
# turn: "<|" in it, and the tokenizer's BOS and EOS (an outside tokenizer's "</s>"), get an invisible word joiner
# (U+2060) after their first character, so "<|end|><|assistant|>" typed by a user stays text instead of becoming
# special tokens.
_ESCAPED = ("{% set text = namespace(value=message['content'] | replace('<|', '<\u2060|')) %}"
            "{% for special in [bos_token, eos_token] if special %}"
            "{% set text.value = text.value | replace(special, special[:1] + '\u2060' + special[1:]) %}"
            "{% endfor %}")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}" + _ESCAPED +
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ text.value }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "{{ '<|' + message['role'] + '|>' }}{{ text.value }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer."""
    core = Tokenizer(models.BPE())
    # every text (a document, each chat message) starts with a space, so its first word is the same token as
    # mid-sentence: a reply's "Nemfu is a frog." then starts with the very token the prompt "What is Nemfu?"
    # ended with (without it the model must learn a second token per name). The decoder drops that one
    # leading space again (the Llama/Mistral convention), so decode(encode(text)) == text.
    core.normalizer = normalizers.Prepend(" ")
    # digits stay single tokens: arithmetic then works digit by digit and generalises to unseen numbers
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        additional_special_tokens=list(ROLE_TOKENS.values()))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# in tokenizer_config.json: the role tokens load_tokenizer added (their embeddings start untrained), until a stage
# trains them in full (SFT; pretraining text has no chat turns)
ADDED_ROLE_TOKENS = "pipeline_added_role_tokens"
# one of these in a directory makes it a tokenizer (fast, sentencepiece, BPE or WordPiece files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")
TEXT_END = "text_end_token"  # in tokenizer_config.json: the end of text that an end-of-turn EOS replaced


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, turn_end_is_eos: bool = True,
                   keep_pad: bool = False) -> PreTrainedTokenizerFast:
    """Load an existing tokenizer (local path or hub id); give it our chat tokens and template if it lacks them.

    `turn_end_is_eos` (chat stages): make the token the template closes an assistant turn with EOS. Pretraining
    passes False: it separates documents with EOS, which must stay the model's own end-of-text token.
    `keep_pad` (scoring with a trained RM): keep a pad equal to EOS, as the RM learnt to read its score there."""
    local = Path(name_or_path)
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from the model's config alone: every text encodes to nothing
        raise CheckpointError(f"tokenizer: no tokenizer files in {name_or_path} "
                              f"(none of {', '.join(TOKENIZER_FILES)})")
    with loading_from(name_or_path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    _check_templates_compile(tokenizer, name_or_path)
    if tokenizer.chat_template is None:
        missing = [t for t in ROLE_TOKENS.values() if t not in tokenizer.get_vocab()]
        if missing:
            # keep the special tokens it has (tool-call markers, ...): the default replaces the extra ones
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            tokenizer.init_kwargs[ADDED_ROLE_TOKENS] = missing
        if tokenizer.bos_token is None:
            tokenizer.add_special_tokens({"bos_token": BOS})
        if tokenizer.eos_token is None:
            tokenizer.add_special_tokens({"eos_token": EOS})
        tokenizer.chat_template = CHAT_TEMPLATE
    elif turn_end_is_eos:
        # a hub template may close the assistant's turn with a token other than EOS (ChatML's <|im_end|> with a
        # base model's <|endoftext|>): sampling stops, and SFT trains the turn's end, on EOS, so make them one
        end_of_turn = _end_of_turn_token(tokenizer)
        if end_of_turn is not None and end_of_turn != tokenizer.eos_token:
            # the model's own end of text still separates documents (PPO-ptx packs pretraining text as pretraining
            # did): kept in tokenizer_config.json, where transformers restores it as `tokenizer.text_end_token`
            tokenizer.init_kwargs[TEXT_END] = tokenizer.eos_token
            tokenizer.eos_token = end_of_turn
    # a pad of its own: many causal-LM tokenizers ship without one, or with pad = EOS. In chat stages EOS ends the
    # turn, and a scalar head (AutoModelForSequenceClassification) reads its score at the last token that is not
    # pad: with pad = EOS the RM would never see whether the reply closed its turn
    pad_is_eos = turn_end_is_eos and not keep_pad and tokenizer.pad_token == tokenizer.eos_token
    if tokenizer.pad_token is None or pad_is_eos:
        tokenizer.add_special_tokens({"pad_token": PAD})
    return tokenizer


def _check_templates_compile(tokenizer, name_or_path: str) -> None:
    """A chat template that does not compile (a Jinja syntax error) failed in a Jinja traceback at the first
    conversation a stage rendered, mid-run in some: refused as the tokenizer loads, naming the file it is in."""
    templates = tokenizer.chat_template
    for name, template in (templates if isinstance(templates, dict) else {"default": templates}).items():
        if template is None:
            continue
        try:  # compiled before it renders: a template that refuses this conversation has compiled
            tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=template, tokenize=False)
        except jinja2.TemplateSyntaxError as error:
            raise CheckpointError(f"tokenizer: the chat template in {_template_file(name_or_path, name)} does not "
                                  f"compile: line {error.lineno}: {error.message}") from None
        except Exception:  # it compiled: a refusal (or any other failure) of this probe is the conversation's
            pass


def _template_file(name_or_path: str, name: str) -> str:
    """Where a tokenizer keeps its chat template `name`, as transformers reads it: chat_template.jinja (the default)
    or additional_chat_templates/<name>.jinja, else tokenizer_config.json (its chat_template entry)."""
    own = "chat_template.jinja" if name == "default" else f"additional_chat_templates/{name}.jinja"
    if not Path(name_or_path).is_dir():
        return f"{own} or tokenizer_config.json of {name_or_path}"
    return str(Path(name_or_path) / (own if (Path(name_or_path) / own).is_file() else "tokenizer_config.json"))


def untrained_role_tokens(tokenizer) -> list[str]:
    """Our role tokens that load_tokenizer gave this tokenizer (it had no chat template) and that no stage has
    trained in full since: LoRA cannot train their embeddings."""
    return list(tokenizer.init_kwargs.get(ADDED_ROLE_TOKENS) or [])


def text_end_token_id(tokenizer) -> int:
    """The token that ends a document in packed text: EOS, or where a chat stage made the template's end-of-turn
    token EOS (ChatML's <|im_end|>), the model's own end of text it replaced (<|endoftext|>)."""
    token = tokenizer.init_kwargs.get(TEXT_END) or getattr(tokenizer, TEXT_END, None) or tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(str(token))


def _end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant message, if any."""
    marker = "\u2063end-of-turn-probe\u2063"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that insists on other roles or a system prompt: leave EOS as it is
        return None
    tail = rendered.split(marker, 1)[-1] if marker in rendered else ""
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((token for token in specials if tail.startswith(token)), None)


# an hh-rlhf transcript: "\n\nHuman: ... \n\nAssistant: ... \n\nHuman: ... \n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
HH_REPLY = "\n\nAssistant:"  # opens the reply in an hh-rlhf transcript


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """The chat turns of a prompt: one user turn, or the turns of an hh-rlhf transcript (a prompt that starts with
    "Human:" and ends with "Assistant:"), so that a model reads hh-rlhf data as the multi-turn chat it is rather
    than as one user message quoting it."""
    text = prompt.strip()
    if not (text.startswith("Human:") and text.endswith("Assistant:")):
        return [{"role": "user", "content": prompt}]
    pieces = _HH_TURN.split(prompt.strip("\n"))[1:]  # speaker, text, speaker, text, ...
    turns = [{"role": "user" if speaker == "Human" else "assistant", "content": said.strip()}
             for speaker, said in zip(pieces[::2], pieces[1::2])]
    if len(turns) < 2 or turns[-1] != {"role": "assistant", "content": ""}:
        return [{"role": "user", "content": prompt}]  # not a transcript after all ("Human: hi Assistant:")
    return turns[:-1]  # the last "Assistant:" opens the reply


def prompt_text(turns: list[dict[str, str]]) -> str:
    """The inverse of `prompt_messages`: the string a prompt given as chat turns travels in through the pipeline.
    One user turn is its text; a conversation (user and assistant turns, the user's last) is an hh-rlhf
    transcript. Contents come back stripped of surrounding whitespace."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    speaker = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{speaker[t['role']]}: {t['content'].strip()}" for t in turns) + HH_REPLY


def chat_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees before it answers `prompt` (a user message, or an hh-rlhf transcript's turns)."""
    return tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)


def first_refused(rows: Iterable, render: Callable) -> tuple[int, object, jinja2.TemplateError] | None:
    """The first of `rows` whose conversation (`render` renders a row) the chat template refuses: its index, the
    row and what the template said (`raise_exception`); of a stream, its first 1000 rows."""
    for index, row in enumerate(itertools.islice(rows, None if isinstance(rows, Sized) else 1000)):
        try:
            render(row)
        except jinja2.TemplateError as refused:
            return index, row, refused
    return None


@contextlib.contextmanager
def template_refusals_named(named: str, sources: list[tuple[Iterable[dict], str]], render: Callable[[dict], object],
                            column: str, numbered: bool = True):
    """Around rendering the rows of `sources` ((rows, source) pairs) through a chat template, there or inside other
    code (TRL's tokenizing, a training loop): a conversation the template refuses (Gemma's "System role not
    supported", Mistral's "roles must alternate", a length check) ended in a Jinja traceback. It becomes a DataError
    naming `named` (the checkpoint whose template it is, and its key) and the first such row, found again once one
    has failed (first_refused): by its number, or where `rows` are not in their source's order, by its `column`."""
    from data.loading import DataError  # (data.loading imports this module)

    try:
        yield
    except jinja2.TemplateError as error:
        for rows, source in sources:
            if found := first_refused(rows, render):
                index, row, refused = found
                which = "this conversation" if numbered else f"the conversation of {column} {quoted(row[column])}"
                raise DataError(source, f"the chat template of {named} refuses {which}: {refused}. Change the data "
                                        "(e.g. fold a system message into the first user turn), or use a model whose "
                                        "template takes it", row=index + 1 if numbered else None,
                                column=column) from None
        sources = " or ".join(dict.fromkeys(source for _, source in sources))
        raise DataError(sources, f"the chat template of {named} refuses a conversation: {error}") from None


def check_chat_prompts(tokenizer, named: str, sources: list[tuple[list[dict], str]], numbered: bool = True) -> None:
    """Render every prompt of `sources` ((prompt rows, source) pairs) as the model will read it: one the chat
    template of `named` refuses is named before any model samples, by its row where `numbered` (the rows are their
    source's, in order), else by its text."""
    def render(row: dict) -> str:
        return chat_prompt(tokenizer, row["prompt"])

    with template_refusals_named(named, sources, render, "prompt", numbered):
        for rows, _ in sources:
            for row in rows:
                render(row)


def quoted(text: str, limit: int = 60) -> str:
    """`text` quoted for a message, its start only if longer than `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def trl_masks_replies(tokenizer) -> bool:
    """Whether TRL's assistant-only loss can mark the replies in this tokenizer's chat template, end-of-turn token
    included: the template has `{% generation %}` markers (ours does), or is one TRL knows how to patch with them,
    and its marked span takes in the token that ends a reply. A hub template that marks the content alone would
    never teach the model to stop (TRL only warns); `reply_masks` ends each span at that token instead."""
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_stop_token_trained

    try:
        template = get_training_chat_template(tokenizer)
    except ValueError:
        return False
    return is_chat_template_stop_token_trained(tokenizer, chat_template=template)


class TemplateError(ValueError):
    """A chat template whose replies cannot be told apart from the rest of the conversation."""


def reply_masks(tokenizer, messages: list[dict[str, str]], prompt_turns: int = 0) -> dict[str, list[int]]:
    """`input_ids` and `assistant_masks` (1 on each assistant reply and its end-of-turn token) of a conversation in
    the tokenizer's chat template, for templates TRL cannot mark (trl_masks_replies). A reply is where the
    conversation rendered through it extends the conversation before it with the generation prompt; it ends at
    the end-of-turn token (what the template writes after it, a newline, is never sampled). The replies among the
    first `prompt_turns` messages, the prompt of a prompt + completion row, are left unmarked."""
    def render(turns: list[dict[str, str]], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    if not tokenizer.is_fast:  # the replies' tokens are found by their character offsets
        raise TemplateError("its tokenizer is not a fast one, which gives the character offsets of its tokens")

    text, spans = render(messages), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < prompt_turns:
            continue
        before, through = render(messages[:i], prompt=True), render(messages[:i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise TemplateError("its chat template does not render each reply as an extension of the conversation "
                                "before it (with the generation prompt)")
        end = through.rfind(tokenizer.eos_token, len(before))
        spans.append((len(before), end + len(tokenizer.eos_token) if end >= 0 else len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    masks = [int(any(start <= first < end for start, end in spans)) for first, _ in encoded["offset_mapping"]]
    return {"input_ids": encoded["input_ids"], "assistant_masks": masks}
