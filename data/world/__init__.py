"""The embedded synthetic world: a seeded fictional world small enough for a tiny model to
learn, with task families, a pretraining corpus, SFT demos, prompt splits, a programmatic
gold judge and a simulated (noisy) annotator.

Generate everything with `python -m data.world --out DIR` or `write_world(DIR, WorldConfig())`.
"""

from .annotator import Annotator
from .config import WorldConfig
from .entities import Entity, World
from .judge import GoldJudge, Verdict
from .responses import FLAWS
from .tasks import FAMILIES, TRAIN_FAMILIES
from .writer import generate_world, write_world

__all__ = [
    "FAMILIES",
    "FLAWS",
    "TRAIN_FAMILIES",
    "Annotator",
    "Entity",
    "GoldJudge",
    "Verdict",
    "World",
    "WorldConfig",
    "generate_world",
    "write_world",
]
