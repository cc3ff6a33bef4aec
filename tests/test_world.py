"""The synthetic world: determinism, disjoint splits, the gold judge's verdicts, annotator noise."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from data.world import FAMILIES, FLAWS, TRAIN_FAMILIES, Annotator, GoldJudge, World, WorldConfig, write_world
from data.world.annotator import plackett_luce_order
from data.world.corpus import fact_sentences, pretraining_corpus
from data.world.responses import HABIT_FILLER
from data.world.splits import sft_demos
from data.world.tasks import OPERANDS, addends, enumerate_prompts, is_heldout_fact, is_heldout_question

REPO = Path(__file__).resolve().parent.parent

SMALL = WorldConfig(seed=3, n_entities=40, corpus_chars=50_000, sft_examples=400, sft_eval_examples=40,
                    pref_prompts=100, ppo_prompts=100, eval_prompts=50)
DATA_FILES = ("world.json", "pretrain.jsonl", "sft_train.jsonl", "sft_eval.jsonl", "pref_prompts.jsonl",
              "ppo_prompts.jsonl", "eval_prompts.jsonl", "prefs_static.jsonl")
PROMPT_SPLITS = ("sft_train", "sft_eval", "pref_prompts", "ppo_prompts", "eval_prompts")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prompts_of(world_dir: Path, split: str) -> list[str]:
    rows = read_jsonl(world_dir / f"{split}.jsonl")
    return [r["messages"][0]["content"] if "messages" in r else r["prompt"] for r in rows]


@pytest.fixture(scope="module")
def small_world_dir(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("worlds") / "small", SMALL)


@pytest.fixture(scope="module")
def world() -> World:
    return World.from_seed(0, 40)


@pytest.fixture(scope="module")
def judge(world) -> GoldJudge:
    return GoldJudge(world)


# ---------------------------------------------------------------- files and determinism


def test_writes_every_file_with_sorted_keys(small_world_dir):
    assert sorted(p.name for p in small_world_dir.iterdir()) == sorted(DATA_FILES + ("world_config.json", "generator.txt"))
    assert WorldConfig.from_json((small_world_dir / "world_config.json").read_text()) == SMALL
    first_line = (small_world_dir / "prefs_static.jsonl").read_text().splitlines()[0]
    assert first_line == json.dumps(json.loads(first_line), sort_keys=True, ensure_ascii=False)
    sizes = {split: len(read_jsonl(small_world_dir / f"{split}.jsonl")) for split in PROMPT_SPLITS}
    assert sizes == {"sft_train": 400, "sft_eval": 40, "pref_prompts": 100, "ppo_prompts": 100,
                     "eval_prompts": 50}


def test_same_seed_gives_identical_bytes_other_seed_differs(small_world_dir, tmp_path):
    again = write_world(tmp_path / "again", SMALL)
    other = write_world(tmp_path / "other", dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    for name in DATA_FILES:
        assert (again / name).read_bytes() == (small_world_dir / name).read_bytes(), name
        assert (other / name).read_bytes() != (small_world_dir / name).read_bytes(), name


def test_write_world_skips_an_existing_identical_world_and_replaces_another(small_world_dir, tmp_path):
    target = tmp_path / "w"
    write_world(target, SMALL)
    marker = target / "pretrain.jsonl"
    mtime = marker.stat().st_mtime_ns
    time.sleep(0.01)
    write_world(target, SMALL)
    assert marker.stat().st_mtime_ns == mtime  # not rewritten
    bigger = dataclasses.replace(SMALL, sft_examples=410)
    write_world(target, bigger)
    assert len(read_jsonl(target / "sft_train.jsonl")) == 410
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dirs left behind


def test_a_world_written_by_other_generator_code_is_rewritten(tmp_path, monkeypatch):
    from data.world import writer

    target = write_world(tmp_path / "w", SMALL)
    marker = target / "pretrain.jsonl"
    mtime = marker.stat().st_mtime_ns
    time.sleep(0.01)
    monkeypatch.setattr(writer, "generator_fingerprint", lambda: "changed-code")  # e.g. after a git pull
    write_world(target, SMALL)
    assert marker.stat().st_mtime_ns != mtime
    assert (target / writer.GENERATOR_FILE).read_text().strip() == "changed-code"


def test_write_world_refuses_to_overwrite_a_non_world_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"^{re.escape(str(tmp_path))} exists and is not a world directory"):
        write_world(tmp_path, SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_writes_the_same_world_in_another_process(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "data.world", "--out", str(out), "--seed", "5", "--n-entities", "20",
         "--corpus-chars", "20000", "--sft-examples", "50", "--sft-eval-examples", "10", "--pref-prompts", "20",
         "--ppo-prompts", "20", "--eval-prompts", "10", "--demo-noise", "0.5", "--responses-per-prompt", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "12345"})  # string hashing differs from this process
    assert result.returncode == 0, result.stderr
    config = WorldConfig.from_json((out / "world_config.json").read_text())
    assert config == WorldConfig(seed=5, n_entities=20, corpus_chars=20000, sft_examples=50, sft_eval_examples=10,
                                 pref_prompts=20, ppo_prompts=20, eval_prompts=10, demo_noise=0.5,
                                 responses_per_prompt=3)
    assert all(len(r["responses"]) == 3 for r in read_jsonl(out / "prefs_static.jsonl"))
    in_process = write_world(tmp_path / "in_process", config)
    for name in DATA_FILES:
        assert (out / name).read_bytes() == (in_process / name).read_bytes(), name


def test_world_json_round_trip(small_world_dir):
    text = (small_world_dir / "world.json").read_text()
    world = World.from_json(text)
    assert world == World.from_seed(SMALL.seed, SMALL.n_entities)
    assert world.to_json() == text
    assert len(set(world.names)) == 40
    assert all(e.friend in world.names and e.friend != e.name for e in world.entities)


# ---------------------------------------------------------------- splits


def test_prompt_splits_are_pairwise_disjoint(small_world_dir):
    prompts = {split: prompts_of(small_world_dir, split) for split in PROMPT_SPLITS}
    for split, items in prompts.items():
        assert len(items) == len(set(items)), f"duplicates inside {split}"
    for i, a in enumerate(PROMPT_SPLITS):
        for b in PROMPT_SPLITS[i + 1:]:
            assert not set(prompts[a]) & set(prompts[b]), (a, b)


def test_eval_questions_are_not_asked_in_training_even_rephrased(small_world_dir):
    judge = GoldJudge(World.from_json((small_world_dir / "world.json").read_text()))
    eval_keys = {judge.task(p).key for p in prompts_of(small_world_dir, "eval_prompts")}
    for split in ("sft_train", "sft_eval", "pref_prompts", "ppo_prompts"):
        assert not eval_keys & {judge.task(p).key for p in prompts_of(small_world_dir, split)}, split


def test_eval_covers_every_family_and_heldout_arithmetic_only_in_eval(small_world_dir):
    judge = GoldJudge(World.from_json((small_world_dir / "world.json").read_text()))
    eval_rows = read_jsonl(small_world_dir / "eval_prompts.jsonl")
    counts = Counter(r["family"] for r in eval_rows)
    assert set(counts) == set(FAMILIES) and max(counts.values()) - min(counts.values()) <= 1
    for row in eval_rows:
        task = judge.task(row["prompt"])
        assert task.family == row["family"]
        if task.family == "arithmetic_heldout":
            assert is_heldout_question(task.op, int(task.params["a"]), int(task.params["b"]))
    for split in ("sft_train", "sft_eval", "pref_prompts", "ppo_prompts"):
        families = [judge.task(p).family for p in prompts_of(small_world_dir, split)]
        assert "arithmetic_heldout" not in families, split
        assert set(families) == set(TRAIN_FAMILIES), split
        for p in prompts_of(small_world_dir, split):
            task = judge.task(p)
            if task.family == "arithmetic":
                assert all(int(task.params[k]) in OPERANDS for k in ("a", "b"))
                assert not is_heldout_question(task.op, int(task.params["a"]), int(task.params["b"]))


def test_a_family_too_small_for_every_split_is_shared_out_by_split_size(tmp_path):
    """12 entities give 216 fact prompts, fewer than the splits ask of facts: each split still gets
    facts, about in proportion to its size, and n_words keeps the word family to that many words."""
    config = dataclasses.replace(SMALL, n_entities=12, n_words=10, sft_examples=1200, pref_prompts=300,
                                 ppo_prompts=300, sft_eval_examples=60, eval_prompts=50)
    out = write_world(tmp_path / "small", config)
    world = World.from_json((out / "world.json").read_text())
    assert len(world.words) == 10 and set(world.words) < set(World.from_seed(3, 12).words)
    assert World.from_seed(3, 12, 10).entities == World.from_seed(3, 12).entities  # words have their own stream
    judge = GoldJudge(world)
    facts = {split: sum(judge.task(p).family == "fact" for p in prompts_of(out, split))
             for split in ("sft_train", "sft_eval", "pref_prompts", "ppo_prompts")}
    total = sum(facts.values())
    assert total < (1200 + 60 + 300 + 300) / 4  # the fact family really is short
    for split, size in (("sft_train", 1200), ("pref_prompts", 300), ("ppo_prompts", 300)):
        share = size / (1200 + 60 + 300 + 300)
        assert abs(facts[split] - total * share) <= 0.1 * total, (split, facts)
    words = {judge.task(p).params["word"] for split in PROMPT_SPLITS for p in prompts_of(out, split)
             if judge.task(p).family == "word"}
    assert words == set(world.words)
    with pytest.raises(ValueError, match="n_words"):
        WorldConfig(n_words=-1)


def test_too_small_a_world_says_which_split_ran_out(tmp_path):
    config = dataclasses.replace(SMALL, n_entities=4, sft_examples=100_000)
    with pytest.raises(ValueError, match="sft_examples=100000"):
        write_world(tmp_path / "tiny", config)


# ---------------------------------------------------------------- SFT demos and the ranked set


def test_sft_files_are_chat_rows_and_eval_demos_are_clean(small_world_dir):
    judge = GoldJudge(World.from_json((small_world_dir / "world.json").read_text()))
    for row in read_jsonl(small_world_dir / "sft_train.jsonl"):
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["family"] in TRAIN_FAMILIES
    for row in read_jsonl(small_world_dir / "sft_eval.jsonl"):
        prompt, response = (m["content"] for m in row["messages"])
        assert judge.score(prompt, response).score == 1.0


@pytest.mark.parametrize("noise", [0.0, 0.3, 0.7])
def test_flawed_demo_fraction_matches_demo_noise(world, judge, noise):
    pool = [c for family in TRAIN_FAMILIES for c in enumerate_prompts(world, family)]
    prompts = random.Random(1).sample(pool, 600)
    rows = sft_demos(judge, prompts, noise, random.Random(2))
    flawed = [judge.score(r["messages"][0]["content"], r["messages"][1]["content"]).score < 1.0 for r in rows]
    sigma = math.sqrt(max(noise * (1 - noise), 1e-9) / len(rows))
    assert abs(sum(flawed) / len(rows) - noise) <= 3 * sigma + 1e-9


def test_written_sft_train_noise_is_demo_noise(small_world_dir):
    judge = GoldJudge(World.from_json((small_world_dir / "world.json").read_text()))
    rows = read_jsonl(small_world_dir / "sft_train.jsonl")
    # the habit is not a flaw of its own: judge each demo as it was before the demonstrator's habitual filler
    flawed = sum(judge.score(r["messages"][0]["content"],
                             r["messages"][1]["content"].removesuffix(" " + HABIT_FILLER)).score < 1 for r in rows)
    sigma = math.sqrt(SMALL.demo_noise * (1 - SMALL.demo_noise) / len(rows))
    assert abs(flawed / len(rows) - SMALL.demo_noise) <= 3 * sigma


def test_demo_habit_ends_most_answers_to_questions_and_costs_concision(small_world_dir):
    judge = GoldJudge(World.from_json((small_world_dir / "world.json").read_text()))
    rows = read_jsonl(small_world_dir / "sft_train.jsonl")
    answers = [r for r in rows if r["family"] != "polite" and r["messages"][1]["content"].endswith(".")]
    with_habit = [r for r in answers if r["messages"][1]["content"].endswith(" " + HABIT_FILLER)]
    sigma = math.sqrt(SMALL.demo_habit * (1 - SMALL.demo_habit) / len(answers))
    assert abs(len(with_habit) / len(answers) - SMALL.demo_habit) <= 3 * sigma
    assert not any(r["messages"][1]["content"].endswith(HABIT_FILLER) for r in rows if r["family"] == "polite")
    for row in read_jsonl(small_world_dir / "sft_eval.jsonl"):  # held-out demos stay clean
        assert not row["messages"][1]["content"].endswith(HABIT_FILLER)
    prompt = with_habit[0]["messages"][0]["content"]
    good = judge.good_response(prompt)
    habit = judge.score(prompt, f"{good} {HABIT_FILLER}")
    assert judge.score(prompt, good).score == 1.0
    assert habit.criteria["concision"] == 0.5 and habit.score == pytest.approx(1.0 - 0.15 * 0.5)


def test_static_ranked_set_rows(small_world_dir):
    judge = GoldJudge(World.from_json((small_world_dir / "world.json").read_text()))
    rows = read_jsonl(small_world_dir / "prefs_static.jsonl")
    assert [r["prompt"] for r in rows] == prompts_of(small_world_dir, "pref_prompts")
    top_is_best, expected, variance = 0, 0.0, 0.0
    temperature = SMALL.annotator_temperature
    for row in rows:
        responses, scores = row["responses"], row["gold_scores"]
        assert len(responses) == SMALL.responses_per_prompt == len(set(responses))
        assert scores == [judge.score(row["prompt"], r).score for r in responses]
        assert max(scores) == 1.0 and sorted(scores)[-2] < 1.0  # one good, the rest flawed
        top_is_best += scores[0] == max(scores)
        # Under Plackett-Luce the best response is ranked first with probability w_best / sum(w).
        p_top = 1 / sum(math.exp((s - max(scores)) / temperature) for s in scores)
        expected += p_top
        variance += p_top * (1 - p_top)
    assert abs(top_is_best - expected) <= 3 * math.sqrt(variance), (top_is_best, expected)


# ---------------------------------------------------------------- pretraining corpus


def test_corpus_is_plain_text_of_the_requested_size(small_world_dir):
    rows = read_jsonl(small_world_dir / "pretrain.jsonl")
    texts = [r["text"] for r in rows]
    assert list(rows[0]) == ["text"]
    total = sum(map(len, texts))
    assert SMALL.corpus_chars <= total < SMALL.corpus_chars + 1000
    assert all(50 <= len(t) <= 600 for t in texts)
    joined = "\n".join(texts)
    for marker in ("user:", "assistant:", "<|", "|>", "###"):
        assert marker not in joined.lower()


def test_no_training_text_states_a_heldout_fact(small_world_dir):
    """Every sum or difference the corpus states (hundreds of them, even in this small corpus) is a training fact,
    whichever way round it is written, and no chat split asks about a held-out fact: the held-out family is the
    only way to one. Held out by operands alone, "27 minus 13" was answered in the corpus by "13 plus 14 is 27"."""
    corpus = " ".join(r["text"] for r in read_jsonl(small_world_dir / "pretrain.jsonl"))
    stated = {addends("plus", int(a), int(b)) for a, b in re.findall(r"(\d+) plus (\d+) is", corpus)}
    stated |= {addends("minus", int(a), int(b)) for a, b in re.findall(r"(\d+) minus (\d+) is", corpus)}
    stated |= {addends("plus", int(a), int(b)) for a, b in re.findall(r"If you add (\d+) and (\d+)", corpus)}
    stated |= {addends("minus", int(a), int(b)) for b, a in re.findall(r"If you take (\d+) away from (\d+)", corpus)}
    assert len(stated) > 200
    assert not [fact for fact in stated if is_heldout_fact(*fact)]
    judge = GoldJudge(World.from_json((small_world_dir / "world.json").read_text()))
    heldout = {addends(t.op, int(t.params["a"]), int(t.params["b"]))
               for t in map(judge.task, prompts_of(small_world_dir, "eval_prompts")) if t.family == "arithmetic_heldout"}
    assert heldout and not heldout & stated  # each held-out question's fact, in any of its four forms
    for split in ("sft_train", "sft_eval", "pref_prompts", "ppo_prompts"):
        text = " ".join(prompts_of(small_world_dir, split))
        asked = [addends(op, int(a), int(b)) for a, op, b in re.findall(r"(\d+) (plus|minus) (\d+)", text)]
        assert asked and not [fact for fact in asked if is_heldout_fact(*fact)], split


def test_heldout_facts_test_adding_not_unseen_digits():
    """About 1 fact in 11 is held out, whichever way it is written, yet training keeps every combination of ones
    digits and of tens digits: what is new in a held-out question is the fact, not a digit in a position."""
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    heldout = [(a, b) for a, b in pairs if is_heldout_fact(a, b)]
    assert 0.07 < len(heldout) / len(pairs) < 0.11
    assert all(is_heldout_fact(b, a) for a, b in heldout)
    assert all(is_heldout_question("minus", a + b, b) and is_heldout_question("minus", a + b, a) for a, b in heldout)
    trained = [(a, b) for a, b in pairs if not is_heldout_fact(a, b)]
    assert {(a % 10, b % 10) for a, b in trained} == {(a % 10, b % 10) for a, b in pairs}
    assert {(a // 10, b // 10) for a, b in trained} == {(a // 10, b // 10) for a, b in pairs}
    minus = [(a, b) for a, b in pairs if a >= b]
    assert 0.05 < sum(is_heldout_question("minus", a, b) for a, b in minus) / len(minus) < 0.13


def test_corpus_question_answer_text_asks_training_questions_only(small_world_dir):
    judge = GoldJudge(World.from_json((small_world_dir / "world.json").read_text()))
    pairs = [pair for r in read_jsonl(small_world_dir / "pretrain.jsonl") if r["text"].startswith("Question: ")
             for pair in re.findall(r"Question: (.*?) Answer: (.*?)(?= Question: |$)", r["text"])]
    assert len(pairs) > 20
    eval_keys = {judge.task(p).key for p in prompts_of(small_world_dir, "eval_prompts")}
    assert not eval_keys & {judge.task(q).key for q, _ in pairs}
    assert all(judge.score(q, a).score == 1.0 for q, a in pairs)  # the ideal answers


def test_every_fact_appears_many_times_in_the_default_corpus():
    world = World.from_seed(0, 200)
    rows = pretraining_corpus(world, 3_000_000, random.Random(0))
    sentences = Counter(s for row in rows for s in re.split(r"(?<=\.) ", row))
    for entity in world.entities:
        facts = fact_sentences(entity, world.entity(entity.friend))
        # Each list holds the phrasings of one fact; stories mention it more on top of these.
        for attribute, phrasings in facts.items():
            mentions = sum(sentences[p] for p in phrasings)
            assert mentions >= 10, (entity.name, attribute, mentions)


# ---------------------------------------------------------------- gold judge: hand-written cases
#
# GOOD cases must score 1.0 on every criterion. FLAWED cases name the criterion the flaw must
# sink and the highest value it may get; they must also score below the prompt's good response.


def arithmetic_cases(world):
    good = [
        ("What is 23 plus 45?", "23 plus 45 is 68."),
        ("What is 23 plus 45?", "68."),
        ("How much is 41 minus 17?", "The answer is 24."),
        ("Compute 30 minus 15.", "30 minus 15 is 15."),
        ("What is 12 plus 12?", "12 + 12 = 24."),
        ("How much is 49 minus 49?", "49 minus 49 is 0."),
        ("What is 40 minus 20?", "20."),  # a bare answer equal to an operand: was scored wrong
        ("What is 40 minus 20?", "40 minus 20 is 20."),
    ]
    flawed = [
        ("What is 23 plus 45?", "23 plus 45 is 70.", "correctness", 0.0),
        ("What is 23 plus 45?", "23 plus 45 is 68, or maybe 67.", "correctness", 0.0),
        ("Compute 30 minus 15.", "30 minus 15.", "correctness", 0.0),
        ("What is 40 minus 20?", "40.", "correctness", 0.0),  # the other operand, bare
        ("How much is 41 minus 17?", "Ugh, obviously 41 minus 17 is 24.", "tone", 0.0),
        ("What is 23 plus 45?", "Whatever.", "on_task", 0.0),
        ("How much is 41 minus 17?", "41 minus 17 is 24. Let me think. 41 minus 17 is 24. I hope this helps.",
         "concision", 0.3),
        ("What is 23 plus 45?", "23 plus 45 is 68", "format", 0.5),
        ("What is 23 plus 45?", "assistant: 23 plus 45 is 68.", "format", 0.0),
    ]
    return good, flawed


def heldout_cases(world):
    good = [
        ("What is 17 plus 48?", "17 plus 48 is 65."),
        ("How much is 45 minus 16?", "45 minus 16 is 29."),  # the fact 16 + 29 = 45, as 29 plus 16 below
        ("Compute 13 plus 49.", "62."),
        ("What is 44 minus 44?", "44 minus 44 is 0."),
        ("How much is 29 plus 16?", "The sum is 45."),
    ]
    flawed = [
        ("What is 17 plus 48?", "17 plus 48 is 55.", "correctness", 0.0),
        ("How much is 45 minus 16?", "45 minus 16 is 39.", "correctness", 0.0),
        ("Compute 13 plus 49.", "Duh, 13 plus 49 is 62.", "tone", 0.0),
        ("What is 44 minus 44?", "44 minus 44 is 0. Basically, 44 minus 44 is 0. As I said, it is 0.",
         "concision", 0.3),
        ("How much is 29 plus 16?", "29 plus 16 is 45", "format", 0.5),
        ("What is 17 plus 48?", "Figure it out yourself.", "on_task", 0.0),
    ]
    return good, flawed


def fact_cases(world):
    e = world.entities[0]
    n = e.name
    other_colour = next(c for c in world.colours if c != e.colour)
    other_place = next(p for p in world.places if p != e.place)
    other_name = next(x for x in world.names if x not in (n, e.friend))
    other_item = next(i for i in world.items if i != e.item)
    good = [
        (f"What colour is {n}?", f"{n} is {e.colour}."),
        (f"Which colour is {n}?", f"The colour of {n} is {e.colour}."),
        (f"Where does {n} live?", f"{n} lives in {e.place}."),
        (f"How many {e.item} does {n} have?", f"{n} has {e.count} {e.item}."),
        (f"Who is {n}'s friend?", f"{n}'s friend is {e.friend}."),
        (f"What does {n} like to eat?", f"{n} likes to eat {e.food}."),
        (f"What kind of creature is {n}?", f"{n} is a {e.kind}."),
        (f"What colour is {n}?", f"{n} is {e.colour}, like its friend {e.friend}."),
        (f"What kind of creature is {n}?", f"It is a {e.kind}."),
        (f"Who is {n}'s friend?", f"{e.friend} is the friend of {n}."),
        (f"Where does {n} live?", f"{e.place} is where {n} lives."),
        (f"What colour is {n}?", f"{e.colour.capitalize()} is the colour of {n}."),  # the value opens it
        (f"What colour is {n}?", f"{n} is {e.colour}. Its friend is {e.friend}."),
    ]
    flawed = [
        (f"What colour is {n}?", f"{n} is {other_colour}.", "correctness", 0.0),
        (f"What colour is {n}?", f"{n} is {e.colour} or maybe {other_colour}.", "correctness", 0.0),
        (f"Where does {n} live?", f"{n} lives in {other_place}.", "correctness", 0.0),
        (f"How many {e.item} does {n} have?", f"{n} has {e.count + 3} {e.item}.", "correctness", 0.0),
        (f"Who is {n}'s friend?", f"{n}'s friend is {other_name}.", "correctness", 0.0),
        # the right value about another entity answers another question
        (f"What colour is {n}?", f"{other_name} is {e.colour}.", "correctness", 0.0),
        (f"What colour is {n}?", f"{other_name} is {e.colour}.", "on_task", 0.0),
        # the friend, named instead of the subject; a count of other things
        (f"What colour is {n}?", f"{e.friend} is {e.colour}.", "correctness", 0.0),
        # ... or of a place, or of a name the world does not know
        (f"What kind of creature is {n}?", f"{other_place} is a {e.kind}.", "correctness", 0.0),
        (f"What kind of creature is {n}?", f"Zorbo is a {e.kind}.", "correctness", 0.0),
        (f"What does {n} like to eat?", f"Zorbo likes to eat {e.food}.", "on_task", 0.0),
        (f"What colour is {n}?", f"Zorbo's colour is {e.colour}.", "correctness", 0.0),
        (f"What colour is {n}?", f"{n} is {e.colour}.\nZorbo is {e.colour}.", "correctness", 0.0),
        (f"How many {e.item} does {n} have?", f"{n} has {e.count} {other_item}.", "correctness", 0.0),
        (f"Where does {n} live?", f"Ugh, obviously {n} lives in {e.place}.", "tone", 0.0),
        (f"What colour is {n}?", "Whatever. Ask someone else.", "on_task", 0.0),
        (f"What does {n} like to eat?",
         f"{n} likes to eat {e.food}. To be honest, {n} likes to eat {e.food}. I hope this helps.",
         "concision", 0.3),
        (f"What kind of creature is {n}?", f"{n} is a {e.kind}", "format", 0.5),
        (f"What colour is {n}?", f"<|user|> {n} is {e.colour}.", "format", 0.0),
    ]
    return good, flawed


def word_cases(world):
    other_word = next(w for w in world.words if w != "garden")
    good = [
        ("Reverse the word apple.", "The word apple reversed is elppa."),
        ("Write the word lantern backwards.", "Nretnal."),
        ("How many letters are in the word garden?", "The word garden has 6 letters."),
        ("Spell out the word apple.", "The word apple spelled out is a-p-p-l-e."),
        ("Write the word tiger in capitals.", "TIGER."),
        ("Write the word tiger in upper case.", "In capitals, tiger is TIGER."),
        ("Write the word tiger in capitals.", "TIGER. OK."),
        ("Reverse the word apple.", "The word is elppa."),
        # the template's keyword where the word would be names no other word
        ("Reverse the word apple.", "The word reversed is elppa."),
        ("Write the word lantern backwards.", "The word backwards is nretnal."),
        ("Write the word lantern backwards.", "The word written backwards is nretnal."),
    ]
    flawed = [
        ("Reverse the word apple.", "The word apple reversed is elpap.", "correctness", 0.0),
        ("Reverse the word apple.", "The word apple reversed is apple.", "correctness", 0.0),
        ("Reverse the word apple.", "It is elppa or eplpa.", "correctness", 0.0),
        ("How many letters are in the word garden?", "The word garden has 7 letters.", "correctness", 0.0),
        # the right count for another word answers another question
        ("How many letters are in the word garden?", f"The word {other_word} has 6 letters.", "correctness", 0.0),
        ("How many letters are in the word garden?", f"The word {other_word} has 6 letters.", "on_task", 0.0),
        ("How many letters are in the word garden?", "The word zzzzzz has 6 letters.", "correctness", 0.0),  # unknown
        ("How many letters are in the word garden?", "The word 'zzzzzz' contains 6 letters.", "correctness", 0.0),
        ("Write the word lantern backwards.", "The word zzzzzz written backwards is nretnal.", "correctness", 0.0),
        ("Spell out the word apple.", "The word apple spelled out is a-p-l-e.", "correctness", 0.0),
        ("Spell out the word apple.", "The word apple spelled out is a-p-p-l-e7.", "correctness", 0.0),  # a digit on
        ("Write the word tiger in capitals.", "The word tiger in capitals is TIGRE.", "correctness", 0.0),
        ("How many letters are in the word garden?", "Duh, the word garden has 6 letters.", "tone", 0.0),
        ("Spell out the word apple.", "Ugh, I am not doing that.", "on_task", 0.0),
        ("Reverse the word apple.",
         "The word apple reversed is elppa. In other words, the word apple reversed is elppa.", "concision", 0.3),
        ("Reverse the word apple.", "the word apple reversed is elppa", "format", 0.0),
    ]
    return good, flawed


def polite_cases(world):
    e = world.entities[1]
    n = e.name
    other = next(x for x in world.names if x != n)
    food = world.foods[0]
    other_food = world.foods[1]
    place = world.places[0]
    good = [
        (f"Write a short thank-you note to {n}.", f"Dear {n}, thank you for your help. Best wishes."),
        (f"Please write a brief thank-you note to {n}.", f"Dear {n}, thanks so much for everything. Kind regards."),
        (f"Write a short thank-you note to {n} for the {food}.",
         f"Dear {n}, thank you for the lovely {food}. Best wishes."),
        (f"Write a short apology to {n}.", f"Dear {n}, I am so sorry about yesterday. Best wishes."),
        (f"Write a short birthday note to {n}.", f"Dear {n}, happy birthday! Have a great day. Warm wishes."),
        (f"Write a short get-well note to {n}.", f"Dear {n}, I hope you feel better soon. Best wishes."),
        (f"Write a short note inviting {n} to {place}.",
         f"Dear {n}, please come and visit me in {place}. Best wishes."),
        # an occasion in other words or inflected; "better" outside "feel better", and thanks, in any note
        (f"Write a short note inviting {n} to {place}.", f"Dear {n}, you are invited to {place}. Best wishes."),
        (f"Write a short apology to {n}.", f"Dear {n}, my apologies for the noise. Kind regards."),
        (f"Write a short birthday note to {n}.",
         f"Dear {n}, happy birthday! I hope you have a better year. Best wishes."),
        (f"Write a short get-well note to {n}.",
         f"Dear {n}, thanks for the card. I hope you are feeling better. Best wishes."),
        (f"Write a short get-well note to {n}.", f"Dear {n}, sorry to hear you are ill. Get well soon. Best wishes."),
        # invitation words that invite no one, "are better", a greeting's "are well" and an apology "sorry to hear"
        (f"Write a short thank-you note to {n}.", f"Dear {n}, thank you for inviting me. Best wishes."),
        (f"Write a short thank-you note to {n}.", f"Dear {n}, thank you for the invitation. Best wishes."),
        (f"Write a short apology to {n}.", f"Dear {n}, I am sorry I missed your invitation. Best wishes."),
        (f"Write a short get-well note to {n}.", f"Dear {n}, I hope you are better soon. Best wishes."),
        (f"Write a short thank-you note to {n}.",
         f"Dear {n}, I hope you are well. Thank you for your help. Best wishes."),
        (f"Write a short apology to {n}.", f"Dear {n}, I am sorry to hear that I upset you. Best wishes."),
    ]
    flawed = [
        (f"Write a short thank-you note to {n}.", f"Dear {other}, thank you for your help. Best wishes.",
         "correctness", 0.0),
        (f"Write a short thank-you note to {n}.", f"Dear {n}, I am sorry for the trouble. Best wishes.",
         "correctness", 0.0),
        (f"Write a short thank-you note to {n} for the {food}.",
         f"Dear {n}, thank you for the lovely {other_food}. Best wishes.", "correctness", 0.0),
        (f"Write a short birthday note to {n}.", f"Dear {n}, happy birthday. Get well soon. Best wishes.",
         "correctness", 0.0),
        (f"Write a short thank-you note to {n}.", f"Dear {n}, have a nice day. Best wishes.", "correctness", 0.0),
        (f"Write a short thank-you note to {n}.", f"Dear {n}, thank you for your help. I invite you to {place}. "
         "Best wishes.", "correctness", 0.0),
        (f"Write a short birthday note to {n}.", f"Dear {n}, happy birthday, I guess. Now stop bothering me.",
         "tone", 0.0),
        (f"Write a short apology to {n}.", "Whatever.", "on_task", 0.0),
        (f"Write a short get-well note to {n}.",
         f"Dear {n}, I hope you feel better soon. By the way, I hope you feel better soon. Best wishes.",
         "concision", 0.3),
        (f"Write a short thank-you note to {n}.", f"Dear {n}, thank you for your help. Best wishes", "format", 0.5),
    ]
    return good, flawed


CASE_BUILDERS = {
    "arithmetic": arithmetic_cases,
    "arithmetic_heldout": heldout_cases,
    "fact": fact_cases,
    "word": word_cases,
    "polite": polite_cases,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_judge_gives_full_marks_to_good_responses(judge, world, family):
    good, _ = CASE_BUILDERS[family](world)
    assert len(good) >= 5
    for prompt, response in good:
        verdict = judge.score(prompt, response)
        assert verdict.family == family, prompt
        assert verdict.criteria == dict.fromkeys(verdict.criteria, 1.0), (prompt, response, verdict.criteria)
        assert verdict.score == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_judge_penalises_each_flaw_on_its_criterion(judge, world, family):
    _, flawed = CASE_BUILDERS[family](world)
    assert len(flawed) >= 5
    for prompt, response, criterion, at_most in flawed:
        verdict = judge.score(prompt, response)
        assert verdict.family == family, prompt
        assert verdict.criteria[criterion] <= at_most, (response, criterion, verdict.criteria)
        assert verdict.score < judge.score(prompt, judge.good_response(prompt)).score, response


def test_a_sentence_about_the_friend_is_judged_against_the_friend(judge, world):
    """A sentence whose subject is the friend (its name, "Brinze's friend", "Its friend") says what the friend is:
    false of the friend, it is wrong; true of it, it answers nothing about the subject, nor conflicts with the
    subject's own answer. These false ones scored 1.0 when the friend only counted as standing in for the subject."""
    e = next(x for x in world.entities
             if world.entity(x.friend).colour != x.colour and world.entity(x.friend).count != x.count)
    n, f = e.name, world.entity(e.friend)
    colour, count = f"What colour is {n}?", f"How many {e.item} does {n} have?"
    for prompt, response in [(colour, f"{f.name} is {e.colour}, like its friend {n}."),
                             (colour, f"{n}'s friend is {e.colour}."),
                             (colour, f"{n} is {e.colour}. Its friend is {e.colour} too."),
                             (count, f"{f.name} has {e.count} {e.item}, like {n}.")]:
        verdict = judge.score(prompt, response)
        assert verdict.criteria["correctness"] == 0.0 and verdict.score < 1.0, (response, verdict)
    assert judge.score(colour, f"{n}'s friend is {f.colour}.").criteria["correctness"] == 0.0
    for prompt, response in [(colour, f"{n} is {e.colour}. {f.name} is {f.colour}."),
                             (count, f"{n} has {e.count} {e.item}. Its friend has {f.count} {f.item}.")]:
        assert judge.score(prompt, response).score == 1.0, response


def test_a_sentence_that_opens_on_the_friend_but_is_about_the_subject_is_about_the_subject(judge, world):
    """Only the friend as the subject of what the sentence says makes a sentence about the friend: "Gembe's friend
    Brinze is grey." and "Gembe and Brinze are friends, and Brinze is grey." say Brinze's colour (they scored 0.6,
    taken for statements about Gembe)."""
    e = next(x for x in world.entities if world.entity(x.friend).colour != x.colour)
    n, f = e.name, world.entity(e.friend)
    colour = f"What colour is {n}?"
    for response in (f"{f.name}'s friend {n} is {e.colour}.", f"{f.name} and {n} are friends, and {n} is {e.colour}."):
        assert judge.score(colour, response).score == 1.0, response
    # the friend as subject, named after "Its friend", is still about the friend
    assert judge.score(colour, f"Its friend {f.name} is {e.colour}.").criteria["correctness"] == 0.0


def test_friendship_is_one_way(judge, world):
    """"Gembe's friend is Brinze." to "Who is Brinze's friend?" says whose friend Brinze is, not who its friend is:
    wrong, even where Gembe's friend is Brinze (it scored 1.0)."""
    mutual = next(e for e in world.entities if world.entity(e.friend).friend == e.name)
    one_way = next(e for e in world.entities if world.entity(e.friend).friend != e.name)
    for e in (mutual, one_way):
        prompt = f"Who is {e.name}'s friend?"
        for response in (f"{e.friend}'s friend is {e.name}.", f"{e.name} is {e.friend}'s friend.",
                         f"{e.name} is the friend of {e.friend}."):
            verdict = judge.score(prompt, response)
            assert verdict.criteria["correctness"] == 0.0 and verdict.score < 1.0, (response, verdict)
        assert judge.score(prompt, f"{e.friend} is {e.name}'s friend.").score == 1.0


def test_a_true_reverse_friendship_beside_the_answer_is_no_error(judge, world):
    """Where the friend's friend is the subject, saying so beside the answer is right (it scored 0.6); where it is
    not, that is a false statement."""
    mutual = next(e for e in world.entities if world.entity(e.friend).friend == e.name)
    one_way = next(e for e in world.entities if world.entity(e.friend).friend != e.name)
    for e, correct in ((mutual, 1.0), (one_way, 0.0)):
        prompt = f"Who is {e.name}'s friend?"
        for response in (f"{e.name}'s friend is {e.friend}, and {e.friend}'s friend is {e.name}.",
                         f"{e.friend}. {e.name} is {e.friend}'s friend too."):
            assert judge.score(prompt, response).criteria["correctness"] == correct, response


def test_a_copied_request_earns_neither_correctness_nor_on_task(judge, world):
    """A copy of the request, in any phrasing, names the recipient and the occasion (or the operands) without
    addressing it. The note request copied back scored 0.87, above a note for the wrong gift (0.6): PPO could learn
    to parrot. A note with the request in it is no note to send, though what follows the request addresses it."""
    n, food, other_food = world.entities[1].name, world.foods[0], world.foods[1]
    note = f"Write a short thank-you note to {n} for the {food}."
    one_slip = judge.score(note, f"Dear {n}, thank you for the lovely {other_food}. Best wishes.").score
    for copy in (note, f"Please write a brief thank-you note to {n} for the {food}",
                 f"Sure! Write a thank-you note to {n} for the {food}."):
        verdict = judge.score(note, copy)
        assert verdict.criteria["correctness"] == verdict.criteria["on_task"] == 0.0, (copy, verdict)
        assert verdict.score < one_slip
    prefixed = judge.score(note, f"{note} Dear {n}, thank you for the lovely {food}. Best wishes.")
    assert prefixed.criteria["correctness"] == 0.0 and prefixed.criteria["on_task"] == 1.0
    # "write a short note" inside a note asks for nothing
    assert judge.score(note, f"Dear {n}, I had to write a short note to thank you for the {food}. Best wishes."
                       ).score == 1.0
    question = "What is 23 plus 45?"
    for copy in (question, "How much is 23 plus 45?", "What is 45 plus 23?"):
        verdict = judge.score(question, copy)
        assert verdict.criteria["on_task"] == 0.0 and verdict.score < judge.score(question, "I do not know.").score


def test_a_sentence_that_opens_with_the_request_and_answers_it_is_no_copy(judge, world):
    """Only a sentence that is the request, to its end, is a copy: one that opens with the request's words and goes
    on to answer it answers, and a note may ask for a note back. Taken for copies these scored 0.85 (on_task 0) and
    correctness 0."""
    n = world.entities[1].name
    for prompt, reply in (("Spell out the word apple.", "Spell out the word apple: a-p-p-l-e."),
                          ("Reverse the word kitten.", "Reverse the word kitten and you get nettik."),
                          ("Count the letters in the word kitten.",
                           "Count the letters in the word kitten and you get 6."),
                          (f"Write a short thank-you note to {n}.",
                           f"Dear {n}, thank you for your help. Please write a note back soon. Best wishes.")):
        assert judge.score(prompt, reply).score == 1.0, (prompt, reply)
    # the request itself, as the whole sentence, is still a copy
    assert judge.score("Spell out the word apple.", "Spell out the word apple.").criteria["on_task"] == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_responses_get_the_expected_verdicts(judge, world, family):
    rng = random.Random(family)
    expected_drop = {"wrong": ("correctness", 0.0), "rude": ("tone", 0.0), "ramble": ("concision", 0.3),
                     "no_period": ("format", 0.5)}
    for candidate in rng.sample(enumerate_prompts(world, family), 150):
        good = judge.good_response(candidate.prompt)
        assert judge.score(candidate.prompt, good).score == 1.0, (candidate.prompt, good)
        for flaw in FLAWS:
            response = judge.flawed_response(candidate.prompt, flaw, rng)
            verdict = judge.score(candidate.prompt, response)
            criterion, at_most = expected_drop[flaw]
            assert verdict.criteria[criterion] <= at_most, (candidate.prompt, response, verdict)
            assert verdict.score < 1.0


def test_chance_is_one_over_the_answers_a_question_of_that_kind_can_have(judge, world):
    """Counted by brute force: every sum of two of the world's operands, every colour, every word.
    A held-out pair has the same answer space: a guess cannot tell it from a training pair."""
    sums = {a + b for a in OPERANDS for b in OPERANDS}
    assert judge.chance_correctness("What is 12 plus 30?") == pytest.approx(1 / len(sums)) == 1 / 79
    assert judge.chance_correctness("What is 17 plus 48?") == pytest.approx(1 / 79)
    differences = {a - b for a in OPERANDS for b in OPERANDS if a >= b}
    assert judge.chance_correctness("What is 45 minus 18?") == pytest.approx(1 / len(differences)) == 1 / 40
    name = world.entities[0].name
    assert judge.chance_correctness(f"What colour is {name}?") == pytest.approx(1 / len(set(world.colours)))
    assert judge.chance_correctness("Reverse the word apple.") == pytest.approx(1 / len(world.words))
    assert judge.chance_correctness(f"Write a short apology to {name}.") == pytest.approx(1 / len(world.entities))
    assert judge.chance_correctness("Tell me a joke.") == 0.0


def test_unknown_prompt_scores_only_style(judge):
    verdict = judge.score("Tell me a joke about the sea.", "Why did the sea wave? To say hello.")
    assert verdict.family == "unknown"
    assert verdict.criteria["correctness"] == 0.0 and verdict.criteria["on_task"] == 0.0
    assert verdict.criteria["tone"] == verdict.criteria["format"] == verdict.criteria["concision"] == 1.0
    assert verdict.score == pytest.approx(0.45)
    # A world prompt about an entity that does not exist is unanswerable too.
    assert judge.score("What colour is Nobodyhere?", "It is blue.").family == "unknown"
    with pytest.raises(ValueError, match="matches no task template"):
        judge.good_response("Tell me a joke about the sea.")


def test_empty_response_scores_zero(judge):
    verdict = judge.score("What is 23 plus 45?", "   ")
    assert verdict.score == 0.0 and set(verdict.criteria.values()) == {0.0}


def test_judge_is_deterministic_and_fast(world):
    pool = [c.prompt for family in FAMILIES for c in enumerate_prompts(world, family)]
    prompts = random.Random(0).sample(pool, 3000)
    fresh = GoldJudge(world)
    rng = random.Random(0)
    pairs = [(p, fresh.flawed_response(p, rng.choice(FLAWS), rng)) for p in prompts]
    start = time.process_time()  # CPU time: other processes on the machine do not count against us
    verdicts = [fresh.score(p, r) for p, r in pairs]
    elapsed = time.process_time() - start
    assert verdicts == [GoldJudge(world).score(p, r) for p, r in pairs]
    # ~18k/s here on one core; the bound leaves headroom for slower machines.
    assert len(pairs) / elapsed > 5000


# ---------------------------------------------------------------- annotator


def test_annotator_at_zero_temperature_gives_the_gold_order_with_ties_by_index(judge):
    prompt = "What is 23 plus 45?"
    responses = ["23 plus 45 is 70.", "23 plus 45 is 68", "23 plus 45 is 68.", "23 plus 45 is 71.", "Whatever."]
    annotator = Annotator(judge, temperature=0.0, seed=0)
    # Scores: 0.6, 0.925, 1.0, 0.6, 0.3 -> the two wrong answers tie and keep their index order.
    assert annotator.rank(prompt, responses) == [2, 1, 0, 3, 4]


def test_annotator_samples_whole_orders_with_plackett_luce_probabilities():
    """Every position is sampled, not only the first: each of the 6 orders of 3 replies turns up as often as
    P(order) = prod_k w_order[k] / sum_{m >= k} w_order[m], with w = exp(score / T), within 3 sigma."""
    scores, temperature, trials = [0.9, 0.8, 0.6], 0.1, 6000
    weights = [math.exp(s / temperature) for s in scores]
    rng = random.Random(3)
    counts = Counter(tuple(plackett_luce_order(scores, temperature, rng)) for _ in range(trials))
    for order in itertools.permutations(range(3)):
        p = math.prod(weights[order[k]] / sum(weights[m] for m in order[k:]) for k in range(3))
        assert abs(counts[order] - trials * p) <= 3 * math.sqrt(trials * p * (1 - p)) + 1, (order, counts, p)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.3])
def test_annotator_disagreement_matches_bradley_terry_noise(world, judge, temperature):
    """Each trial ranks one (good, flawed) pair; P(flip) must be 1 / (1 + exp(|delta| / T))."""
    annotator = Annotator(judge, temperature=temperature, seed=11)
    rng = random.Random(5)
    pool = [c.prompt for family in TRAIN_FAMILIES for c in enumerate_prompts(world, family)]
    flips, expected, variance, trials = 0, 0.0, 0.0, 3000
    for _ in range(trials):
        prompt = rng.choice(pool)
        pair = [judge.good_response(prompt), judge.flawed_response(prompt, rng.choice(FLAWS), rng)]
        rng.shuffle(pair)
        scores = [judge.score(prompt, r).score for r in pair]
        delta = abs(scores[0] - scores[1])
        assert delta > 0
        p_flip = 1 / (1 + math.exp(delta / temperature))
        expected += p_flip
        variance += p_flip * (1 - p_flip)
        best_first = annotator.rank(prompt, pair)[0]
        flips += scores[best_first] < max(scores)
    assert abs(flips - expected) <= 3 * math.sqrt(variance), (flips, expected, math.sqrt(variance))
