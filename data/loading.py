"""Dataset schemas and the one loader every stage uses.

A stage config names its data with a `DatasetSpec` and asks for a schema:

    load_dataset_for(DatasetSpec(path="world:sft_train"), "sft", world_dir=run_dir / "world")

The loader reads the source, applies the column mapping, validates every row (lazily, row by
row, when streaming) and normalises it to the schema's canonical columns. Anything wrong with
the data raises `DataError` naming the file, the row and the column, before training starts.

Sources (`DatasetSpec.path`):
- `world:<split>`: `<world_dir>/<split>.jsonl` as written by `data.world.write_world`.
- a local `.jsonl` / `.json` (JSON lines or one JSON array of objects) / `.parquet` file.
- a local `.csv` file with a header row, every column read as text (for the flat forms: `text`, `prompt` +
  `completion`, `prompt` + `chosen` + `rejected`; lists such as `responses` need JSON or parquet). Rows are
  numbered from the first one after the header.
- a local `.txt` file: one `text` row per non-empty line (blank lines are skipped; row
  numbers in errors are line numbers): a corpus's documents, or prompts, one a line. Map it to another schema
  with e.g. `columns={"prompt": "text"}`. Documents that run over several lines (paragraphs) need JSON lines or
  parquet with a `text` column; a .txt corpus that looks like paragraphs is loaded with a warning.
- a local directory: every supported file under it (recursively, sorted, hidden ones
  skipped), each read and validated on its own, then concatenated. Where files are named by
  split, as in a downloaded hub dataset (`train.jsonl`, `test.jsonl`,
  `data/train_sft-00000-of-00001.parquet`), only those of `split` are read.
- a local directory written by `datasets`' `save_to_disk`: read with `load_from_disk`; of a
  DatasetDict, its split `split`.
- anything else: a Hugging Face hub dataset id, read with
  `datasets.load_dataset(path, name, split=split, streaming=streaming)`.

Rows are numbered from 1 in error messages. `split` applies to hub datasets, saved DatasetDicts and split-named
files; `max_rows` caps the rows read from the source (for `.txt`, lines).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import gzip
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet
from datasets.fingerprint import generate_random_fingerprint, get_temporary_cache_files_directory

from pipeline.tokenizer import HH_REPLY, prompt_messages, prompt_text

WORLD_PREFIX = "world:"
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


GZIP_READABLE = (".jsonl", ".json", ".txt")  # read through gzip as they are (hh-rlhf ships train.jsonl.gz)
TEXT_BUILDERS = ("json", "csv", "text")  # the readers of text files


def _file_type(path: Path) -> str:
    """A local file's type by its extension; a gzipped JSON or text file is read as that."""
    suffixes = path.suffixes
    return suffixes[-2] if len(suffixes) >= 2 and suffixes[-1] == ".gz" and suffixes[-2] in GZIP_READABLE \
        else path.suffix
ROLES = ("system", "user", "assistant")


@dataclass
class DatasetSpec:
    """Where a stage's data comes from (plain typed fields: it lives inside stage YAML configs)."""

    path: str = ""
    """`world:<split>`, a local file or directory, or a hub dataset id (see module docstring)."""
    name: str | None = None
    """Hub dataset config name."""
    split: str = "train"
    """Hub dataset split; in a local directory whose files are named by split, the files read."""
    columns: dict[str, str] = field(default_factory=dict)
    """Schema column -> source column, e.g. {"prompt": "question"}."""
    streaming: bool = False
    """Return an IterableDataset validated lazily row by row (for large pretraining corpora)."""
    max_rows: int | None = None
    """Read at most this many rows."""


class DataError(ValueError):
    """Bad or unreadable data. The message names the source, row and column and what was expected."""

    def __init__(self, source: str, problem: str, row: int | None = None, column: str | None = None,
                 source_column: str | None = None):
        where = f"data error in {source}"
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column '{column}'"
            if source_column is not None and source_column != column:
                where += f" (read from source column '{source_column}')"
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.column, self.problem = source, row, column, problem


# ---------------------------------------------------------------- schemas

_STRING = datasets.Value("string")
_MESSAGES = datasets.List({"role": _STRING, "content": _STRING})

# Output type of every column a schema can produce (required or optional).
COLUMN_FEATURES: dict[str, Any] = {
    "text": _STRING,
    "messages": _MESSAGES,
    "prompt": _STRING,
    "responses": datasets.List(_STRING),
    "gold_scores": datasets.List(datasets.Value("float64")),
    "ratings": datasets.List(datasets.Value("float64")),
    "family": _STRING,
    # how many of an SFT row's messages are its prompt (prompt + completion data): their replies are context, and
    # only the completion is trained, as TRL trains such data. 0 for a conversation given as `messages`: every reply
    "prompt_turns": datasets.Value("int64"),
}


@dataclass(frozen=True)
class Schema:
    """A dataset shape: the canonical columns, the input forms accepted, optional extras."""

    name: str
    columns: tuple[str, ...]
    """Columns of the normalised output, always present."""
    input_forms: tuple[tuple[str, ...], ...]
    """Accepted sets of input columns; the first is the canonical one, others are converted."""
    optional: tuple[str, ...] = ()
    """Columns kept (validated) when the source has them."""

    def requirement(self) -> str:
        forms = [" + ".join(f"'{c}'" for c in form) for form in self.input_forms]
        return f"schema '{self.name}' needs {' or '.join(forms)}"

    def output_features(self, optional_present: tuple[str, ...]) -> datasets.Features:
        return datasets.Features({c: COLUMN_FEATURES[c] for c in self.columns + optional_present})


SCHEMAS: dict[str, Schema] = {
    "text": Schema("text", ("text",), (("text",),)),
    "sft": Schema("sft", ("messages", "prompt_turns"), (("messages",), ("prompt", "completion")), ("family",)),
    "preferences": Schema("preferences", ("prompt", "responses"),
                          (("prompt", "responses"), ("prompt", "chosen", "rejected"), ("chosen", "rejected")),
                          ("family", "gold_scores", "ratings")),
    "prompts": Schema("prompts", ("prompt",), (("prompt",),), ("family",)),
}


# ---------------------------------------------------------------- row validation


class _Invalid(Exception):
    """A problem with one column of one row; turned into a DataError with source and row."""

    def __init__(self, column: str, problem: str):
        super().__init__(problem)
        self.column, self.problem = column, problem


def normalise_row(row: dict[str, Any], schema: Schema, optional_present: tuple[str, ...],
                  rating_column: str | None = None) -> dict[str, Any]:
    """Validate one (already column-mapped) row and return it in the schema's canonical form.

    Besides strings, the chat forms TRL calls conversational are read: a prompt, completion, chosen or
    rejected given as a list of `{role, content}` messages (UltraFeedback's and trl-lib's pairs).
    `rating_column`: the column ('ratings' or 'ranks') that rates the source's responses, if it has one."""
    if schema.name == "preferences":
        row = _rated(row)
    form = _input_form(row, schema)
    if rating_column is not None and form == ("prompt", "responses") and row.get("ratings") is None:
        # unrated, the row's responses would be read as ranked best first, unlike its neighbours'; a chosen/rejected
        # pair says which is better itself
        raise _Invalid(rating_column, f"null in this row, in a source whose responses are rated by "
                                      f"'{rating_column}'; rate every row's responses, or put rows ranked best "
                                      f"first in a file of their own")
    if schema.name == "text":
        out = {"text": _string(row, "text")}
    elif schema.name == "prompts":
        out = {"prompt": _prompt(_with_input(row)["prompt"], "prompt")}
    elif schema.name == "sft":
        if form == ("messages",):
            out = {"messages": _messages(row["messages"], "messages"), "prompt_turns": 0}
        else:
            # the prompt's replies are context, not trained: an empty one (hh-rlhf has some) is no harm
            prompt = _turns_or_text(_with_input(row), "prompt", "user")
            # the completion alone is trained: it must hold a reply of its own
            completion = _messages(_turns_or_text(row, "completion", "assistant"), "completion")
            out = {"messages": prompt + completion, "prompt_turns": len(prompt)}
    elif schema.name == "preferences":
        if form == ("prompt", "responses"):
            out = {"prompt": _prompt(row["prompt"], "prompt"), "responses": _ranked_responses(row["responses"])}
        else:
            out = _pair(row, has_prompt=form[0] == "prompt")
    else:
        raise ValueError(f"unknown schema {schema.name!r}")
    for column in optional_present:
        out[column] = _optional(row, column, out)
    if out.get("ratings") is not None:
        _order_by_rating(out)
    return out


def _order_by_rating(out: dict[str, Any]) -> None:
    """Responses that come with the labeler's ratings (UltraFeedback's 4 completions) are put best first, with
    their ratings (and gold scores) alongside; equal ratings stay ties, which training and metrics skip."""
    if len(set(out["ratings"])) == 1:
        raise _NoPreference()
    order = sorted(range(len(out["ratings"])), key=lambda i: -out["ratings"][i])  # stable: ties keep their order
    for column in ("responses", "ratings", "gold_scores"):
        if out.get(column) is not None:
            out[column] = [out[column][i] for i in order]


def _rated(row: dict[str, Any]) -> dict[str, Any]:
    """`ranks` (lower is better: Nectar's) as ratings. Of rated responses (UltraFeedback's 4 completions) an empty
    one goes and a repeated one is kept once, with its best rating, as a pair with an empty or equal reply is
    skipped; a list left with fewer than two says nothing."""
    ranks = row.get("ranks")
    if ranks is not None:
        if not isinstance(ranks, (list, tuple)) or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in ranks):
            raise _Invalid("ranks", f"expected a list of finite numbers (lower is better) aligned with "
                                    f"'responses', got {_describe(ranks)}")
        if row.get("ratings") is not None:
            raise _Invalid("ranks", "given beside 'ratings'; map one of them")
        if isinstance(row.get("responses"), (list, tuple)) and len(ranks) != len(row["responses"]):
            raise _Invalid("ranks", f"expected {len(row['responses'])} ranks aligned with 'responses', got "
                                    f"{len(ranks)}")
        row = {**row, "ratings": [-float(r) for r in ranks]}
    responses, ratings, gold = row.get("responses"), row.get("ratings"), row.get("gold_scores")
    if not isinstance(responses, (list, tuple)) or not isinstance(ratings, (list, tuple)) \
            or len(responses) != len(ratings) or not all(isinstance(r, str) for r in responses) \
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in ratings) \
            or (gold is not None and (not isinstance(gold, (list, tuple)) or len(gold) != len(responses))):
        return row  # nothing to tidy, or for the validators to refuse
    best: dict[str, int] = {}  # a reply (as compared: stripped) -> the index of its best-rated copy
    for i, response in enumerate(responses):
        key = response.strip()
        if key and (key not in best or ratings[i] > ratings[best[key]]):
            best[key] = i
    if len(best) < 2:
        raise _NoPreference()
    kept = sorted(best.values())
    tidy = {"responses": [responses[i] for i in kept], "ratings": [ratings[i] for i in kept]}
    if gold is not None:
        tidy["gold_scores"] = [gold[i] for i in kept]
    return {**row, **tidy}


class _NoPreference(Exception):
    """A preference row that says nothing: a pair whose two replies are the same, or one of them empty, or
    responses all rated alike. It is skipped (public datasets such as hh-rlhf hold a few)."""


def _pair(row: dict[str, Any], has_prompt: bool) -> dict[str, Any]:
    """A chosen/rejected pair as a ranked list of two. Each side is a reply, or a conversation that ends with the
    reply (a chat, or beside a prompt column an hh-rlhf transcript); the conversation before the reply is then the
    prompt, and a prompt column must be that conversation or its last user message."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not has_prompt and isinstance(chosen, str) and isinstance(rejected, str):
        prompt, *replies = _split_transcripts(_string(row, "chosen"), _string(row, "rejected"))
    else:
        asked = _prompt(row["prompt"], "prompt") if has_prompt else None  # a chat prompt as the text it travels in
        (chosen_before, chosen_text, chosen_reply), (rejected_before, rejected_text, rejected_reply) = \
            _side(chosen, "chosen", asked), _side(rejected, "rejected", asked)
        replies = [chosen_reply, rejected_reply]
        if chosen_before and rejected_before and _stripped(chosen_before) != _stripped(rejected_before):
            raise _Invalid("rejected", "its turns before the reply differ from those of 'chosen'")
        before, before_text, side = (chosen_before, chosen_text, "chosen") if chosen_before else \
            (rejected_before, rejected_text, "rejected")
        if has_prompt:
            prompt = asked
            # only a side that carries its conversation has turns to compare (string pairs skip the parse)
            if before and not _holds_prompt(before, asked):
                raise _Invalid(side, "its turns before the reply are neither the row's 'prompt' nor end with it")
        elif not before:
            raise _Invalid("prompt", "missing; 'chosen' and 'rejected' hold no conversation before their replies "
                                     "to take it from")
        # a prompt column that holds only the last user message: the side's turns are the whole prompt
        if before and (not has_prompt or _stripped(prompt_messages(asked)) != _stripped(before)):
            prompt = before_text if before_text is not None else _prompt(before, side)
    if replies[0].strip() == replies[1].strip() or not all(r.strip() for r in replies):
        raise _NoPreference()
    return {"prompt": prompt, "responses": replies}


def _side(value: Any, column: str, asked: str | None) -> tuple[list[dict[str, str]], str | None, str]:
    """One side of a pair: (the turns before the reply, those turns as the text they came in if a transcript,
    the reply). `asked`: the row's prompt, if it has one, whose hh-rlhf transcript a string side may be (TRL's
    implicit prompt beside a prompt column, some hh-rlhf copies): one that holds its turns, or opens as hh-rlhf's
    do ("\n\nHuman:"), is cut to its reply; any other string is the reply as it stands (it may itself be a sample
    transcript). Beside a prompt in hh-rlhf's form, a reply with a Human turn in it goes on past its reply: the row is
    skipped, as a transcript side that does."""
    if isinstance(value, str):
        if asked is None or not _is_transcript(value):
            return [], None, _reply_beside(value, column, asked)
        end = value.rfind(HH_REPLY) + len(HH_REPLY)
        before = prompt_messages(value[:end])
        if not value.startswith(HH_USER_TURN) and not _holds_prompt(before, asked):
            return [], None, _reply_beside(value, column, asked)
        if HH_USER_TURN in value[end:]:
            raise _NoPreference()  # the transcript goes on past its reply, as a raw hh-rlhf pair that is skipped
        return before, value[:end], _pair_reply(value[end:], column)
    if not isinstance(value, (list, tuple)):
        raise _Invalid(column, f"expected a string or a list of {{'role', 'content'}} messages ending with the "
                               f"assistant's reply, got {_describe(value)}")
    turns = _turns(value, column)
    if turns[-1]["role"] != "assistant":
        raise _Invalid(column, f"expected the last message to be the assistant's reply, got a "
                               f"{turns[-1]['role']!r} message")
    return turns[:-1], None, _pair_reply(turns[-1]["content"], column)


def _reply_beside(value: str, column: str, asked: str | None) -> str:
    """A string side that is the reply alone, beside the row's prompt (if it has one)."""
    if asked is not None and _is_transcript(asked) and HH_USER_TURN in value:
        # in hh-rlhf's form a quoted turn cannot be told from the conversation going on ('5.\n\nHuman: thanks')
        raise _NoPreference()
    return _pair_reply(value, column)


def _holds_prompt(before: list[dict[str, str]], prompt: str) -> bool:
    """A side's turns before its reply are the prompt's, or end with it as their last user message."""
    return _stripped(prompt_messages(prompt)) in (_stripped(before), _stripped(before[-1:]))


def _prompt(value: Any, column: str) -> str:
    """A prompt as the pipeline carries it: a string, or chat turns written as `pipeline.tokenizer.prompt_text`
    does, which reads back into the same turns."""
    if isinstance(value, str):
        return _with_reply_opening(_text(value, column))
    expected = "expected a non-empty string or a list of {'role', 'content'} messages ending with the user's"
    if not isinstance(value, (list, tuple)) or not value:
        raise _Invalid(column, f"{expected}, got {_describe(value)}")
    turns = _turns(value, column)
    if turns[-1]["role"] != "user":
        raise _Invalid(column, f"{expected}; its last message is the {turns[-1]['role']}'s")
    if turns[0]["role"] == "assistant":
        raise _Invalid(column, f"{expected}; its first message is the assistant's (a prompt opens with the user)")
    if any(t["role"] == "system" for t in turns):
        # prompts travel as text, and an hh-rlhf transcript has no system turn
        raise _Invalid(column, "a system message in a prompt is not supported (preference and PPO prompts carry "
                               "user and assistant turns); fold it into the first user message")
    empty = next((i for i, t in enumerate(turns) if not t["content"].strip()), None)
    if empty is not None:
        raise _Invalid(column, f"{expected}; message {empty} is empty")
    text = prompt_text(turns)
    if _stripped(prompt_messages(text)) != _stripped(turns):
        raise _Invalid(column, f"these turns would not read back as themselves: a message quotes the "
                               f"'Human:'/'Assistant:' markers that prompts travel in ({_describe(value)})")
    return text


def _stripped(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": t["role"], "content": t["content"].strip()} for t in turns]


HH_USER_TURN = "\n\nHuman:"  # opens a user turn in an hh-rlhf transcript


def _is_transcript(text: str) -> bool:
    """The text is in hh-rlhf's form: a Human turn first, and a reply opening somewhere."""
    return text.lstrip().startswith("Human:") and HH_REPLY in text


def _with_reply_opening(prompt: str) -> str:
    """A prompt in hh-rlhf's form that ends on its Human turn without the "\n\nAssistant:" that opens the reply (a
    copy that cut it off: "\n\nHuman: Q?", or earlier turns and then one) with that opening, so that every stage
    reads it as the turns it holds (pipeline.tokenizer.prompt_messages) rather than as one user message quoting the
    markers. A prompt that merely starts with "Human:" (no blank line before, no Assistant turn) stays as it is."""
    text = prompt.rstrip()
    last_question = text.rfind(HH_USER_TURN)
    if not (text.startswith(HH_USER_TURN) or _is_transcript(text)) or last_question < 0 \
            or HH_REPLY in text[last_question:]:
        return prompt
    opened = text + HH_REPLY
    turns = prompt_messages(opened)
    return opened if turns != [{"role": "user", "content": opened}] and turns[-1]["content"].strip() else prompt


def _split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf's raw pairs are two whole transcripts that agree up to their last "Assistant:": that shared part
    is the prompt (read as turns by pipeline.tokenizer.prompt_messages), the rest the two replies."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_REPLY)  # the last reply opening both share: a reply may itself quote one
    if cut < 0:
        if _is_transcript(chosen) and _is_transcript(rejected):
            raise _NoPreference()  # transcripts that part in their first turn, as ones that part later are skipped
        raise _Invalid("prompt", "missing; 'chosen' and 'rejected' without a prompt must be hh-rlhf transcripts "
                                 "that share their conversation up to an '\\n\\nAssistant:'")
    end = cut + len(HH_REPLY)
    if any(HH_USER_TURN in side[end:] for side in (chosen, rejected)):
        # the transcripts part before their last reply, or one goes on past it: no one prompt to rank replies to
        raise _NoPreference()
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def _pair_reply(value: Any, column: str) -> str:
    """A reply as the RM will score it: PPO, collection and evaluation read replies stripped of surrounding
    whitespace, so one trained with it would be text the RM never scores (and a gap between sides to key on)."""
    if not isinstance(value, str):
        raise _Invalid(column, f"expected a string, got {_describe(value)}")
    if not value.strip():
        raise _NoPreference()
    return value.strip()


def _input_form(row: dict[str, Any], schema: Schema) -> tuple[str, ...]:
    """The accepted form this row is closest to (a complete one first); raises for the first missing column."""
    present = [c for c, v in row.items() if v is not None]
    best = max(schema.input_forms, key=lambda form: (all(c in present for c in form), sum(c in present for c in form),
                                                     -schema.input_forms.index(form)))
    for column in best:
        if column in row and row[column] is None:  # the column is there, empty in this row
            raise _Invalid(column, f"null in this row ({schema.requirement()})")
        if column not in present:
            found = ", ".join(present) or "none"
            raise _Invalid(column, f"missing ({schema.requirement()}; found columns: {found})")
    return best


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _string(row: dict[str, Any], column: str) -> str:
    return _text(row[column], column)


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(column, f"expected a non-empty string, got {_describe(value)}")
    return value


# ShareGPT's messages ({"from": "human", "value": ...}): who speaks, in our roles (as TRL converts them)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
OTHER_ROLE_NAMES = {"prompter": "user"}  # OpenAssistant's name for the user


def _turns(value: Any, column: str) -> list[dict[str, str]]:
    """A non-empty list of `{role, content}` messages (or ShareGPT's `{from, value}`), each checked (extra keys,
    such as a name, are dropped)."""
    expected = "expected a list of {'role', 'content'} messages"
    if not isinstance(value, (list, tuple)) or not value:
        raise _Invalid(column, f"{expected}, got {_describe(value)}")
    turns = []
    for i, message in enumerate(value):
        speaker = message.get("from") if isinstance(message, dict) and message.get("role") is None else None
        if isinstance(speaker, str) and speaker in SHAREGPT_ROLES:
            message = {"role": SHAREGPT_ROLES[speaker], "content": message.get("value")}
        elif isinstance(message, dict) and isinstance(message.get("role"), str) \
                and message["role"] in OTHER_ROLE_NAMES:
            message = {**message, "role": OTHER_ROLE_NAMES[message["role"]]}
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise _Invalid(column, f"{expected}; message {i} is {_describe(message)} "
                                   f"(role must be one of {', '.join(ROLES)}, content a string)")
        turns.append({"role": message["role"], "content": message["content"]})
    return turns


def _with_input(row: dict[str, Any]) -> dict[str, Any]:
    """An Alpaca-style row (instruction, input, output): its `input`, the text the instruction works on, follows
    the prompt after a blank line, as in Alpaca's own prompt. Empty or missing, the prompt stands alone."""
    extra = row.get("input")
    if extra is None or (isinstance(extra, str) and not extra.strip()):
        return row
    if not isinstance(extra, str) or not isinstance(row["prompt"], str):
        raise _Invalid("input", "expected a string to follow a string prompt (Alpaca's input), "
                                f"got {type(extra).__name__} beside a {type(row['prompt']).__name__} prompt")
    return {**row, "prompt": f"{row['prompt'].rstrip()}\n\n{extra.strip(chr(10)).rstrip()}"}  # indentation kept


def _turns_or_text(row: dict[str, Any], column: str, role: str) -> list[dict[str, str]]:
    """A prompt or completion column: a string (one `role` message; a user prompt that is an hh-rlhf transcript,
    its turns, as every stage prompts the model with it) or a list of messages."""
    if isinstance(row[column], str):
        text = _string(row, column)
        return prompt_messages(_with_reply_opening(text)) if role == "user" else [{"role": role, "content": text}]
    if not isinstance(row[column], (list, tuple)):
        raise _Invalid(column, f"expected a string or a list of {{'role', 'content'}} messages, got "
                               f"{_describe(row[column])}")
    return _turns(row[column], column)


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    """A conversation to train on: messages with at least one assistant turn that says something."""
    expected = "expected a list of {'role', 'content'} messages with at least one assistant turn"
    if not isinstance(value, (list, tuple)) or not value:
        raise _Invalid(column, f"{expected}, got {_describe(value)}")
    messages = _no_empty_reply(_turns(value, column), column)
    if not any(m["role"] == "assistant" for m in messages):
        raise _Invalid(column, f"{expected}; found none")
    return messages


def _no_empty_reply(messages: list[dict[str, str]], column: str) -> list[dict[str, str]]:
    """Every assistant turn is trained on: an empty one would teach ending the turn unanswered."""
    empty = next((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()), None)
    if empty is not None:
        raise _Invalid(column, f"message {empty} (the assistant's) is empty")
    return messages


def _ranked_responses(value: Any) -> list[str]:
    expected = "expected a list of at least 2 distinct non-empty strings, ranked best first"
    if not isinstance(value, (list, tuple)):
        raise _Invalid("responses", f"{expected}, got {_describe(value)}")
    if len(value) < 2:
        raise _Invalid("responses", f"{expected}, got {len(value)} response(s)")
    for i, response in enumerate(value):
        if not isinstance(response, str) or not response.strip():
            raise _Invalid("responses", f"{expected}; response {i} is {_describe(response)}")
    value = [response.strip() for response in value]  # as the RM scores replies (see _pair_reply)
    if len(set(value)) != len(value):
        duplicate = next(r for i, r in enumerate(value) if r in value[:i])
        raise _Invalid("responses", f"{expected}; duplicate response {duplicate[:60]!r} (replies are compared without "
                                    f"surrounding whitespace, as the RM reads them)")
    return value


def _optional(row: dict[str, Any], column: str, out: dict[str, Any]) -> Any:
    value = row.get(column)
    if value is None:
        return None
    if column == "family":
        if not isinstance(value, str):
            raise _Invalid(column, f"expected a string, got {_describe(value)}")
        return value
    if column in ("gold_scores", "ratings"):
        n = len(out["responses"])
        if not isinstance(value, (list, tuple)) or len(value) != n or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in value):
            raise _Invalid(column, f"expected a list of {n} finite numbers aligned with 'responses', "
                                   f"got {_describe(value)}")
        return [float(s) for s in value]
    raise ValueError(f"no validator for optional column {column!r}")


def mapped_targets(schema: Schema) -> list[str]:
    """The columns `columns` may map for a schema: its input and optional columns, and those a schema reads into
    them (SFT's and prompts' `input`, Alpaca's text to work on; preferences' `ranks`, lower is better)."""
    extra = {"sft": ["input"], "prompts": ["input"], "preferences": ["ranks"]}.get(schema.name, [])
    return list(dict.fromkeys([c for form in schema.input_forms for c in form] + list(schema.optional) + extra))


def map_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Apply the schema-column -> source-column mapping to one row. A source `list.field` reads `field` from each
    record of a list column: raw UltraFeedback's
    {responses: completions.response, ratings: completions.overall_score}."""
    if not columns:
        return row
    mapped = {k: v for k, v in row.items() if k not in columns.values()}
    for target, source in columns.items():
        mapped[target] = _source_value(row, target, source)
    return mapped


def _source_value(row: dict[str, Any], target: str, source: str) -> Any:
    if source in row or "." not in source:
        return row.get(source)
    outer, field_name = source.split(".", 1)
    records = row.get(outer)
    if records is None:
        return None
    if not isinstance(records, (list, tuple)) or not all(isinstance(r, dict) for r in records):
        raise _Invalid(target, f"'{source}' reads '{field_name}' from each record of '{outer}', which is "
                               f"{_describe(records)}, not a list of records")
    return [r.get(field_name) for r in records]


def _has_source(source: str, present: list[str]) -> bool:
    """The source column is in the data (for `list.field`, the list column)."""
    return source in present or source.split(".", 1)[0] in present


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Part:
    """One readable unit: a local file or a hub dataset split."""

    description: str     # how errors name it
    builder: str         # datasets builder: json, parquet, text, or a hub id
    data_files: str | None = None
    name: str | None = None
    split: str = "train"
    saved: bool = False  # `builder` is a directory written by datasets' save_to_disk

    @property
    def skips_blank_lines(self) -> bool:
        return self.builder == "text"


def resolve_parts(spec: DatasetSpec, world_dir: str | Path | None, key: str = "DatasetSpec") -> list[_Part]:
    path = spec.path.strip()
    if not path:
        raise DataError(f"key '{key}.path'", "empty; expected world:<split>, a local file or directory, or a hub "
                                             "dataset id")
    if path.startswith(WORLD_PREFIX):
        return [_world_part(path[len(WORLD_PREFIX):], world_dir)]
    local = Path(path).expanduser()
    if local.is_dir() and _saved_to_disk(local):
        return [_saved_part(local, spec.split)]
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and _file_type(p) in LOCAL_BUILDERS
                       and not any(part.startswith(".") for part in p.relative_to(local).parts))
        if not files:
            raise DataError(str(local), f"directory has no {'/'.join(LOCAL_BUILDERS)} files")
        saved = next((f.parent for f in files if _saved_to_disk(f.parent)), None)
        if saved is not None:  # its .json files are no data, and its .arrow files no file type read here
            raise DataError(str(saved), f"a dataset written by save_to_disk, inside {local}: give its directory as "
                                        "the path of a dataset of its own")
        # `gunzip -k` leaves both: reading both would train on every row twice
        both = [f for f in files if f.suffix == ".gz" and f.with_suffix("") in files]
        if both:
            raise DataError(str(both[0]), f"{both[0].with_suffix('').name} beside it in the same directory holds "
                                          "the same data uncompressed, it seems; keep one of the two")
        return [_file_part(f) for f in _files_of_split(local, files, spec.split)]
    if local.is_file():
        return [_file_part(local)]
    if _file_type(local) in LOCAL_BUILDERS or path.startswith(("/", ".", "~")):
        raise DataError(str(local), "file not found")
    return [_Part(f"hub dataset '{path}'" + (f" (config '{spec.name}')" if spec.name else "")
                  + f" split '{spec.split}'", path, name=spec.name, split=spec.split)]


SPLIT_WORDS = ("train", "test", "validation", "valid", "val", "dev", "eval")


def _split_named(relative: Path) -> str | None:
    """The split a file in a dataset directory belongs to by its name or its folder's (train.jsonl,
    test/part.parquet, train_sft-00000-of-00003.parquet -> train_sft), or None."""
    for part in (*relative.parent.parts, Path(relative.name.removesuffix(".gz")).stem):
        name = re.sub(r"-\d+-of-\d+(-[0-9a-f]+)?$", "", part)  # a shard's numbering (and the hub's hash after it)
        if re.split(r"[_\-.]", name)[0].lower() in SPLIT_WORDS:
            return name
    return None


def _files_of_split(directory: Path, files: list[Path], split: str) -> list[Path]:
    """Reading every file of a downloaded dataset would put its test split into training."""
    splits = {f: _split_named(f.relative_to(directory)) for f in files}
    if not any(splits.values()):
        return files
    chosen = [f for f in files if splits[f] == split]
    if not chosen:
        found = sorted({s for s in splits.values() if s})
        raise DataError(str(directory), f"its files are named by split ({', '.join(found)}), none by split "
                                        f"'{split}'; set the dataset's split to one of them", column="split")
    return chosen


def _saved_to_disk(directory: Path) -> bool:
    """Written by datasets' save_to_disk: a DatasetDict, or one Dataset. Read as data files, its
    dataset_info.json was taken for the data (and its .arrow files left out)."""
    return (directory / datasets.config.DATASETDICT_JSON_FILENAME).is_file() or \
        (directory / datasets.config.DATASET_STATE_JSON_FILENAME).is_file() and \
        (directory / datasets.config.DATASET_INFO_FILENAME).is_file()


def _saved_part(directory: Path, split: str) -> _Part:
    """A directory written by save_to_disk; of a DatasetDict, its split `split` (saved in a folder of its own)."""
    listing = directory / datasets.config.DATASETDICT_JSON_FILENAME
    if not listing.is_file():
        return _Part(str(directory), str(directory), saved=True)
    try:
        splits = json.loads(listing.read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(str(listing), f"cannot read the splits save_to_disk listed: {type(error).__name__}: "
                                      f"{error}") from None
    if split not in splits:
        raise DataError(str(directory), f"a DatasetDict saved with save_to_disk, with splits {', '.join(splits)}, "
                                        f"none named '{split}'; set the dataset's split to one of them",
                        column="split")
    return _Part(str(directory / split), str(directory / split), saved=True)


def _world_part(split: str, world_dir: str | Path | None) -> _Part:
    if world_dir is None:
        raise DataError(f"{WORLD_PREFIX}{split}", "no world_dir given to load_dataset_for "
                                                  "(expected the directory written by write_world)")
    file = Path(world_dir) / f"{split}.jsonl"
    if not file.is_file():
        from data.world.writer import CONFIG_FILE  # here: data.world is not loaded for every dataset

        if not (Path(world_dir) / CONFIG_FILE).is_file():
            raise DataError(str(file), f"file not found (world split '{split}'; expected a directory "
                                       f"written by data.world.write_world)")
        # a world, and a split it lacks: most likely a typo in `world:<split>`
        splits = sorted(path.stem for path in Path(world_dir).glob("*.jsonl"))
        close = difflib.get_close_matches(split, splits, n=1)
        raise DataError(f"{WORLD_PREFIX}{split}", f"the world in {world_dir} has no split '{split}' (its splits: "
                                                  f"{', '.join(splits)})"
                                                  f"{f'; did you mean {WORLD_PREFIX}{close[0]}?' if close else ''}")
    return _file_part(file)


def _file_part(file: Path) -> _Part:
    if _file_type(file) not in LOCAL_BUILDERS:
        raise DataError(str(file), f"unsupported file type '{_file_type(file)}' "
                                   f"(expected one of {', '.join(LOCAL_BUILDERS)}, or "
                                   f"{', '.join(GZIP_READABLE)} gzipped)")
    return _Part(str(file), LOCAL_BUILDERS[_file_type(file)], data_files=str(file))


def _read(part: _Part, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """The raw rows of one part; any failure becomes a DataError naming it."""
    if part.data_files is not None and Path(part.data_files).stat().st_size == 0:
        raise DataError(part.description, "no rows (empty file)")
    if part.builder == "parquet":
        _check_parquet(part)
    if part.saved:
        try:
            saved = datasets.load_from_disk(part.builder)
        except Exception as error:  # a file of it missing or cut short
            raise DataError(part.description, f"cannot read the dataset save_to_disk wrote there: "
                                              f"{type(error).__name__}: {error}") from error
        return saved.to_iterable_dataset() if streaming else saved
    try:
        if part.builder == "csv":
            return datasets.load_dataset("csv", data_files=part.data_files, split="train", streaming=streaming,
                                         **_csv_as_text(part.data_files))
        if part.data_files is not None:
            dataset = datasets.load_dataset(part.builder, data_files=part.data_files, split="train",
                                            streaming=streaming)
        else:
            dataset = datasets.load_dataset(part.builder, part.name, split=part.split, streaming=streaming)
    except Exception as error:  # datasets raises many types (even StopIteration); all mean "unreadable"
        _raise_text_problem(part)
        if "corresponds to no data" in str(error):  # datasets' words for a file with no rows in it
            raise _NoRows(part.description, "no rows (only blank lines, or a header alone)") from error
        hint = f" (nor is there a local file or directory {part.builder})" if part.data_files is None else ""
        # datasets wraps what went wrong in "An error occurred while generating the dataset": name the cause
        cause = error.__cause__ if isinstance(error, datasets.exceptions.DatasetGenerationError) and \
            error.__cause__ is not None else error
        raise DataError(part.description, f"cannot read {_format_name(part)}{hint}: "
                                          f"{type(cause).__name__}: {cause}") from error
    return dataset


class _NoRows(DataError):
    """datasets read no rows from a file: blank lines, a header alone, or JSON rows that are all `{}`."""


def _check_first_record(part: _Part, schema: Schema, columns: dict[str, str]) -> None:
    """datasets reads a JSON file whose rows are all `{}` as one with no rows (streamed, it yields none): its first is
    checked as the row it is, which names the column it lacks."""
    if part.builder == "json" and part.data_files is not None:
        first = next(_json_rows(part.data_files), None)
        if first is not None:
            _checked_row(first[1], 1, part.description, schema, columns, ())


def _as_written(part: _Part, dataset: datasets.Dataset, read: set[str]) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """datasets reads a JSON column whose rows hold values of different types (strings in some, numbers or lists in
    others, whole or as a list's items) as `Json`, parsing every string that looks like JSON: the reply "3" would
    become the number 3, the rating "2" the number 2 (its floats may come back rounded), and by then no row shows
    which was written how. Such a column of a local file is read again from the file and kept as each row's JSON
    text, returned with the dataset, for the row's own check to decode: each row is checked as written, so the row
    named is the one holding the wrong type. (A stream takes each row's value from the file as it reads the row.)
    `read`: the source columns the schema reads (another column may hold what it likes)."""
    mixed = _mixed_json_columns(part, dataset.features, read)
    if not mixed:
        return dataset, ()
    records = list(itertools.islice(_records_as_written(part, mixed), len(dataset)))  # in order
    if len(records) < len(dataset):
        raise _no_record_per_row(part, mixed)
    for column in mixed:  # added before the old one goes: a table left with no column would have no rows
        written = [json.dumps(record.get(column)) for record in records]
        dataset = dataset.add_column(f"{column} as written", written, feature=_STRING) \
            .remove_columns(column).rename_column(f"{column} as written", column)
    return dataset, mixed


def _mixed_json_columns(part: _Part, features: datasets.Features | None, read: set[str]) -> tuple[str, ...]:
    """The columns of `read` that datasets reads from a local JSON file as `Json` (see `_as_written`)."""
    if part.builder != "json" or part.data_files is None or not Path(part.data_files).is_file() or not features:
        return ()
    return tuple(name for name, feature in features.items() if name in read and _holds_json(feature))


def _records_as_written(part: _Part, mixed: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The file's records in order, as it writes them, read as they are needed."""
    for _, record in _json_rows(part.data_files):
        if not isinstance(record, dict):
            raise _no_record_per_row(part, mixed)
        yield record


def _no_record_per_row(part: _Part, mixed: tuple[str, ...]) -> DataError:
    """A file of mixed columns without a record per row (a .json of columns, {"prompt": [...], ...}): no row shows
    how it was written."""
    return DataError(part.description, "the column holds values of more than one type, which datasets reads by "
                                       "parsing each string that looks like JSON; write one type per column (\"3\" in "
                                       "every row, not 3 in some)", column=mixed[0])


def _read_columns(schema: Schema, columns: dict[str, str]) -> set[str]:
    """The source columns `schema` reads (through `columns`), `list.field` by its list."""
    return {columns.get(target, target).split(".")[0] for target in mapped_targets(schema)}


def _holds_json(feature: Any) -> bool:
    """The feature is `Json`, or a list or record with `Json` somewhere inside."""
    if isinstance(feature, datasets.Json):
        return True
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return _holds_json(feature.feature)
    return isinstance(feature, dict) and any(_holds_json(inner) for inner in feature.values())


def _csv_as_text(path: str) -> dict[str, Any]:
    """Every CSV column read as the text it holds: pandas would make "42" a number and "NA" or "" missing."""
    # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which is not part of the first name
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return {"features": datasets.Features({name: _STRING for name in header}), "keep_default_na": False,
            "na_filter": False}


def _check_parquet(part: _Part) -> None:
    """Read the parquet footer first: it tells a corrupt file and an empty one apart cheaply."""
    try:
        n_rows = pyarrow.parquet.read_metadata(part.data_files).num_rows
    except Exception as error:
        raise DataError(part.description, f"cannot read as parquet: {type(error).__name__}: {error}") from error
    if n_rows == 0:
        raise DataError(part.description, "no rows (empty dataset)")


def _format_name(part: _Part) -> str:
    return {"json": "as JSON", "parquet": "as parquet", "csv": "as CSV", "text": "as text"}.get(part.builder,
                                                                                                 "the dataset")


def _open_text(path: str):
    """A local text file to read, through gzip if it is gzipped."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _text_lines(path: str) -> Iterator[str]:
    """A local text file's lines, read as they are needed; one it cannot read raises a DataError naming it."""
    try:
        with _open_text(path) as f:
            yield from f
    except (OSError, EOFError) as error:  # gzip's BadGzipFile is an OSError; a cut-off file ends early
        if not path.endswith(".gz"):
            raise DataError(path, f"cannot read it: {type(error).__name__}: {error}") from None
        raise DataError(path, f"cannot read it through gzip ({type(error).__name__}: {error}): a corrupt or "
                              "truncated download? Fetch it again") from None


def _json_rows(path: str) -> Iterator[tuple[int, Any]]:
    """A local JSON(L) file's values with their row numbers: a .json file's array items (or its one value), else
    each non-blank line's (read as needed: a streamed file may be large), numbered by its line in the file. A file
    it cannot read, or a line that is not JSON, raises a DataError naming it."""
    lines = _text_lines(path)
    if path.removesuffix(".gz").endswith(".json"):
        text = "".join(lines)
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            lines = text.splitlines()  # maybe JSON lines in a .json file: read line by line below
        else:
            yield from enumerate(whole if isinstance(whole, list) else [whole], start=1)
            return
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(path, f"not valid JSON ({error.msg} at char {error.colno}); expected one "
                                  f"JSON object per line", row=number) from error
        yield number, value


def _raise_text_problem(part: _Part) -> None:
    """What a reader failed on in a local text file, where it can be found: a byte that is not UTF-8 (CSV, text and
    JSON array readers fail on one as they read), or a line that is not JSON."""
    if (not_utf8 := _not_utf8(part)) is not None:
        raise not_utf8
    if part.builder == "json":
        _raise_json_problem(part.description)


def _raise_json_problem(path: str) -> None:
    """Find the first corrupt line in a JSON(L) file, or a row that is no object, and raise a DataError for it."""
    for number, value in _json_rows(path):
        if not isinstance(value, dict):
            raise DataError(path, f"expected a JSON object, got {_describe(value)}", row=number)


# ---------------------------------------------------------------- loading


def load_dataset_for(spec: DatasetSpec, schema: str, world_dir: str | Path | None = None,
                     key: str = "DatasetSpec") -> datasets.Dataset | datasets.IterableDataset:
    """Load `spec` as `schema` ("text", "sft", "preferences" or "prompts"). `key`: the config key that holds
    `spec` (`data`, `prompts`, ...), which errors in the spec itself name (`data.columns.prompt`).

    Returns a Dataset (or, with `spec.streaming`, an IterableDataset) whose columns are
    exactly the schema's canonical columns plus any optional ones (`family`,
    `gold_scores`) the source has. Raises DataError for unreadable or invalid data.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; expected one of {', '.join(SCHEMAS)}")
    if spec.max_rows is not None and spec.max_rows < 1:
        raise DataError(f"key '{key}.max_rows'", f"expected a positive number or None, got {spec.max_rows}")
    readable = mapped_targets(SCHEMAS[schema])
    for target in spec.columns:  # a mapped column no schema reads would be lost without a word (a typo too)
        if target not in readable:
            raise DataError(f"key '{key}.columns.{target}'", f"'{target}' is no column schema '{schema}' reads; it "
                                                             f"reads {', '.join(readable)}")
    parts = resolve_parts(spec, world_dir, key)
    if spec.streaming:
        return _load_streaming(parts, SCHEMAS[schema], spec)
    loaded = []
    remaining = spec.max_rows
    for part in parts:
        if remaining is not None and remaining <= 0:
            break
        dataset, read = _load_part(part, SCHEMAS[schema], spec.columns, remaining, key)
        loaded.append((part, dataset))
        if remaining is not None:  # rows read from the source (blank lines too), as streaming counts them
            remaining -= read
    return _concatenate(loaded)


def _load_part(part: _Part, schema: Schema, columns: dict[str, str], max_rows: int | None,
               key: str) -> tuple[datasets.Dataset, int]:
    """The part's rows as `schema`, and how many rows of the source that read (at most `max_rows`)."""
    try:
        raw = _read(part, streaming=False)
    except _NoRows:
        _check_first_record(part, schema, columns)
        raise
    if max_rows is not None and len(raw) > max_rows:
        raw = raw.select(range(max_rows))
    if len(raw) == 0:
        raise DataError(part.description, "no rows (empty dataset)")
    _check_mapped_columns_exist(part, raw.column_names, columns, key)
    raw, as_json = _as_written(part, raw, _read_columns(schema, columns))
    optional = _optional_present(raw.column_names, schema, columns)
    rating_column = _rating_column(raw.column_names, schema, columns)
    # datasets caches a map of a saved dataset beside its files, in the user's directory (and then every later map,
    # TRL's tokenizing too): in a temporary directory instead, as for a dataset in memory
    cache = {"cache_file_name": os.path.join(get_temporary_cache_files_directory(),
                                             f"cache-{generate_random_fingerprint()}.arrow")} if part.saved else {}
    try:  # the reader keeps bytes as it found them: text that is not UTF-8 fails only once a row is read
        normalised = raw.map(
            _normalise_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
            features=schema.output_features(optional),
            fn_kwargs={"description": part.description, "schema_name": schema.name, "columns": columns,
                       "optional": optional, "rating_column": rating_column, "text_file": part.skips_blank_lines,
                       "as_json": as_json},
            desc=f"validating {Path(part.data_files).name if part.data_files else part.builder} as {schema.name}",
            **cache,
        )
    except UnicodeDecodeError as error:
        raise _not_utf8(part, error) from None
    if len(normalised) == 0:
        raise DataError(part.description, "no rows (only blank lines)" if part.skips_blank_lines else
                        "no rows (every preference row said nothing: equal replies, an empty one, equal ratings, "
                        "fewer than two distinct rated replies, or hh transcripts that part before the last reply or "
                        "go on past it)")
    if schema.name == "preferences" and len(normalised) < len(raw):
        print(f"[data] {part.description}: {len(raw) - len(normalised):,} of {len(raw):,} preference rows skipped: "
              "their replies are equal, one is empty, their ratings are all equal, fewer than two distinct rated "
              "replies are left, or (hh-rlhf transcripts) they part before their last reply or go on past it")
    if "prompt" in normalised.column_names:
        _warn_of_transcripts_with_replies(part, normalised["prompt"])
    if schema.name == "text":
        _warn_of_lines_in_paragraphs(part)
    return normalised, len(raw)


def _warn_of_lines_in_paragraphs(part: _Part, lines_read: int = 10_000) -> None:
    """A .txt corpus is read one document per line, but one whose lines run on in blocks between blank lines holds
    paragraphs (a hard-wrapped book, sentences per line): each of its lines would become a document of its own,
    shuffled away from the rest. Said, not refused: blank lines may merely space out one-line documents. Its first
    `lines_read` lines are looked at (a streamed corpus may be large). Prompts are one a line, whatever the spacing."""
    if part.builder != "text" or part.data_files is None:
        return
    blocks, run = [], 0  # the lengths, in lines, of the runs of non-blank lines between blank ones
    for line in itertools.islice(_text_lines(part.data_files), lines_read):
        if line.strip():
            run += 1
        elif run:
            blocks.append(run)
            run = 0
    blocks += [run] if run else []
    multi_line = sum(length > 1 for length in blocks)
    if len(blocks) >= 3 and multi_line * 2 > len(blocks):
        print(f"[data] {part.description}: warning: {multi_line:,} of the {len(blocks):,} blocks of lines between "
              "blank lines in its first lines run over several lines (paragraphs?), but a .txt corpus is read one "
              "document per line: each line is trained on as a document of its own, shuffled with the rest. Give "
              "multi-line documents as .jsonl or .parquet with a 'text' column, one document per row")


def _warn_of_transcripts_with_replies(part: _Part, prompts: list[str]) -> None:
    """A prompt in hh-rlhf's form that goes on past its last "Assistant:" (hh-rlhf's `chosen` taken as the prompt)
    holds its reply, and is read as one user message quoting the whole transcript. Said, not refused: a prompt may
    quote a dialogue on purpose."""
    suspect = [i for i, p in enumerate(prompts) if p.lstrip().startswith("Human:") and HH_REPLY in p
               and p[p.rfind(HH_REPLY) + len(HH_REPLY):].strip() and "\n\nHuman:" not in p[p.rfind(HH_REPLY):]]
    if suspect:
        print(f"[data] {part.description}: warning: {len(suspect):,} prompt(s), the first in row {suspect[0] + 1} of "
              "those read, are hh-rlhf transcripts that go on past their last '\\n\\nAssistant:' (a reply?): each is "
              "read as one user message quoting it. A prompt ends with '\\n\\nAssistant:' where the reply begins")


def _normalise_batch(batch: dict[str, list], indices: list[int], description: str, schema_name: str,
                     columns: dict[str, str], optional: tuple[str, ...], rating_column: str | None,
                     text_file: bool, as_json: tuple[str, ...]) -> dict[str, list]:
    """`text_file`: the rows are a .txt file's lines (see `_text_line`). `as_json`: columns held as each row's JSON
    text, as the file writes them (see `_as_written`)."""
    schema = SCHEMAS[schema_name]
    out: dict[str, list] = {c: [] for c in schema.columns + optional}
    keys = list(batch)
    for index, values in zip(indices, zip(*batch.values())):
        row = dict(zip(keys, values))
        row.update({column: json.loads(row[column]) for column in as_json})
        if text_file and (row := _text_line(row, first=index == 0)) is None:
            continue
        try:
            checked = _checked_row(row, index + 1, description, schema, columns, optional, rating_column)
        except _NoPreference:
            continue
        for column, value in checked.items():
            out[column].append(value)
    return out


def _text_line(row: dict[str, Any], first: bool) -> dict[str, Any] | None:
    """A .txt file's line as its row, or None for a blank line (skipped). The first loses the byte-order mark that
    Windows' Notepad writes: datasets keeps it as text, gzipped or not (a CSV is read as utf-8-sig)."""
    text = row.get("text") or ""
    if first:
        text = text.removeprefix("\ufeff")
    return {**row, "text": text} if text.strip() else None


def _checked_row(row: dict[str, Any], number: int, description: str, schema: Schema,
                 columns: dict[str, str], optional: tuple[str, ...], rating_column: str | None = None
                 ) -> dict[str, Any]:
    try:
        return normalise_row(map_columns(row, columns), schema, optional, rating_column)
    except _Invalid as invalid:
        raise DataError(description, invalid.problem, row=_file_row(description, number), column=invalid.column,
                        source_column=columns.get(invalid.column)) from None


def _file_row(source: str, record: int) -> int:
    """The line of a local JSON-lines file that holds its `record`-th record (1-based), so that validation
    errors count rows as a JSON syntax error does: the JSON reader skips blank lines, an editor does not.
    Other sources (parquet, hub splits, JSON arrays, text files, which keep blank lines) count records."""
    if not source.removesuffix(".gz").endswith((".jsonl", ".json")) or not Path(source).is_file():
        return record
    with _open_text(source) as f:
        seen = 0
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if seen == 0 and line.lstrip().startswith("["):
                return record  # one JSON array, not JSON lines
            seen += 1
            if seen == record:
                return number
    return record


def _check_mapped_columns_exist(part: _Part, present: list[str] | None, columns: dict[str, str], key: str) -> None:
    if present is None:
        return  # streaming source with unknown columns: checked on the first row instead
    for target, source in columns.items():
        if not _has_source(source, present):
            raise DataError(part.description, f"not found (key '{key}.columns.{target}' names it); "
                                              f"found columns: {', '.join(present)}",
                            row=1, column=source)


def _rating_column(source_columns: list[str] | None, schema: Schema, columns: dict[str, str]) -> str | None:
    """The column that rates a preference source's responses ('ratings', or Nectar's 'ranks') if the source has one
    (None where its columns are unknown: a stream that does not say)."""
    if schema.name != "preferences" or source_columns is None:
        return None
    for column in ("ratings", "ranks"):
        if column in columns and _has_source(columns[column], source_columns) \
                or column not in columns and column in source_columns and column not in columns.values():
            return column
    return None


def _optional_present(source_columns: list[str], schema: Schema, columns: dict[str, str]) -> tuple[str, ...]:
    available = set(source_columns) | {t for t, s in columns.items() if _has_source(s, source_columns)}
    if "ranks" in available and schema.name == "preferences":  # read as ratings
        available.add("ratings")
    return tuple(c for c in schema.optional if c in available)


def _concatenate(loaded: list[tuple[_Part, datasets.Dataset]]) -> datasets.Dataset:
    """Concatenate per-file datasets, keeping only optional columns every file has; but ratings, which make
    ties, stay where a file has them (None in the others, whose rankings are strict)."""
    if len(loaded) == 1:
        return loaded[0][1]
    if any("ratings" in d.column_names for _, d in loaded):
        loaded = [(part, d if "ratings" in d.column_names else
                   d.add_column("ratings", [None] * len(d), feature=COLUMN_FEATURES["ratings"]))
                  for part, d in loaded]
    shared = set.intersection(*(set(d.column_names) for _, d in loaded))
    first_columns = [c for c in loaded[0][1].column_names if c in shared]
    datasets_ = [d.select_columns(first_columns) for _, d in loaded]
    return datasets.concatenate_datasets(datasets_)


def _load_streaming(parts: list[_Part], schema: Schema, spec: DatasetSpec) -> datasets.IterableDataset:
    """An IterableDataset that validates each row as it is read. The first row is checked
    now, so a wrong path, mapping or format fails before training starts."""
    streams = [(part, _read(part, streaming=True)) for part in parts]
    if schema.name == "text":
        for part in parts:
            _warn_of_lines_in_paragraphs(part)
    first_part, first_stream = streams[0]
    first_row = next(iter(_guarded(first_part, first_stream)), None)
    if first_row is None:
        _check_first_record(first_part, schema, spec.columns)
        raise DataError(first_part.description, "no rows (empty dataset)")
    try:
        mapped_first = map_columns(first_row, spec.columns)
    except _Invalid:
        mapped_first = {}  # the first row's own check below says what is wrong with it
    # ratings make ties, so they are kept even where the first row has none (later rows may)
    optional = tuple(c for c in schema.optional if mapped_first.get(c) is not None or c == "ratings")

    def generate() -> Iterator[dict[str, Any]]:
        produced = read = 0
        for part, stream in streams:
            mixed = _mixed_json_columns(part, stream.features, _read_columns(schema, spec.columns))
            records = _records_as_written(part, mixed) if mixed else None
            rating_column = _rating_column(list(stream.features) if stream.features else None, schema, spec.columns)
            for number, row in enumerate(_guarded(part, stream), start=1):
                if spec.max_rows is not None and read >= spec.max_rows:  # rows read, as when not streaming
                    return
                read += 1
                if mixed:  # each row as the file writes it (see _as_written)
                    record = next(records, None)
                    if record is None:
                        raise _no_record_per_row(part, mixed)
                    row.update({column: record.get(column) for column in mixed})
                if part.skips_blank_lines and (row := _text_line(row, first=number == 1)) is None:
                    continue
                try:
                    yield _checked_row(row, number, part.description, schema, spec.columns, optional, rating_column)
                except _NoPreference:  # a pair that says nothing (counted when not streaming)
                    continue
                produced += 1
        if produced == 0:
            raise DataError(first_part.description, "no rows (empty dataset)")

    next(generate())  # fail now, not mid-training, if the first row is already wrong
    return datasets.IterableDataset.from_generator(generate, features=schema.output_features(optional))


def _not_utf8(part: _Part, error: UnicodeDecodeError | None = None) -> DataError | None:
    """Text that is not UTF-8, named by the line of a local file's first such byte (datasets decodes a file in
    blocks, so `error`'s position is within one), else by `error`'s byte. None: no `error`, and a local text file
    that is UTF-8 throughout (or none)."""
    found = _first_not_utf8(part.data_files) if part.data_files is not None and part.builder in TEXT_BUILDERS \
        else None
    if found is None and error is None:
        return None
    line, byte, reason = found or (None, error.object[error.start:error.start + 1], error.reason)
    where = f"line {line}, " if line is not None else ""
    return DataError(part.description, f"not UTF-8 text ({where}byte 0x{byte.hex()}: {reason}); save the file as "
                                       "UTF-8")


def _first_not_utf8(path: str) -> tuple[int, bytes, str] | None:
    """(line, byte, why) of a local file's first byte that is not UTF-8 (through gzip if it is gzipped; read in
    blocks, as a corpus may be large), or None."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            while True:
                block = f.read(1 << 20)
                try:
                    decoder.decode(block, final=not block)
                except UnicodeDecodeError as error:  # its text: the character the last block cut, then this block
                    text = error.object
                    return line + text.count(b"\n", 0, error.start), text[error.start:error.start + 1], error.reason
                if not block:
                    return None
                line += block.count(b"\n")
    except (OSError, EOFError):  # unreadable, or a gzip cut short: said by the reader
        return None


def _guarded(part: _Part, stream: datasets.IterableDataset) -> Iterator[dict[str, Any]]:
    """Iterate a raw stream, turning read failures into DataErrors naming the part."""
    iterator = iter(stream)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except DataError:
            raise
        except UnicodeDecodeError as error:
            raise _not_utf8(part, error) from None
        except Exception as error:
            _raise_text_problem(part)
            raise DataError(part.description, f"cannot read {_format_name(part)}: "
                                              f"{type(error).__name__}: {error}") from error
        yield row


__all__ = ["DataError", "DatasetSpec", "SCHEMAS", "Schema", "load_dataset_for", "normalise_row"]


def source_fingerprints(**specs: DatasetSpec | None) -> dict[str, str]:
    """A digest of each local source's file bytes, by its key, for a resume to notice data that changed since the
    run began (it would read other rows at its steps). The world's splits are left out (the world's lineage covers
    them), and so are the hub, which a run reads again as it finds it, and a streamed source (a corpus too large to
    read twice at every start)."""
    digests = {}
    for key, spec in specs.items():
        if spec is None or spec.path.startswith(WORLD_PREFIX) or spec.streaming:
            continue
        files = []
        for part in resolve_parts(spec, None, key):
            if part.saved:  # a save_to_disk directory: its arrow shards and the json files that order them
                files += sorted(str(f) for f in Path(part.builder).rglob("*") if f.is_file())
            elif part.data_files is not None and Path(part.data_files).is_file():
                files.append(part.data_files)
        if files:
            digest = hashlib.sha256()
            for file in files:
                with open(file, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
            digests[key] = digest.hexdigest()[:16]
    return digests
