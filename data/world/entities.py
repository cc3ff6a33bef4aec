"""The fictional world: entities with attributes, and the vocabularies they are drawn from.

Everything here is deterministic given the seed. The category vocabularies are stored in
`world.json` too, so a saved world keeps judging correctly even if these defaults change.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

KINDS = ("dragon", "robot", "fox", "owl", "bear", "cat", "frog", "wizard",
         "turtle", "rabbit", "goat", "otter")
COLOURS = ("red", "blue", "green", "teal", "yellow", "orange", "purple", "pink",
           "grey", "white", "black", "brown", "gold", "silver")
PLACES = ("Mossvale", "Stonebrook", "Fernhill", "Duskmoor", "Pinecrest", "Brightwater",
          "Oakridge", "Frostpeak", "Sunmeadow", "Riverbend", "Copperfield", "Willowmere",
          "Thornbury", "Glimmerdale", "Saltmarsh", "Emberfall")
FOODS = ("apples", "honey", "carrots", "cheese", "bread", "berries", "soup", "plums",
         "nuts", "pears", "rice", "cake", "fish", "pie", "cookies", "mushrooms")
ITEMS = ("gems", "stones", "shells", "coins", "acorns", "feathers", "marbles", "buttons")
MIN_ITEM_COUNT, MAX_ITEM_COUNT = 2, 29

# Common short English words for the `word` family. Palindromes are excluded because
# "reverse the word" must have an answer that differs from the word itself.
_WORD_LIST = """
apple bread chair table house river stone cloud light water plant smile dream heart
sound music paper pencil garden window button candle basket bottle bridge castle forest
island ladder lantern market mirror needle pocket ribbon saddle spider summer winter
ticket tunnel velvet wagon whistle zipper anchor arrow badge bell bird boat book boot
brush camel card cart chalk cherry clock coat coin corn crown cup desk door drum duck
egg fence field flag flame flower fork gate glass glove grape grass hat hill horse jar
jelly kettle key king kite knife lamp leaf lemon lion map melon milk moon mouse nest net
nose oak ocean pan park pear pen pig pillow pipe plate pond queen rain ring road robe
rock roof rope rose salt sand seed sheep shell ship shirt shoe sink snail snow sock
spoon star stick storm sugar sun swan tent tiger tooth towel tower train tree truck van
vase wall whale wheel wind wing wolf wool yard bench blanket candy carpet cotton feather
finger hammer helmet jacket kitten magnet meadow monkey muffin napkin noodle parrot
peanut pepper pickle planet puppet puzzle rocket shadow silk sofa sweater teapot thunder
tomato trumpet violin walnut basin bucket cabin canoe clover comet daisy dolphin eagle
engine falcon garlic ginger harbor hollow iron jungle kernel lizard maple marble mitten
orbit oyster panda pebble penguin pirate pumpkin raven saucer scarf sparrow spring
thimble thistle toast tulip valley walrus willow bean beach bone box bus cow dog fan gem
gift hen ice ink jam kiwi lake log mug oar pea pot rug saw sea sky toy tub web yak zoo
acorn actor album angle ankle apron attic bacon bagel banjo beard berry blade blossom
bubble cactus carrot cattle cereal circle cobweb collar copper crayon cricket cushion
dinner doctor donkey eraser fabric farmer fiddle folder fossil gravel guitar hamster
hockey insect jigsaw juice kennel ladle lettuce locket lumber mango marsh medal mustard
oven paddle palace pastry pepper pillar plum pony potato quilt rabbit radish rattle
sailor salad seashell sketch sledge spinach stable statue stool tablet tiger timber
toffee trolley turnip village waffle walnut wallet wizard yogurt
"""
WORDS = tuple(sorted(w for w in set(_WORD_LIST.split()) if w != w[::-1]))

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "fl", "gl", "gr", "kl", "pl", "sk", "sn", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "m")


@dataclass(frozen=True)
class Entity:
    """One inhabitant of the world. `friend` is another entity's name (friendship is one-way)."""

    name: str
    kind: str
    colour: str
    place: str
    food: str
    item: str
    count: int
    friend: str


@dataclass(frozen=True)
class World:
    """A seeded set of entities plus the category vocabularies the tasks draw from."""

    seed: int
    entities: tuple[Entity, ...]
    kinds: tuple[str, ...] = KINDS
    colours: tuple[str, ...] = COLOURS
    places: tuple[str, ...] = PLACES
    foods: tuple[str, ...] = FOODS
    items: tuple[str, ...] = ITEMS
    words: tuple[str, ...] = WORDS
    _by_name: dict[str, Entity] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {e.name: e for e in self.entities})
        if len(self._by_name) != len(self.entities):
            raise ValueError("entity names must be unique")

    @classmethod
    def from_seed(cls, seed: int = 0, n_entities: int = 200, n_words: int = 0) -> "World":
        """`n_words`: how many of the built-in words the word family uses (0: all)."""
        rng = random.Random(f"world/{seed}")
        names = invented_names(rng, n_entities, forbidden=_reserved_words())
        friends = _pick_friends(rng, names)
        entities = tuple(
            Entity(
                name=name,
                kind=rng.choice(KINDS),
                colour=rng.choice(COLOURS),
                place=rng.choice(PLACES),
                food=rng.choice(FOODS),
                item=rng.choice(ITEMS),
                count=rng.randint(MIN_ITEM_COUNT, MAX_ITEM_COUNT),
                friend=friends[name],
            )
            for name in names
        )
        if n_words > len(WORDS):
            raise ValueError(f"n_words={n_words} but only {len(WORDS)} words are built in")
        # its own stream, so the entities do not depend on n_words
        words = tuple(sorted(random.Random(f"words/{seed}").sample(WORDS, n_words))) if n_words else WORDS
        return cls(seed=seed, entities=entities, words=words)

    def entity(self, name: str) -> Entity | None:
        return self._by_name.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entities)

    def to_json(self) -> str:
        payload = {
            "seed": self.seed,
            "entities": [asdict(e) for e in self.entities],
            "kinds": list(self.kinds),
            "colours": list(self.colours),
            "places": list(self.places),
            "foods": list(self.foods),
            "items": list(self.items),
            "words": list(self.words),
        }
        return json.dumps(payload, sort_keys=True, ensure_ascii=False, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "World":
        payload = json.loads(text)
        return cls(
            seed=payload["seed"],
            entities=tuple(Entity(**e) for e in payload["entities"]),
            kinds=tuple(payload["kinds"]),
            colours=tuple(payload["colours"]),
            places=tuple(payload["places"]),
            foods=tuple(payload["foods"]),
            items=tuple(payload["items"]),
            words=tuple(payload["words"]),
        )


def invented_names(rng: random.Random, count: int, forbidden: frozenset[str]) -> list[str]:
    """`count` distinct pronounceable names like "Zorbi": two consonant-vowel syllables, sometimes three."""
    names: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(names) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise ValueError(f"cannot invent {count} distinct names")
        n_syllables = 3 if rng.random() < 0.15 else 2
        onsets = [rng.choice(_ONSETS) for _ in range(n_syllables)]
        parts = []
        for i, onset in enumerate(onsets):
            # A closing consonant only before a single-letter onset keeps names pronounceable.
            followed_by_single = i + 1 < n_syllables and len(onsets[i + 1]) == 1
            coda = rng.choice(_CODAS) if followed_by_single else ""
            parts.append(onset + rng.choice(_VOWELS) + coda)
        name = "".join(parts)
        if not 4 <= len(name) <= 8 or name in seen or name in forbidden:
            continue
        seen.add(name)
        names.append(name.capitalize())
    return names


def _pick_friends(rng: random.Random, names: list[str]) -> dict[str, str]:
    return {name: rng.choice([other for other in names if other != name]) for name in names}


def _reserved_words() -> frozenset[str]:
    """Lower-case words a name must not collide with, so the judge can tell names from answers."""
    vocab = KINDS + COLOURS + FOODS + ITEMS + WORDS + tuple(p.lower() for p in PLACES)
    return frozenset(vocab) | frozenset(
        "dear best wishes the word whatever sorry thank please visit".split())
