"""The gold judge: a programmatic scorer that knows the right answer to every world prompt.

It re-derives the task from the prompt text (same templates, same world lookup), then
scores a response on five criteria in [0, 1]:

- correctness (weight 0.4): the right answer is stated and no conflicting answer is, nor
  another entity or word than the one asked about ("The word folder has 6 letters." does not
  answer "How many letters are in the word kitten?"), nor a place or an unknown name as the subject
  ("Mossvale is a goat.", "The word zzz has 3 letters."). A sentence whose subject is the subject's friend
  ("Vusko is gold.", "Brinze's friend is gold.") is about the friend: judged against the friend, it answers
  nothing about the subject. Friendship is one-way: "Vusko's friend is Brinze." does not say who Brinze's friend
  is. A note must name its recipient and say its occasion, and may not copy the request ("Write a short
  apology to Brinze."), which names both. Checked by program per answer kind (number, colour/place/..., reversed
  word, ...).
  Weighted most because being right is the point; the other criteria are about how.
- on_task (0.15): the response addresses this prompt -- it states the right answer (about
  the right subject) or mentions the operands / entity / word asked about. A dismissive
  non-answer scores 0, and so does the request copied back ("What is 23 plus 45?").
- tone (0.15): no rude or dismissive words ("ugh", "whatever", "stupid", ...). Binary:
  one insult is enough to make a reply unacceptable.
- concision (0.15): within the family's word budget, no repeated sentence or phrase, no
  filler ("I hope this helps"). Rewards saying it once, briefly.
- format (0.15): starts with a capital letter (or digit) and ends with a period; a stray
  chat role token ("assistant:", "<|user|>") zeroes it since it means a broken template.

The overall score is the weighted mean, so a perfect response scores exactly 1.0. An
empty response scores 0 on everything. A prompt the judge cannot parse gets family
"unknown": correctness and on_task are 0 and only tone, concision and format are scored.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from .entities import MAX_ITEM_COUNT, MIN_ITEM_COUNT, World
from .responses import flawed_response as _flawed_response
from .responses import good_response as _good_response
from .tasks import (ARITHMETIC_OPS, COURTESY_OCCASIONS, NOTE_OCCASION, OCCASION_PATTERNS, OPERANDS,
                    REQUEST_RE, SIGN_OFFS, UNKNOWN_FAMILY, Task, parse_prompt)

CRITERIA_WEIGHTS: dict[str, float] = {
    "correctness": 0.4,
    "on_task": 0.15,
    "tone": 0.15,
    "concision": 0.15,
    "format": 0.15,
}

# Word budgets leave room for a restated question ("23 plus 45 is 68.") plus a few words.
WORD_BUDGETS: dict[str, int] = {
    "arithmetic": 12, "arithmetic_heldout": 12, "fact": 12, "word": 14, "polite": 22,
    UNKNOWN_FAMILY: 25,
}

RUDE_PATTERN = re.compile(
    r"\b(ugh|duh|obviously|whatever|stupid|dumb|idiot|who cares|figure it out yourself|"
    r"stop bothering me|leave me alone|even a child knows|not doing that|shut up|boring|"
    r"annoying|i guess|nobody cares)\b")
FILLER_PATTERN = re.compile(
    r"\b(let me think|i hope this helps|as i said|to be honest|basically|in other words|"
    r"you know|by the way|anyway|needless to say)\b")
ROLE_TOKEN_PATTERN = re.compile(
    r"<\|[^|>]*\|>|<\/?s>|\b(user|assistant|system|human)\s*:|^\s*#{2,}", re.IGNORECASE)

_WORD_RE = re.compile(r"[a-z]+")
_NUMBER_RE = re.compile(r"(?<![0-9A-Za-z])-?\d+")
_DASHED_RE = re.compile(r"(?<![A-Za-z0-9-])[A-Za-z](?:-[A-Za-z])+(?![A-Za-z0-9-])")  # "a-p-p-l-e7" spells no word
_CAPS_RE = re.compile(r"\b[A-Z]{3,}\b")  # the world's words have 3+ letters; "OK" is no answer
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+")
# "The word zzz has 5 letters.": the word a sentence is about, named as the answer templates name it. What follows
# "the word" may be the template's own keyword instead ("The word reversed is nettik."): that names no word.
_WORD_KEYWORDS = "reversed|has|spelled|in|backwards|is|contains|written"
_NAMED_WORD_RE = re.compile(rf"\bthe word (?!(?:{_WORD_KEYWORDS})\b)['\"]?([a-z]+)['\"]? (?:{_WORD_KEYWORDS})\b")
# "Mossvale is a goat.", "Zorbo likes pie.", "Zorbo's colour is gold.": a capitalised word opening a sentence (or a
# line) as the fact templates' subjects do. Pronouns and "The" ("The friend of Brinze is ...") open sentences about
# the asked subject; the answer or another value may open one too ("Gold is the colour of Brinze.").
_SENTENCE_SUBJECT_RE = re.compile(r"(?:^|(?<=[.!?] )|(?<=\n))([A-Z][A-Za-z]+)(?:'s [a-z]+| (?:is|has|lives|likes))\b")
# Sentences (or lines) of a reply, each judged for what it is about.
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
_SUBJECT_PRONOUNS = frozenset({"the", "it", "its", "he", "his", "she", "her", "they", "their", "this", "that", "there",
                               "here"})


@dataclass(frozen=True)
class Verdict:
    """The gold judge's verdict: overall `score` in [0, 1], each criterion in [0, 1], the task family."""

    score: float
    criteria: dict[str, float]
    family: str


@dataclass(frozen=True)
class _ResponseView:
    """A response pre-split once into the pieces the criteria look at."""

    text: str
    lower: str
    words: frozenset[str]      # lower-case alphabetic tokens
    numbers: tuple[int, ...]

    @classmethod
    def of(cls, response: str) -> "_ResponseView":
        text = response.strip()
        lower = text.lower()
        return cls(text, lower, frozenset(_WORD_RE.findall(lower)),
                   tuple(int(n) for n in _NUMBER_RE.findall(text)))


@dataclass
class GoldJudge:
    """Scores (prompt, response) pairs against the world's ground truth. Deterministic."""

    world: World
    _tasks: dict[str, Task | None] = field(default_factory=dict, init=False, repr=False)

    def task(self, prompt: str) -> Task | None:
        """The parsed task for a prompt (cached: the same prompts are scored many times)."""
        if prompt not in self._tasks:
            if len(self._tasks) > 200_000:
                self._tasks.clear()
            self._tasks[prompt] = parse_prompt(self.world, prompt)
        return self._tasks[prompt]

    def score(self, prompt: str, response: str) -> Verdict:
        task = self.task(prompt)
        view = _ResponseView.of(response)
        family = task.family if task else UNKNOWN_FAMILY
        if not view.text:
            criteria = dict.fromkeys(CRITERIA_WEIGHTS, 0.0)
        else:
            criteria = {
                "correctness": correctness(task, view) if task else 0.0,
                "on_task": on_task(task, view) if task else 0.0,
                "tone": tone(view),
                "concision": concision(view, WORD_BUDGETS[family]),
                "format": format_score(view),
            }
        total = sum(CRITERIA_WEIGHTS[name] * value for name, value in criteria.items())
        return Verdict(score=round(total, 6), criteria=criteria, family=family)

    def chance_correctness(self, prompt: str) -> float:
        """The correctness a blind guess would get: one over the number of answers this kind of question
        can have in this world (every sum of two of the world's operands, every colour, every word
        of the vocabulary, every recipient...). A model knows an answer only where it beats this."""
        task = self.task(prompt)
        return 1.0 / answer_space_size(self.world, task) if task else 0.0

    def good_response(self, prompt: str) -> str:
        """The templated ideal response (raises ValueError for a prompt the world cannot answer)."""
        return _good_response(self._require_task(prompt))

    def flawed_response(self, prompt: str, flaw: str, rng: random.Random) -> str:
        """A realistic flawed response; `flaw` is one of "wrong", "rude", "ramble", "no_period"."""
        return _flawed_response(self._require_task(prompt), flaw, rng)

    def _require_task(self, prompt: str) -> Task:
        task = self.task(prompt)
        if task is None:
            raise ValueError(f"prompt matches no task template of this world: {prompt!r}")
        return task


# ---------------------------------------------------------------- correctness


def correctness(task: Task, view: _ResponseView) -> float:
    """1 if the right answer is stated and nothing contradicts it, else 0 (notes: partial credit).
    Naming another entity or word than the one asked about contradicts it: that answers another question."""
    if _names_other_subject(task, view):
        return 0.0
    reverse_claims = _reverse_friendship_claims(task, view)
    if reverse_claims:
        if task.params["name"].lower() not in task.companion_facts:
            return 0.0  # false: the friend's friend is someone else
        view = _without_phrases(view, reverse_claims)  # true, but the answer to another question
    about_companion, view = _split_off_companion(task, view)
    if any(_stated_values(task, sentence) - set(task.companion_facts) for sentence in about_companion):
        return 0.0  # a false statement about the friend: "Vusko is black." when Vusko is gold
    kind = task.answer_kind
    if any(d.lower() in view.words for d in task.detail_alternatives):
        return 0.0  # about other things: a count of other items, a note for another gift or place
    if kind == "number":
        return float(_stated_numbers(task, view) == {int(task.answer)})
    if kind == "choice":
        return _choice_correctness(view.words, task.answer.lower(), task.alternatives)
    if kind == "reverse":
        return _reverse_correctness(view.words, task.params["word"], task.answer)
    if kind == "spell":
        spelled = {s.lower() for s in _DASHED_RE.findall(view.text)}
        return float(spelled == {task.answer})
    if kind == "capitals":
        return float(set(_CAPS_RE.findall(view.text)) == {task.answer})
    if kind == "note":
        return _note_correctness(task, view)
    raise ValueError(f"unknown answer kind {kind!r}")


def answer_space_size(world: World, task: Task) -> int:
    """How many distinct right answers questions of this task's kind have in `world`."""
    if task.op in ARITHMETIC_OPS:
        return _arithmetic_answers(task.op)  # held-out facts too: a guess cannot tell them apart
    if task.op == "count":
        return MAX_ITEM_COUNT - MIN_ITEM_COUNT + 1
    if task.op == "letters":
        return len({len(w) for w in world.words})
    if task.answer_kind == "choice":
        return 1 + len(task.alternatives)
    if task.answer_kind == "note":
        return len(world.entities)  # the recipient must be named; the rest the template gives away
    return len(world.words)  # reverse, spell, capitals


@functools.cache
def _arithmetic_answers(op: str) -> int:
    if op == "plus":
        return len({a + b for a in OPERANDS for b in OPERANDS})
    return len({a - b for a in OPERANDS for b in OPERANDS if a >= b})


def _stated_numbers(task: Task, view: _ResponseView) -> set[int]:
    """Numbers the response states beyond restating the prompt's operands.

    A response may restate the question several times ("23 plus 45 is 68. ... 23 plus 45
    is 68."), so the operands are removed as often as the fullest restatement occurs (at
    least once). An answer equal to an operand ("40 minus 20 is 20") then still counts. A
    response of numbers that are all operands states them as its answer: a bare "20." to
    "40 minus 20" is right, "40 minus 20" alone (40 and 20) is not.
    """
    remaining = Counter(view.numbers)
    needed = Counter(task.operands)
    if not needed:
        return set(remaining)
    restatements = max(1, min(remaining[n] // k for n, k in needed.items()))
    for n, k in needed.items():
        remaining[n] = max(0, remaining[n] - restatements * k)
    return {n for n, count in remaining.items() if count > 0} or set(view.numbers)


def _choice_correctness(words: frozenset[str], answer: str, alternatives: tuple[str, ...]) -> float:
    if answer not in words:
        return 0.0
    return float(not any(alt.lower() in words for alt in alternatives))


def _reverse_correctness(words: frozenset[str], word: str, answer: str) -> float:
    """The reversal is present and no other rearrangement of the word's letters competes."""
    if answer not in words:
        return 0.0
    letters = sorted(word)
    rivals = [w for w in words if w not in (word, answer) and sorted(w) == letters]
    return float(not rivals)


def _note_correctness(task: Task, view: _ResponseView) -> float:
    """0 if the recipient is missing or another entity, gift or place is named, if the reply copies the request, or
    if the note does not say its occasion or says another one (see OCCASION_PATTERNS); else the share of its parts
    present: the occasion, the gift or place asked about (if any), a sign-off."""
    words = view.words
    if task.answer.lower() not in words or any(n.lower() in words for n in task.alternatives):
        return 0.0
    if _copies_a_request(view):
        return 0.0  # its recipient and occasion are the prompt's, and no note to send has the request in it
    occasion = NOTE_OCCASION[task.op]
    if not OCCASION_PATTERNS[occasion].search(view.text):
        return 0.0
    if any(pattern.search(view.text) for other, pattern in OCCASION_PATTERNS.items()
           if other != occasion and other not in COURTESY_OCCASIONS):
        return 0.0
    detail = task.params.get("food") or task.params.get("place")
    parts = [True, any(s in view.lower for s in SIGN_OFFS)]  # the occasion, said, is the first part
    if detail:
        parts.append(detail.lower() in words)
    return sum(parts) / len(parts)


def _reverse_friendship_claims(task: Task, view: _ResponseView) -> list[str]:
    """"Klopo's friend is Brinze." or "Brinze is Klopo's friend." to "Who is Brinze's friend?" (lower case, as the
    reply states them): friendship is one-way, so that says whose friend Brinze is, not who Brinze's friend is (which
    is Klopo). True or not, such a statement does not answer the question."""
    if task.op != "friend":
        return []
    name, friend = task.params["name"].lower(), task.answer.lower()
    return [claim for claim in (f"{friend}'s friend is {name}", f"the friend of {friend} is {name}",
                                f"{name} is {friend}'s friend", f"{name} is the friend of {friend}",
                                f"{name} is a friend of {friend}") if claim in view.lower]


def _without_phrases(view: _ResponseView, phrases: list[str]) -> _ResponseView:
    text = view.text
    for phrase in phrases:
        text = re.sub(re.escape(phrase), "", text, flags=re.IGNORECASE)
    return _ResponseView.of(text)


def _split_off_companion(task: Task, view: _ResponseView) -> tuple[list[_ResponseView], _ResponseView]:
    """The sentences about the subject's friend, and the rest of the reply. A sentence is about the friend if the
    friend is its subject ("Vusko is gold, like its friend Brinze.", "Brinze's friend is gold.", "Its friend has 14
    acorns."); one that names the friend further on mentions it in passing ("Brinze is black, like its friend Vusko.")
    and is about the subject, as is one that opens on the friend without being about it ("Vusko's friend Brinze is
    grey.", "Vusko and Brinze are friends, ..."). What a sentence says of the friend says nothing of the subject."""
    if not task.companion or (task.companion.lower() not in view.words and "friend" not in view.words):
        return [], view
    about_companion = _companion_subject(task.params["name"], task.companion)
    about, rest = [], []
    for sentence in _SENTENCE_RE.split(view.text):
        (about if about_companion.match(sentence) else rest).append(sentence)
    if not about:
        return [], view
    return [_ResponseView.of(sentence) for sentence in about], _ResponseView.of(" ".join(rest))


@functools.lru_cache(maxsize=4096)
def _companion_subject(name: str, companion: str) -> re.Pattern[str]:
    """A sentence opening whose subject is the friend: its name, "Brinze's friend", "its friend" or "the friend of
    Brinze" (the name may follow: "Its friend Vusko"), then a verb or attribute of the fact templates. "Vusko's
    friend ..." is someone else, the subject perhaps; "Vusko and Brinze ..." is not the friend alone."""
    name, companion = re.escape(name), re.escape(companion)
    subject = (rf"{companion}|(?:(?:{name}'s|the|its|his|her|their) friend|the friend of {name})(?:,? {companion})?")
    return re.compile(rf"(?:{subject})(?: (?:is|has|lives|likes)\b|'s (?!friend\b)[a-z]+)", re.IGNORECASE)


def _stated_values(task: Task, view: _ResponseView) -> set[str]:
    """The values of the kind asked about that `view` states (lower case): colours to a colour question, numbers and
    items to a count."""
    if task.op == "count":
        return {str(n) for n in view.numbers} | ({task.params["item"], *task.detail_alternatives} & view.words)
    return {value.lower() for value in (task.answer, *task.alternatives)} & view.words


# ---------------------------------------------------------------- style criteria


def _names_other_subject(task: Task, view: _ResponseView) -> bool:
    if task.companion and task.companion.lower() in view.words and task.params["name"].lower() not in view.words:
        return True  # the friend, named instead of the subject: a statement about the friend
    if any(subject.lower() in view.words for subject in task.other_subjects):
        return True
    if task.family == "word":  # "The word zzz has 5 letters.": a word the world does not know is still another word
        return any(named not in (task.params["word"], task.answer.lower())
                   for named in _NAMED_WORD_RE.findall(view.lower))
    if task.family == "fact":  # "Mossvale is a goat.": a sentence about a place, or a name the world does not know
        about = {task.params["name"].lower(), task.companion.lower(), task.answer.lower(),
                 *(value.lower() for value in task.alternatives)}
        return any(subject.lower() not in about and subject.lower() not in _SUBJECT_PRONOUNS
                   for subject in _SENTENCE_SUBJECT_RE.findall(view.text))
    return False


def _is_request(sentence: str) -> bool:
    return REQUEST_RE.fullmatch(sentence.strip()) is not None


def _copies_a_request(view: _ResponseView) -> bool:
    return any(_is_request(sentence) for sentence in _SENTENCE_RE.split(view.text))


def _without_requests(view: _ResponseView) -> _ResponseView:
    """The reply without its sentences that are a request: "What is 23 plus 45?" or "Write a short apology to
    Brinze." copied back names the subject without addressing it."""
    if not _copies_a_request(view):
        return view
    return _ResponseView.of(" ".join(s for s in _SENTENCE_RE.split(view.text) if not _is_request(s)))


def on_task(task: Task, view: _ResponseView) -> float:
    """1 if the right answer is stated (and no other entity or word is named), else the share of subject terms
    mentioned; a copy of the request counts for neither."""
    view = _without_requests(view)
    if _answer_stated(task, _split_off_companion(task, view)[1]) and not _names_other_subject(task, view):
        return 1.0
    terms = task.subject_terms
    if task.op in ("plus", "minus"):
        mentioned = [int(t) in view.numbers for t in terms]
    else:
        mentioned = [t.lower() in view.words for t in terms]
    return sum(mentioned) / len(terms)


def _answer_stated(task: Task, view: _ResponseView) -> bool:
    kind = task.answer_kind
    if kind == "number":
        return int(task.answer) in _stated_numbers(task, view)
    if kind == "spell":
        return task.answer in view.lower
    if kind == "capitals":
        return task.answer in view.text
    return task.answer.lower() in view.words


def tone(view: _ResponseView) -> float:
    """0 if any rude or dismissive expression appears, else 1."""
    return 0.0 if RUDE_PATTERN.search(view.lower) else 1.0


def concision(view: _ResponseView, budget: int) -> float:
    """1 within the word budget, falling linearly to 0 at twice the budget; halved for a
    repeated sentence or phrase, halved again for filler."""
    n_words = len(view.text.split())
    length_factor = 1.0 if n_words <= budget else max(0.0, 1.0 - (n_words - budget) / budget)
    if _has_repetition(view):
        length_factor *= 0.5
    if FILLER_PATTERN.search(view.lower):
        length_factor *= 0.5
    return length_factor


def _has_repetition(view: _ResponseView) -> bool:
    sentences = [s.strip(" .!?") for s in _SENTENCE_SPLIT_RE.split(view.lower) if s.strip(" .!?")]
    if len(sentences) != len(set(sentences)):
        return True
    tokens = [t.strip(".,!?;:") for t in view.lower.split()]
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    return len(trigrams) != len(set(trigrams))


def format_score(view: _ResponseView) -> float:
    """Mean of starts-with-capital-or-digit and ends-with-period; 0 with a stray role token."""
    if ROLE_TOKEN_PATTERN.search(view.text):
        return 0.0
    first = view.text[0]
    starts_well = first.isupper() or first.isdigit()
    return (float(starts_well) + float(view.text.endswith("."))) / 2
