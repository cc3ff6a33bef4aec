"""A simulated human annotator: ranks responses by gold score, with Plackett-Luce noise."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from .judge import GoldJudge


@dataclass
class Annotator:
    """Ranks responses best-first by sampling a Plackett-Luce order with weights
    exp(gold_score / temperature).

    Any two responses then end up in gold order with the Bradley-Terry probability
    1 / (1 + exp(-|delta| / temperature)), so temperature sets how noisy the labels are.
    Temperature 0 gives the exact gold order (ties broken by index).
    """

    judge: GoldJudge
    temperature: float = 0.1
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self._rng = random.Random(f"annotator/{self.seed}")

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        """Indices of `responses`, best first."""
        scores = [self.judge.score(prompt, r).score for r in responses]
        return plackett_luce_order(scores, self.temperature, self._rng)


def plackett_luce_order(scores: list[float], temperature: float, rng: random.Random) -> list[int]:
    """Sample a best-first order with P(order) under Plackett-Luce weights exp(score / T).

    Uses the Gumbel-max trick: sorting score/T + Gumbel noise is an exact Plackett-Luce
    sample and avoids overflowing exp() at small temperatures.
    """
    if temperature == 0:
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keys = [s / temperature + _gumbel(rng) for s in scores]
    return sorted(range(len(scores)), key=lambda i: -keys[i])


def _gumbel(rng: random.Random) -> float:
    u = rng.random()
    while u == 0.0:
        u = rng.random()
    return -math.log(-math.log(u))
