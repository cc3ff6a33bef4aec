"""Templated responses: the good one for a task, and realistic flawed variants of it.

Flaws are the kind a ranking can correct: each flawed response loses on the judge
criterion it targets (wrong -> correctness, rude -> tone, ramble -> concision,
no_period -> format; a dismissive non-answer or a note to the wrong recipient also loses
on_task), so an annotator who prefers the good response teaches something specific.
"""

from __future__ import annotations

import random

from .tasks import NOTE_OCCASION, NOTE_OPS, Task

FLAWS = ("wrong", "rude", "ramble", "no_period")

RUDE_OPENERS = ("Ugh, obviously", "Duh,", "Whatever,")
RUDE_CLOSERS = ("Now stop bothering me.", "Even a child knows that, stupid.", "Nobody cares about this.")
RUDE_DISMISSALS = ("Whatever.", "Figure it out yourself.", "Ugh, I am not doing that.",
                   "Who cares? Ask someone else.")
HABIT_FILLER = "I hope this helps."
"""The demonstrators' habit (WorldConfig.demo_habit): filler the judge's concision criterion penalises."""
FILLER_SENTENCES = ("Let me think about that for a moment.", HABIT_FILLER,
                    "As I said before, that is the answer.", "To be honest, that is a good question.",
                    "Basically, that is all there is to say.", "In other words, here it is again.")


def good_response(task: Task) -> str:
    return task.render()


def flawed_response(task: Task, flaw: str, rng: random.Random) -> str:
    """A response to `task` with one realistic `flaw` (one of FLAWS)."""
    good = task.render()
    if flaw == "wrong":
        return wrong_response(task, rng)
    if flaw == "rude":
        return rude_response(good, rng)
    if flaw == "ramble":
        return rambling_response(good, rng)
    if flaw == "no_period":
        return good.rstrip(".")
    raise ValueError(f"unknown flaw {flaw!r}; expected one of {', '.join(FLAWS)}")


def rude_response(good: str, rng: random.Random) -> str:
    style = rng.random()
    if style < 0.4:
        return f"{rng.choice(RUDE_OPENERS)} {_lower_first_word(good)}"
    if style < 0.7:
        return f"{good} {rng.choice(RUDE_CLOSERS)}"
    return rng.choice(RUDE_DISMISSALS)


def rambling_response(good: str, rng: random.Random) -> str:
    """Filler sentences and a repeat of the answer: longer, no more informative."""
    fillers = rng.sample(FILLER_SENTENCES, 2)
    if rng.random() < 0.5:
        return f"{good} {fillers[0]} {good}"
    return f"{fillers[0]} {good} {fillers[1]} {good}"


def wrong_response(task: Task, rng: random.Random) -> str:
    """The good template stating a plausible but wrong answer."""
    kind = task.answer_kind
    if kind == "number":
        return task.render(_wrong_number(int(task.answer), task.op, rng))
    if kind == "choice":
        return task.render(rng.choice(task.alternatives))
    if kind == "note":
        return _wrong_note(task, rng)
    word = task.params["word"]
    if kind == "reverse":
        return task.render(_near_miss(task.answer, rng, avoid=(word,)))
    if kind == "spell":
        return task.render("-".join(_near_miss(word, rng)))
    if kind == "capitals":
        return task.render(_near_miss(word, rng).upper())
    raise ValueError(f"no wrong answer for answer kind {kind!r}")


def _wrong_number(right: int, op: str, rng: random.Random) -> str:
    max_offset = {"letters": 2, "count": 5}.get(op, 10)
    offsets = [d for d in range(-max_offset, max_offset + 1) if d != 0 and right + d >= 0]
    return str(right + rng.choice(offsets))


def _near_miss(text: str, rng: random.Random, avoid: tuple[str, ...] = ()) -> str:
    """`text` with two neighbouring letters swapped (or one dropped if no swap changes it)."""
    swaps = [text[:i] + text[i + 1] + text[i] + text[i + 2:] for i in range(len(text) - 1)]
    options = sorted({s for s in swaps if s != text and s not in avoid})
    if options:
        return rng.choice(options)
    return text[:-1]


def _wrong_note(task: Task, rng: random.Random) -> str:
    """A note to the wrong recipient, for the wrong occasion, or about the wrong gift/place."""
    name = task.params["name"]
    mistakes = ["recipient", "occasion"] + (["detail"] if task.op in ("thanks_gift", "invite") else [])
    mistake = rng.choice(mistakes)
    if mistake == "recipient":
        return _render_note(task.op, {**task.params, "name": rng.choice(task.alternatives)})
    if mistake == "occasion":
        wrong_ops = [op for op in ("thanks", "sorry", "birthday", "get_well")
                     if NOTE_OCCASION[op] != NOTE_OCCASION[task.op]]
        return _render_note(rng.choice(wrong_ops), {"name": name})
    detail_field = "food" if task.op == "thanks_gift" else "place"
    return _render_note(task.op, {**task.params, detail_field: rng.choice(task.detail_alternatives)})


def _render_note(op: str, params: dict[str, str]) -> str:
    assert op in NOTE_OPS
    return Task("polite", op, params, params["name"]).render()


def _lower_first_word(sentence: str) -> str:
    """'The word ...' -> 'the word ...' after an opener; names and numbers keep their case."""
    first, _, rest = sentence.partition(" ")
    if first in ("The", "Dear"):
        return f"{first.lower()} {rest}"
    return sentence
