"""Task families: prompt templates, parsing a prompt back into a task, and enumerating prompts.

The same template table is used in both directions: to generate prompts (and their good
responses) and, via regexes compiled from it, to parse any generated prompt back into the
task and its right answer. That is what lets the gold judge score a response to a prompt
string alone.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from .entities import World

FAMILIES = ("arithmetic", "arithmetic_heldout", "fact", "word", "polite")
TRAIN_FAMILIES = ("arithmetic", "fact", "word", "polite")
UNKNOWN_FAMILY = "unknown"

# Every sum and difference in the world has two operands in this range.
OPERANDS = range(10, 50)


def is_heldout_fact(x: int, y: int) -> bool:
    """Whether the addition fact x + y = z belongs to the held-out arithmetic family: about 1 fact in 11, whichever
    way it is written. "x plus y", "y plus x", "z minus x" and "z minus y" all state it, so all of them are held
    out together (held out by the question's operands alone, "27 minus 13" was answered by "13 plus 14 is 27" in
    the corpus). No training text states a held-out fact, so a model answers these only by adding.

    The rule is on the addends modulo 11, not on their digits, so every pair of ones digits and every pair of tens
    digits still occurs in training (a test checks this). Holding out a digit range instead (operands 50-99) tests
    whether a model writes a digit in a position it has never seen there, which a small transformer with learnt
    embeddings does not do (measured: it copies "98" as "48").
    """
    high, low = max(x, y), min(x, y)
    return (high + 3 * low) % 11 == 0


def addends(op: str, a: int, b: int) -> tuple[int, int]:
    """The addition fact behind "a plus b" (a + b) or "a minus b" (b + (a - b) = a)."""
    return (a, b) if op == "plus" else (b, a - b)


def is_heldout_question(op: str, a: int, b: int) -> bool:
    return is_heldout_fact(*addends(op, a, b))


ARITHMETIC_OPS = ("plus", "minus")
FACT_OPS = ("colour", "place", "count", "friend", "food", "kind")
WORD_OPS = ("reverse", "letters", "spell", "capitals")
NOTE_OPS = ("thanks", "thanks_gift", "sorry", "birthday", "get_well", "invite")

PROMPT_PHRASINGS: dict[str, tuple[str, ...]] = {
    "plus": ("What is {a} plus {b}?", "How much is {a} plus {b}?", "Compute {a} plus {b}."),
    "minus": ("What is {a} minus {b}?", "How much is {a} minus {b}?", "Compute {a} minus {b}."),
    "colour": ("What colour is {name}?", "Which colour is {name}?", "What is the colour of {name}?"),
    "place": ("Where does {name} live?", "Where is {name}'s home?", "In which place does {name} live?"),
    "count": ("How many {item} does {name} have?", "How many {item} has {name} got?",
              "What number of {item} does {name} own?"),
    "friend": ("Who is {name}'s friend?", "Who is the friend of {name}?", "Name the friend of {name}."),
    "food": ("What does {name} like to eat?", "What is {name}'s favourite food?",
             "Which food does {name} love?"),
    "kind": ("What kind of creature is {name}?", "What sort of creature is {name}?",
             "Tell me what kind of creature {name} is."),
    "reverse": ("Reverse the word {word}.", "What is the word {word} reversed?",
                "Write the word {word} backwards."),
    "letters": ("How many letters are in the word {word}?", "How many letters does the word {word} have?",
                "Count the letters in the word {word}."),
    "spell": ("Spell the word {word} with dashes.", "Spell out the word {word}.",
              "Write the word {word} letter by letter."),
    "capitals": ("Write the word {word} in capitals.", "What is the word {word} in capital letters?",
                 "Write the word {word} in upper case."),
    "thanks": ("Write a short thank-you note to {name}.", "Please write a brief thank-you note to {name}."),
    "thanks_gift": ("Write a short thank-you note to {name} for the {food}.",
                    "Please write a brief thank-you note to {name} for the {food}."),
    "sorry": ("Write a short apology to {name}.", "Please write a brief apology to {name}."),
    "birthday": ("Write a short birthday note to {name}.", "Please write a brief birthday note to {name}."),
    "get_well": ("Write a short get-well note to {name}.", "Please write a brief get-well note to {name}."),
    "invite": ("Write a short note inviting {name} to {place}.",
               "Please write a brief note inviting {name} to {place}."),
}

# The canonical (good) response for each op; `{answer}` is the part a wrong response changes.
RESPONSE_TEMPLATES: dict[str, str] = {
    "plus": "{a} plus {b} is {answer}.",
    "minus": "{a} minus {b} is {answer}.",
    "colour": "{name} is {answer}.",
    "place": "{name} lives in {answer}.",
    "count": "{name} has {answer} {item}.",
    "friend": "{name}'s friend is {answer}.",
    "food": "{name} likes to eat {answer}.",
    "kind": "{name} is {article} {answer}.",
    "reverse": "The word {word} reversed is {answer}.",
    "letters": "The word {word} has {answer} letters.",
    "spell": "The word {word} spelled out is {answer}.",
    "capitals": "The word {word} in capitals is {answer}.",
    "thanks": "Dear {name}, thank you for your help. Best wishes.",
    "thanks_gift": "Dear {name}, thank you for the lovely {food}. Best wishes.",
    "sorry": "Dear {name}, I am sorry for the trouble. Best wishes.",
    "birthday": "Dear {name}, happy birthday to you. Best wishes.",
    "get_well": "Dear {name}, I hope you feel better soon. Best wishes.",
    "invite": "Dear {name}, please come and visit me in {place}. Best wishes.",
}

# How a note says what it is for. Matched from the start of a word, so inflections count ("thanked", "apologies",
# "recovery"); phrases where the word alone is common in any note ("feel better", not "a better year"; "you are
# invited", not "thank you for the invitation"; "be well soon", not the greeting "I hope you are well").
# A note must say its own occasion and no other (an apology inside a thank-you note is the wrong note), except
# thanks: any note may thank.
OCCASION_PATTERNS: dict[str, re.Pattern[str]] = {
    occasion: re.compile(rf"\b(?:{phrases})", re.IGNORECASE) for occasion, phrases in {
        "thanks": r"thank|grateful",
        "sorry": r"sorry(?! to hear (?:that )?(?:you|your)\b)|apolog",  # "sorry to hear you are ill" is no apology
        "birthday": r"birthday",
        "get_well": r"(?:feel|feels|feeling|get|gets|getting)[ -](?:well|better)\b|(?:are|be) (?:well soon|better)\b"
                    r"|recover",
        "invite": r"invit(?:e|es|ing) you\b|you(?:'re| are) (?:\w+ )?invited|come (?:and )?visit|visit (?:me|us)\b",
    }.items()}
COURTESY_OCCASIONS = ("thanks",)  # any note may say these
NOTE_OCCASION = {"thanks": "thanks", "thanks_gift": "thanks", "sorry": "sorry",
                 "birthday": "birthday", "get_well": "get_well", "invite": "invite"}
SIGN_OFFS = ("best wishes", "kind regards", "warm wishes", "yours truly", "with love", "love from")

OP_FAMILY: dict[str, str] = {
    **{op: "arithmetic" for op in ARITHMETIC_OPS},
    **{op: "fact" for op in FACT_OPS},
    **{op: "word" for op in WORD_OPS},
    **{op: "polite" for op in NOTE_OPS},
}

_FIELD_PATTERNS = {
    "a": r"\d{1,6}", "b": r"\d{1,6}",
    "name": r"[A-Z][a-z]+", "place": r"[A-Z][a-z]+",
    "item": r"[a-z]+", "word": r"[a-z]+", "food": r"[a-z]+",
}


@dataclass(frozen=True)
class Task:
    """One question, recovered from a prompt: what is asked and what the right answer is.

    `params` are the values parsed from the prompt (operands, entity name, word, ...).
    `answer` is the canonical answer ("68", "teal", "elppa", "a-p-p-l-e", "APPLE"); for
    notes it is the recipient's name. `alternatives` are the values a wrong answer to a
    choice question would use (every other colour, place, ...); for notes, other names.
    `detail_alternatives` (notes): the foods or places other than the one asked about; (count facts): the
    items other than the one asked about ("Brinze has 25 coins." does not say how many gems it has).
    `other_subjects` (facts and word play): the entities or words the question is *not* about. A reply that
    names one answers another question ("The word folder has 6 letters." to "How many letters are in the word
    kitten?"), even if the value it states happens to be right.
    `companion` (facts other than the friend question): the subject's friend, which a reply may mention in
    passing beside the subject ("..., like its friend Vusko"), but not instead of it ("Vusko is gold.").
    `companion_facts`: the friend's own values of the kind asked about (lower case; its count and item for a
    count), against which a sentence about the friend ("Vusko is gold.", "Brinze's friend has 14 acorns.") is judged;
    for the friend question, the friend's own friend ("Vusko's friend is Brinze." is true or false by it).
    """

    family: str
    op: str
    params: dict[str, str]
    answer: str
    alternatives: tuple[str, ...] = ()
    detail_alternatives: tuple[str, ...] = ()
    other_subjects: tuple[str, ...] = ()
    companion: str = ""
    companion_facts: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, ...]:
        """Identity of the underlying question, shared by all phrasings of it."""
        return (self.op, *(f"{k}={v}" for k, v in sorted(self.params.items())))

    @property
    def fact_key(self) -> tuple[str, ...]:
        """Identity of what answering takes knowing, which a held-out split keeps on one side: for arithmetic the
        addition fact, which "a plus b", "b plus a" and both differences state (as `is_heldout_fact` holds them out
        together); else the question (`key`)."""
        if self.op in ARITHMETIC_OPS:
            return ("addition", *(str(n) for n in sorted(addends(self.op, *self.operands))))
        return self.key

    @property
    def answer_kind(self) -> str:
        if self.op in ARITHMETIC_OPS or self.op in ("count", "letters"):
            return "number"
        if self.op in FACT_OPS:
            return "choice"
        if self.op in NOTE_OPS:
            return "note"
        return self.op  # reverse, spell, capitals: each has its own answer shape

    @property
    def operands(self) -> tuple[int, ...]:
        """Numbers the prompt itself contains; a response may repeat them without conflict."""
        if self.op in ARITHMETIC_OPS:
            return int(self.params["a"]), int(self.params["b"])
        return ()

    @property
    def subject_terms(self) -> tuple[str, ...]:
        """What an on-task response talks about: the operands, the entity or the word."""
        if self.op in ARITHMETIC_OPS:
            return self.params["a"], self.params["b"]
        if self.op in WORD_OPS:
            return (self.params["word"],)
        return (self.params["name"],)

    def render(self, answer: str | None = None) -> str:
        """The templated response, with `answer` (default: the right one) filled in."""
        answer = self.answer if answer is None else answer
        article = "an" if answer[:1] in "aeiou" else "a"
        return RESPONSE_TEMPLATES[self.op].format(answer=answer, article=article, **self.params)


def _phrasing_regex(phrasing: str, named: bool = True) -> str:
    pattern = ""
    for literal, field_name, _, _ in string.Formatter().parse(phrasing):
        pattern += re.escape(literal)
        if field_name:
            field = _FIELD_PATTERNS[field_name]
            pattern += f"(?P<{field_name}>{field})" if named else f"(?:{field})"
    return pattern


# Checked in order; first full match wins. Templates never overlap, so order only matters for speed.
_PARSERS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (op, re.compile(_phrasing_regex(phrasing))) for op, phrasings in PROMPT_PHRASINGS.items() for phrasing in phrasings
)

# A sentence that is a request rather than an answer: a prompt of the world (any phrasing, any subject, its final "?"
# or "." optional), or a note asked for in other words ("Write a thank-you note to Brinze."). Matched against the
# whole sentence: one that opens with a request and goes on to answer it ("Spell out the word apple: a-p-p-l-e.")
# is an answer, as is one that merely asks for a note ("Please write a note back soon.").
REQUEST_RE = re.compile("(?:" + "|".join(
    [_phrasing_regex(phrasing.rstrip("?."), named=False) for phrasings in PROMPT_PHRASINGS.values()
     for phrasing in phrasings]
    + [r"(?:please )?write an? (?:[a-z-]+ ){0,3}?(?:note|apology) "
       r"(?:to [a-z]+(?: for the [a-z]+)?|inviting [a-z]+ to [a-z]+)"]) + r")[.?!]?", re.IGNORECASE)


def parse_prompt(world: World, prompt: str) -> Task | None:
    """The task a prompt asks for, or None if it matches no template (or names an unknown entity)."""
    text = prompt.strip()
    for op, regex in _PARSERS:
        match = regex.fullmatch(text)
        if match:
            return build_task(world, op, match.groupdict())
    return None


def build_task(world: World, op: str, params: dict[str, str]) -> Task | None:
    """Work out the right answer for `op` with `params` (None if the world cannot answer it)."""
    if op in ARITHMETIC_OPS:
        a, b = int(params["a"]), int(params["b"])
        # Operands outside the world's range are unseen too, so they count as held out.
        trained = a in OPERANDS and b in OPERANDS and not is_heldout_question(op, a, b)
        family = "arithmetic" if trained else "arithmetic_heldout"
        # Normalise "07" to "7" so the response template and the key match the numbers.
        params = {"a": str(a), "b": str(b)}
        return Task(family, op, params, str(a + b if op == "plus" else a - b))
    if op in FACT_OPS:
        return _fact_task(world, op, params)
    if op in WORD_OPS:
        word, answer = params["word"], _word_answer(op, params["word"])
        others = tuple(w for w in world.words if w not in (word, answer.lower()))
        return Task("word", op, params, answer, other_subjects=others)
    if op in NOTE_OPS:
        others = tuple(n for n in world.names if n != params["name"])
        if "food" in params:
            details = tuple(f for f in world.foods if f != params["food"])
        elif "place" in params:
            details = tuple(p for p in world.places if p != params["place"])
        else:
            details = ()
        return Task("polite", op, params, params["name"], others, details)
    return None


def _fact_task(world: World, op: str, params: dict[str, str]) -> Task | None:
    entity = world.entity(params["name"])
    if entity is None:
        return None
    friend = world.entity(entity.friend)
    # the friend may be mentioned in passing ("..., like its friend Vusko"); any other entity is a wrong subject
    other_subjects = tuple(n for n in world.names if n not in (entity.name, entity.friend))
    if op == "count":
        if params["item"] != entity.item:
            return None  # the world does not say how many of other things it has
        return Task("fact", op, params, str(entity.count), detail_alternatives=tuple(
            i for i in world.items if i != entity.item), other_subjects=other_subjects, companion=friend.name,
                    companion_facts=(str(friend.count), friend.item))
    if op == "friend":
        return Task("fact", op, params, entity.friend, other_subjects, other_subjects=other_subjects,
                    companion_facts=(friend.friend.lower(),))
    category = {"colour": world.colours, "place": world.places, "food": world.foods, "kind": world.kinds}[op]
    answer = getattr(entity, op)  # each of these ops is named after the attribute it asks for
    return Task("fact", op, params, answer, tuple(c for c in category if c != answer), other_subjects=other_subjects,
                companion=friend.name, companion_facts=(getattr(friend, op).lower(),))


def _word_answer(op: str, word: str) -> str:
    if op == "reverse":
        return word[::-1]
    if op == "letters":
        return str(len(word))
    if op == "spell":
        return "-".join(word)
    return word.upper()


@dataclass(frozen=True)
class PromptCandidate:
    """A prompt the world can ask, with the identity of its underlying question."""

    key: tuple[str, ...]
    prompt: str
    family: str


def enumerate_prompts(world: World, family: str) -> list[PromptCandidate]:
    """Every prompt of `family` the world can generate, in a fixed order."""
    candidates = []
    for op, params in _family_questions(world, family):
        for phrasing in PROMPT_PHRASINGS[op]:
            task = build_task(world, op, params)
            assert task is not None and task.family == family, (op, params)
            candidates.append(PromptCandidate(task.key, phrasing.format(**params), family))
    return candidates


def _family_questions(world: World, family: str):
    if family in ("arithmetic", "arithmetic_heldout"):
        for a in OPERANDS:
            for b in OPERANDS:
                for op in ("plus", "minus") if a >= b else ("plus",):  # keep answers non-negative
                    if is_heldout_question(op, a, b) == (family == "arithmetic_heldout"):
                        yield op, {"a": str(a), "b": str(b)}
    elif family == "fact":
        for entity in world.entities:
            for op in FACT_OPS:
                params = {"name": entity.name}
                if op == "count":
                    params["item"] = entity.item
                yield op, params
    elif family == "word":
        for word in world.words:
            for op in WORD_OPS:
                yield op, {"word": word}
    elif family == "polite":
        for entity in world.entities:
            name = entity.name
            yield "thanks", {"name": name}
            for food in world.foods:
                yield "thanks_gift", {"name": name, "food": food}
            for op in ("sorry", "birthday", "get_well"):
                yield op, {"name": name}
            for place in world.places:
                yield "invite", {"name": name, "place": place}
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
