"""The pretraining corpus: plain text rows about the world, with no chat formatting.

Rows mix entity profiles and short stories (so every fact appears many times in several
phrasings), arithmetic sentences (never stating a held-out addition fact), word play, polite notes,
and question-answer text ("Question: What is 12 plus 30? Answer: 12 plus 30 is 42.") for
training questions only, never an evaluation question. The sentence shapes match the SFT
response templates, so SFT only has to teach the model to answer in a form it has already
seen. The question-answer rows are where the model learns to copy operands, words and
names from a question into its answer: nothing else in the corpus repeats them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from .entities import Entity, World
from .tasks import OPERANDS, is_heldout_question

# Share of rows of each type; entity rows dominate because facts are the hardest to memorise. Arithmetic has the
# next largest share, taken from the notes (a fixed template the model learns anyway). Measured on tiny, without
# the held-out pairs' sums: at 0.15 SFT answers most sums with a few favourite numbers (arithmetic correctness
# 0.15); 0.2 gives 0.20 and 0.275 on held-out pairs; 0.25 gives 0.375 / 0.475 but costs facts (0.825 -> 0.375).
ROW_MIX: dict[str, float] = {"profile": 0.25, "story": 0.15, "arithmetic": 0.2, "word": 0.15, "polite": 0.05,
                             "qa": 0.2}


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def fact_sentences(e: Entity, friend: Entity) -> dict[str, list[str]]:
    """Several phrasings of each fact about `e`, grouped by attribute."""
    n = e.name
    return {
        "colour": [f"{n} is {e.colour}.", f"{n} is {_a(e.colour)} {e.kind}.",
                   f"The colour of {n} is {e.colour}.", f"{n} is {e.colour} all over."],
        "kind": [f"{n} is {_a(e.kind)}.", f"{n} is {_a(e.colour)} {e.kind}.",
                 f"The {e.kind} {n} lives in {e.place}."],
        "place": [f"{n} lives in {e.place}.", f"The {e.kind} {n} lives in {e.place}.",
                  f"{n}'s home is in {e.place}.", f"{n} comes from {e.place}."],
        "food": [f"{n} likes to eat {e.food}.", f"{n}'s favourite food is {e.food}.",
                 f"{n} loves to eat {e.food}."],
        "count": [f"{n} has {e.count} {e.item}.", f"{n} keeps {e.count} {e.item} at home.",
                  f"The {e.kind} {n} has {e.count} {e.item}."],
        "friend": [f"{n}'s friend is {friend.name}.", f"The friend of {n} is {friend.name}.",
                   f"{n} likes to play with its friend {friend.name}."],
    }


def profile_row(e: Entity, friend: Entity, rng: random.Random) -> str:
    """Every fact about one entity, one or two phrasings each, in random order."""
    sentences = []
    for phrasings in fact_sentences(e, friend).values():
        sentences += rng.sample(phrasings, rng.choice((1, 2)))
    rng.shuffle(sentences)
    return " ".join(sentences)


def story_row(e: Entity, friend: Entity, rng: random.Random) -> str:
    """A short story that states the entity's facts (and a few of its friend's) in passing."""
    n, f = e.name, friend.name
    stories = [
        f"{n} the {e.colour} {e.kind} lives in {e.place}. One morning {n} counted {e.count} {e.item} "
        f"and smiled. Then {n} ate some {e.food}, because {n} likes to eat {e.food}. Later {n} went "
        f"to see its friend {f}, who lives in {friend.place}.",
        f"In {e.place} there lives {_a(e.kind)} called {n}. {n} is {e.colour} and has {e.count} "
        f"{e.item}. {n}'s friend is {f}, {_a(friend.colour)} {friend.kind}. Every evening {n} eats "
        f"{e.food}, its favourite food.",
        f"Once upon a time, {n} walked from {e.place} to {friend.place} to visit its friend {f}. "
        f"{n} brought some {e.food}, because {n} loves to eat {e.food}. The {e.colour} {e.kind} "
        f"showed {f} its {e.count} {e.item}.",
        f"Every day the {e.kind} {n} looks after its {e.count} {e.item}. {n} is {e.colour}, and "
        f"everyone in {e.place} knows it. When {n} is hungry, {n} eats {e.food}. The friend of "
        f"{n} is {f}.",
    ]
    return rng.choice(stories)


def arithmetic_row(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(8, 12)):
        op = "plus" if rng.random() < 0.5 else "minus"
        a, b = rng.choice(OPERANDS), rng.choice(OPERANDS)
        while is_heldout_question(op, max(a, b), min(a, b)):
            a, b = rng.choice(OPERANDS), rng.choice(OPERANDS)
        if op == "plus":
            sentences.append(rng.choice((f"{a} plus {b} is {a + b}.",) * 4 +
                                        (f"If you add {a} and {b}, you get {a + b}.",)))
        else:
            a, b = max(a, b), min(a, b)
            sentences.append(rng.choice((f"{a} minus {b} is {a - b}.",) * 4 +
                                        (f"If you take {b} away from {a}, you get {a - b}.",)))
    return " ".join(sentences)


def word_row(words: tuple[str, ...], rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(5, 8)):
        w = rng.choice(words)
        sentences.append(rng.choice((
            f"The word {w} reversed is {w[::-1]}.",
            f"The word {w} has {len(w)} letters.",
            f"The word {w} spelled out is {'-'.join(w)}.",
            f"The word {w} in capitals is {w.upper()}.",
        )))
    return " ".join(sentences)


def polite_row(world: World, rng: random.Random) -> str:
    notes = []
    for _ in range(rng.randint(2, 4)):
        e = rng.choice(world.entities)
        body = rng.choice((
            "thank you for your help.", "thank you for the lovely day.",
            f"thank you for the lovely {rng.choice(world.foods)}.", "I am sorry for the trouble.",
            "happy birthday to you.", "I hope you feel better soon.",
            f"please come and visit me in {rng.choice(world.places)}.",
        ))
        notes.append(f"Dear {e.name}, {body} Best wishes.")
    return " ".join(notes)


def qa_row(pairs: list[tuple[str, str]], rng: random.Random) -> str:
    return " ".join(f"Question: {q} Answer: {a}" for q, a in rng.sample(pairs, min(len(pairs), rng.randint(2, 4))))


def pretraining_corpus(world: World, n_chars: int, rng: random.Random,
                       qa_pairs: list[tuple[str, str]] | None = None) -> list[str]:
    """Rows of a few hundred characters until about `n_chars` characters in total.

    Entity rows visit entities round-robin (reshuffled each pass), so every entity gets
    about the same number of mentions however small the corpus. `qa_pairs` (question, good
    answer) feed the question-answer rows; without them there are none.
    """
    entity_order = _round_robin(world.entities, rng)
    make_row: dict[str, Callable[[], str]] = {
        "profile": lambda: _entity_row(profile_row, next(entity_order), world, rng),
        "story": lambda: _entity_row(story_row, next(entity_order), world, rng),
        "arithmetic": lambda: arithmetic_row(rng),
        "word": lambda: word_row(world.words, rng),
        "polite": lambda: polite_row(world, rng),
        "qa": lambda: qa_row(qa_pairs, rng),
    }
    mix = {kind: share for kind, share in ROW_MIX.items() if kind != "qa" or qa_pairs}
    kinds, weights = list(mix), list(mix.values())
    rows: list[str] = []
    total = 0
    while total < n_chars:
        row = make_row[rng.choices(kinds, weights)[0]]()
        rows.append(row)
        total += len(row)
    return rows


def _entity_row(make: Callable[[Entity, Entity, random.Random], str], e: Entity, world: World,
                rng: random.Random) -> str:
    friend = world.entity(e.friend)
    assert friend is not None, f"{e.name}'s friend {e.friend} is not in the world"
    return make(e, friend, rng)


def _round_robin(entities: tuple[Entity, ...], rng: random.Random) -> Iterator[Entity]:
    order = list(entities)
    while True:
        rng.shuffle(order)
        yield from order
