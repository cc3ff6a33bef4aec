"""The reward-model stage on the micro recipe: collection, the K-way loss in training, padding, data errors,
the final checkpoint (plain HF, reward stats), training progress, resume and LoRA."""
from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import reset_accelerate
from data.loading import DataError
from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError
from data.world import FAMILIES
from pipeline.evaluation import load_judge
from pipeline.model import load_scalar_model
from pipeline.tokenizer import load_tokenizer
from reward_model import collect, train
from reward_model import metrics as rm_metrics
from reward_model.scoring import RewardScorer, conversation_text, encode_conversations, sequence_scores

MICRO_RM = Path(__file__).resolve().parent.parent / "configs" / "micro" / "rm.yaml"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def nls(d: float) -> float:
    """-log sigmoid(d)"""
    return math.log1p(math.exp(-d))


# ---- collection ------------------------------------------------------------------------------------------

def test_distinct_responses_drops_duplicates_and_empties():
    kept, duplicates, empty = collect.distinct_responses(["A.", "B.", "A.", " ", "C.", "B."])
    assert (kept, duplicates, empty) == (["A.", "B.", "C."], 2, 1)


def test_collected_prefs_are_ranked_distinct_responses_with_gold_scores(micro_prefs):
    train_rows, eval_rows = read_jsonl(micro_prefs / "train.jsonl"), read_jsonl(micro_prefs / "eval.jsonl")
    summary = next(m for m in read_jsonl(micro_prefs / "metrics.jsonl") if "prefs/skipped_prompts" in m)
    assert len(train_rows) + len(eval_rows) + summary["prefs/skipped_prompts"] == 40  # micro world's pref_prompts
    assert len(eval_rows) >= 4 and not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    judge = load_judge(micro_prefs.parent / "world")
    agree = disagree = 0
    for row in train_rows + eval_rows:
        responses = row["responses"]
        assert 2 <= len(responses) <= 4 and len(set(responses)) == len(responses)
        assert all(r.strip() for r in responses) and row["family"] in FAMILIES
        assert row["gold_scores"] == [judge.score(row["prompt"], r).score for r in responses]
        for a, b in itertools.combinations(row["gold_scores"], 2):
            agree, disagree = agree + (a > b), disagree + (a < b)
    # every sample is a ranked response or counted as dropped (duplicate, empty, cut at max_new_tokens); a prompt
    # skipped with one response left is the only loss uncounted
    kept = sum(len(r["responses"]) for r in train_rows + eval_rows)
    dropped = sum(summary[f"prefs/{k}_dropped"] for k in ("duplicates", "empty", "unfinished"))
    assert 40 * 4 - summary["prefs/skipped_prompts"] <= kept + dropped <= 40 * 4
    assert agree > disagree  # best first: the (noisy) annotator mostly agrees with gold


# ---- the loss and the scores -----------------------------------------------------------------------------

def test_kway_loss_in_training_equals_mean_of_pairwise_losses_by_hand(micro_rm):
    tokenizer = load_tokenizer(str(micro_rm))
    model = load_scalar_model(str(micro_rm), "test", tokenizer).eval()
    groups = [{"prompt": "What is 12 plus 30?",
               "responses": ["12 plus 30 is 42.", "It is 41.", "Ugh, obviously 42.", "42"]},
              {"prompt": "Reverse the word lamp.", "responses": ["The word lamp reversed is pmal.", "Whatever."]}]
    batch = train.collate(tokenizer, groups, max_length=96, chunk_size=4)  # two forward passes, length-sorted
    assert [len(c["input_ids"]) for c in batch["chunks"]] == [4, 2]
    with torch.no_grad():
        loss, stats = train.compute_loss(model, batch)
        margin_loss, _ = train.compute_loss(model, batch, margin=0.5)

    def alone(prompt: str, response: str) -> float:
        enc = encode_conversations(tokenizer, [prompt], [response])
        return sequence_scores(model, enc["input_ids"], enc["attention_mask"]).item()

    by_hand, by_hand_margin, n_pairs = [], [], 0
    for group in groups:
        r = [alone(group["prompt"], response) for response in group["responses"]]
        assert max(r) - min(r) > 1e-3  # distinct scores, so the check below can fail
        pairs = list(itertools.combinations(range(len(r)), 2))
        by_hand.append(sum(nls(r[i] - r[j]) for i, j in pairs) / len(pairs))
        by_hand_margin.append(sum(nls(r[i] - r[j] - 0.5) for i, j in pairs) / len(pairs))
        n_pairs += len(pairs)
    assert loss.item() == pytest.approx(sum(by_hand) / 2, abs=1e-5)  # groups weigh equally
    assert margin_loss.item() == pytest.approx(sum(by_hand_margin) / 2, abs=1e-5)
    assert stats["num_pairs"].item() == n_pairs == 7

    # with labeler ratings (rows loaded with a `ratings` column), pairs rated alike are no training pairs
    rated = [{**groups[0], "ratings": [5.0, 3.0, 3.0, 1.0]}, groups[1]]  # the second group has no ratings
    with torch.no_grad():
        tied_loss, tied_stats = train.compute_loss(model, train.collate(tokenizer, rated, max_length=96, chunk_size=4))
    r = [alone(groups[0]["prompt"], response) for response in groups[0]["responses"]]
    untied = [(i, j) for i, j in itertools.combinations(range(4), 2) if (i, j) != (1, 2)]
    first = sum(nls(r[i] - r[j]) for i, j in untied) / len(untied)
    assert tied_loss.item() == pytest.approx((first + by_hand[1]) / 2, abs=1e-5)
    assert tied_stats["num_pairs"].item() == 6


@pytest.mark.parametrize("positions", ["rope", "learnt"])
def test_padding_does_not_change_a_score(micro_rm, tmp_path, positions):
    """With learnt absolute positions (GPT-2) too: RoPE (the micro RM) is blind to positions shifted by padding."""
    from conftest import learnt_positions_checkpoints

    scorer = RewardScorer(str(micro_rm if positions == "rope" else learnt_positions_checkpoints(micro_rm, tmp_path)[1]))
    short = ("What is 12 plus 30?", "42.")
    long = ("Write a short thank-you note to Bob for the cake.",
            "Dear Bob, thank you for the lovely cake. I hope you enjoy the rest of your day. Best wishes.")
    alone = scorer.score([short[0]], [short[1]]).item()
    right = encode_conversations(scorer.tokenizer, [short[0], long[0]], [short[1], long[1]])
    tokenizer = scorer.tokenizer
    tokenizer.padding_side = "left"  # as PPO's rollouts are
    left = tokenizer([conversation_text(tokenizer, *short), conversation_text(tokenizer, *long)],
                     return_tensors="pt", padding=True, add_special_tokens=False)
    for batch in (right, left):
        assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the short one is padded
        padded = sequence_scores(scorer.model, batch["input_ids"], batch["attention_mask"])[0].item()
        assert padded == pytest.approx(alone, abs=1e-5)
    # nor does whitespace around the reply, which the RM never trained on (replies are decoded and stripped)
    spaced = scorer.score([short[0]] * 2, [short[1] + " ", "\n" + short[1] + "\n"])
    assert spaced.tolist() == pytest.approx([alone, alone], abs=1e-5)
    assert scorer.score([short[0], long[0]], [short[1], long[1]])[0].item() == pytest.approx(alone, abs=1e-5)


def test_an_rm_trained_with_pad_as_eos_is_scored_where_it_was_trained(micro_rm, tmp_path):
    """A hub RM whose tokenizer pads with its EOS learnt to score the last token before it (transformers reads a
    sequence-classification score at the last non-pad token). Scoring must keep that pad, as plain HF does."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hub_rm = tmp_path / "hub_rm"
    shutil.copytree(micro_rm, hub_rm)
    plain_tokenizer = AutoTokenizer.from_pretrained(hub_rm)
    plain_tokenizer.pad_token = plain_tokenizer.eos_token
    plain_tokenizer.save_pretrained(hub_rm)
    plain = AutoModelForSequenceClassification.from_pretrained(hub_rm)
    plain.config.pad_token_id = plain_tokenizer.eos_token_id
    plain.save_pretrained(hub_rm)
    scorer = RewardScorer(str(hub_rm))
    assert scorer.tokenizer.pad_token == scorer.tokenizer.eos_token
    prompts, replies = ["What is 12 plus 30?", "Reverse the word cat."], ["42.", "The word cat reversed is tac."]
    texts = [conversation_text(scorer.tokenizer, p, r) for p, r in zip(prompts, replies)]
    batch = plain_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        expected = plain(**batch).logits.squeeze(-1)
    torch.testing.assert_close(scorer.score(prompts, replies), expected, atol=1e-5, rtol=1e-5)
    # a stage that trains from such a tokenizer gives it a pad of its own (the new head learns to read EOS)
    assert load_tokenizer(str(hub_rm)).pad_token != plain_tokenizer.eos_token


# ---- errors before training ------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, row, column", [
    ([{"prompt": "Hi?", "responses": ["Hello.", "Hey."]}, {"prompt": "Yo?", "responses": ["Only one."]}], 2,
     "responses"),
    ([{"prompt": "Hi?", "chosen": "Hello."}], 1, "rejected"),
], ids=["ranked-list-of-one", "pairs-without-rejected"])
def test_bad_preference_data_is_a_clear_error_before_training(tmp_path, rows, row, column):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # init_from does not exist: had the model been loaded first, this would be a checkpoint error instead
    with pytest.raises(DataError) as error:
        train.main(["--config", str(MICRO_RM), f"runs_dir={tmp_path}", f"train_data.path={data}",
                    f"init_from={tmp_path / 'no-such-model'}"])
    assert str(data) in str(error.value) and f"row {row}" in str(error.value)
    assert f"column '{column}'" in str(error.value)
    assert not (tmp_path / "micro" / "rm").exists()


def test_a_pairs_dataset_is_held_out_by_prompt_not_by_row(tmp_path):
    """hh-rlhf-style data repeats a prompt over several pair rows; a row split would test on trained prompts."""
    from pipeline.runs import parse_stage_args
    from reward_model.config import RewardModelConfig

    rows = [{"prompt": f"Question {p}?", "chosen": f"Good {p}.{k}", "rejected": f"Bad {p}.{k}"}
            for p in range(12) for k in range(3)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_stage_args(RewardModelConfig, ["--config", str(MICRO_RM), f"runs_dir={tmp_path}",
                                               f"train_data.path={data}", "eval_fraction=0.25"], "",
                           "reward_model.train", "rm.yaml")
    trained, held_out, _ = train.load_rankings(cfg)
    trained_prompts, held_out_prompts = {r["prompt"] for r in trained}, {r["prompt"] for r in held_out}
    assert len(held_out_prompts) == 3 and not trained_prompts & held_out_prompts
    assert len(trained) + len(held_out) == len(rows) and len(held_out) == 9  # every row of a held-out prompt

    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))  # one prompt: nothing to hold out
    with pytest.raises(DataError, match=rf"data error in {data}: only 1 distinct prompt"):
        train.load_rankings(cfg)


# ---- the trained reward model ----------------------------------------------------------------------------

def test_final_loads_with_plain_transformers_and_carries_reward_stats(micro_rm, micro_prefs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(micro_rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_rm)
    assert model.config.pipeline_stage == "rm" and model.config.num_labels == 1
    assert math.isfinite(model.config.reward_mean) and model.config.reward_std > 0
    messages = [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42."}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), return_tensors="pt")
    with torch.no_grad():
        plain = model(**ids).logits.item()
    scorer = RewardScorer(str(micro_rm))
    assert plain == pytest.approx(scorer.score(["What is 12 plus 30?"], ["42."]).item(), abs=1e-5)
    # scoring reads conversations at the length the RM was trained at, not at a length it never saw
    rm_cfg = train.parse_stage_args(train.RewardModelConfig, ["--config", str(MICRO_RM)], "", "reward_model.train",
                                    "rm.yaml")
    assert model.config.rm_max_length == rm_cfg.max_length == scorer.max_length
    # a rank whose share of a small held-out set is empty scores nothing instead of failing
    assert train.score_rankings(scorer.model, scorer.tokenizer, [], rm_cfg.max_length, 8) == []
    # the stats are over the held-out SFT samples: normalised, those have mean 0 and std 1
    rows = read_jsonl(micro_prefs / "eval.jsonl")
    normalized = scorer.score([r["prompt"] for r in rows for _ in r["responses"]],
                              [x for r in rows for x in r["responses"]], normalize=True)
    assert normalized.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert normalized.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    result = json.loads((micro_rm.parent / "eval.json").read_text())
    assert all(0.0 <= result[k] <= 1.0 for k in ("accuracy", "gold_accuracy", "noise_ceiling"))
    by_criterion = result["gold_accuracy_by_deciding_criterion"]  # world prefs: every decided pair is attributed
    assert sum(v["pairs"] for v in by_criterion.values()) == result["decided_pairs"]
    assert set(by_criterion) <= {"correctness", "on_task", "tone", "concision", "format"}
    for entry in by_criterion.values():  # collected rows carry their family: each criterion's pairs split by it
        assert sum(f["pairs"] for f in entry["by_family"].values()) == entry["pairs"]


def test_eval_rm_refuses_preferences_collected_again_since_the_rm_trained(micro_rm, micro_runs, tmp_path):
    """Another collection holds out other questions, some of which the RM trained on: its figures looked better."""
    import shutil

    from reward_model import evaluate

    again = tmp_path / "again"
    again.mkdir()
    for part in ("world", "sft", "rm"):
        (again / part).symlink_to(micro_runs / "micro" / part)
    shutil.copytree(micro_runs / "micro" / "prefs", again / "prefs")
    run = ["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=again"]
    assert evaluate.main(run)["rankings"] > 1  # as collected: the RM's own held-out rankings
    # collected again with the same split (other samples of the same prompts): still the RM's held-out prompts
    trained_rows = (again / "prefs" / "train.jsonl").read_text().splitlines()
    (again / "prefs" / "train.jsonl").write_text("\n".join(trained_rows[1:]) + "\n")
    assert evaluate.main(run)["rankings"] > 1
    held_out = (again / "prefs" / "eval.jsonl").read_text().splitlines()
    (again / "prefs" / "eval.jsonl").write_text("\n".join(held_out[1:]) + "\n")  # as if collected again
    with pytest.raises(DataError, match=r"prefs/eval\.jsonl: collected again since .*rm/final trained"):
        evaluate.main(run)


def test_eval_rm_repeats_the_training_figures_and_scores_any_preference_data(micro_rm, micro_runs, tmp_path, capsys,
                                                                          monkeypatch):
    from reward_model import evaluate

    run = ["--config", str(MICRO_RM), f"runs_dir={micro_runs}", "run_name=micro"]
    world_settings = (micro_runs / "micro" / "world" / "world_config.json").read_text()
    # settings of the split are the RM's own (its resolved config says how it split): refused, not ignored
    for override in ("eval_fraction=0.5", "seed=7"):
        with pytest.raises(SystemExit, match=rf"override '{override}': eval-rm does not use the config key"):
            evaluate.main(run + [override])
    report = evaluate.main(run + ["world.seed=5"])  # nor does the run's world change
    assert (micro_runs / "micro" / "world" / "world_config.json").read_text() == world_settings
    trained = json.loads((micro_rm.parent / "eval.json").read_text())
    for key in ("accuracy", "gold_accuracy", "noise_ceiling", "pairs", "decided_pairs"):
        assert report[key] == pytest.approx(trained[key], abs=1e-9), key  # the same held-out rankings and scores
    assert report["gold_accuracy_by_deciding_criterion"].keys() == trained["gold_accuracy_by_deciding_criterion"].keys()
    assert json.loads((micro_runs / "micro" / "eval" / "rm-rm.json").read_text())["rankings"] == report["rankings"]

    # any preference data: here pairs whose order is the RM's own, then its reverse
    scorer = RewardScorer(str(micro_rm))
    prompts, replies = ["What is 12 plus 30?", "Reverse the word lamp."], [["42.", "Go away."], ["pmal", "lamp?"]]
    ordered = []
    for prompt, (a, b) in zip(prompts, replies):
        sa, sb = scorer.score([prompt, prompt], [a, b]).tolist()
        ordered.append({"prompt": prompt, "chosen": a if sa > sb else b, "rejected": b if sa > sb else a})
    agree = tmp_path / "agree.jsonl"
    agree.write_text("".join(json.dumps({"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
                             + "\n" for r in ordered))
    assert evaluate.main(run + ["--data", str(agree), "--split", "train", "--column", "prompt=question"])[
        "accuracy"] == 1.0
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in ordered))
    out = tmp_path / "flipped.json"
    assert evaluate.main(run + ["--data", str(flipped), "--out", str(out)])["accuracy"] == 0.0
    assert json.loads(out.read_text())["pairs"] == 2 and "gold_accuracy" not in json.loads(out.read_text())
    # both options, or it fails next; under make (eval-rm) they go in ARGS
    for makelevel, advice in ((None, "--reward-model path/to/checkpoint --data path-or-hub-id"),
                              ("1", 'ARGS="--reward-model path/to/checkpoint --data path-or-hub-id"')):
        with monkeypatch.context() as env:
            env.delenv("MAKELEVEL", raising=False) if makelevel is None else env.setenv("MAKELEVEL", makelevel)
            with pytest.raises(SystemExit, match=rf"no 'rm' checkpoint in run 'other'.*make rm.*or pass "
                                                 rf"{re.escape(advice)}\.$"):
                evaluate.main(["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=other"])
    # a causal LM from elsewhere (no stage recorded) has no trained head: its scores would be noise
    outside = tmp_path / "outside-lm"
    shutil.copytree(micro_rm.parent.parent / "sft" / "final", outside)
    config = json.loads((outside / "config.json").read_text())
    del config["pipeline_stage"]
    (outside / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no trained scalar head"):
        evaluate.main(run + ["--reward-model", str(outside), "--data", str(flipped)])


def test_ranking_metrics_by_deciding_criterion_by_hand():
    clean = {"correctness": 1.0, "on_task": 1.0, "tone": 1.0, "concision": 1.0, "format": 1.0}
    wrong, filler = {**clean, "correctness": 0.0}, {**clean, "concision": 0.5}
    # labeler order: clean, filler, wrong (gold 1.0, 0.925, 0.6); the RM puts wrong above filler
    row = {"prompt": "p", "responses": ["a", "b", "c"], "gold_scores": [1.0, 0.925, 0.6],
           "gold_criteria": [clean, filler, wrong], "family": "arithmetic"}
    # a fact prompt where the RM puts the wrong answer first: its one pair is decided by correctness
    fact_row = {"prompt": "q", "responses": ["a", "c"], "gold_scores": [1.0, 0.6], "gold_criteria": [clean, wrong],
                "family": "fact"}
    metrics = rm_metrics.ranking_metrics([[2.0, 0.0, 1.0], [0.0, 1.0]], [row, fact_row])
    # arithmetic pairs: (clean, filler) decided by concision, RM right; (clean, wrong) by correctness, right;
    # (filler, wrong) by correctness (0.4 vs 0.075 of weight), RM wrong
    assert metrics["gold_accuracy/concision"] == 1.0 and metrics["decided_pairs/concision"] == 1
    assert metrics["gold_accuracy/correctness"] == pytest.approx(1 / 3)
    assert metrics["decided_pairs/correctness"] == 3
    assert metrics["gold_accuracy"] == pytest.approx(2 / 4)
    by_criterion = rm_metrics.by_deciding_criterion(metrics)
    assert list(by_criterion) == ["correctness", "concision"]  # most pairs first
    assert by_criterion["correctness"]["by_family"] == {"arithmetic": {"gold_accuracy": 0.5, "pairs": 2},
                                                       "fact": {"gold_accuracy": 0.0, "pairs": 1}}
    assert by_criterion["concision"] == {"gold_accuracy": 1.0, "pairs": 1,
                                         "by_family": {"arithmetic": {"gold_accuracy": 1.0, "pairs": 1}}}


def test_ranking_metrics_report_gold_only_when_every_row_has_it():
    with_gold = {"prompt": "p", "responses": ["a", "b", "c"], "gold_scores": [1.0, 1.0, 0.5]}  # a gold tie
    without = {"prompt": "q", "responses": ["a", "b"]}  # e.g. a hand-added ranking
    scores = [[3.0, 2.0, 1.0], [0.0, 1.0]]
    metrics = rm_metrics.ranking_metrics(scores, [with_gold, without])
    assert "noise_ceiling" not in metrics and "gold_accuracy" not in metrics
    assert metrics["accuracy"] == metrics["accuracy_all_pairs"] == pytest.approx(3 / 4)  # over every pair
    gold_only = rm_metrics.ranking_metrics(scores[:1], [with_gold])
    assert gold_only["accuracy"] == 1.0 and gold_only["decided_pairs"] == 2
    assert gold_only["noise_ceiling_all_pairs"] == pytest.approx((2 + 0.5) / 3)  # the tie is a coin flip
    assert metrics["accuracy_rankings"] == 2 and gold_only["accuracy_rankings"] == 1
    # the report's noise band counts the rankings `accuracy` rests on: here the one of three that gold decides
    all_tied = {"prompt": "r", "responses": ["a", "b"], "gold_scores": [0.5, 0.5]}
    mostly_tied = rm_metrics.ranking_metrics([[3.0, 2.0, 1.0], [0.0, 1.0], [1.0, 0.0]], [with_gold, all_tied, all_tied])
    assert mostly_tied["accuracy_rankings"] == 1 and mostly_tied["decided_pairs"] == 2


def test_accuracy_standard_error_counts_rankings_not_pairs():
    """A ranking's pairs share its scores: two rankings, one ordered right and one reversed, are two draws, not six
    (a binomial error over the pairs gives 0.204; over the rankings, by hand, sqrt(2 * (1.5^2 + 1.5^2)) / 6)."""
    rows = [{"prompt": "p", "responses": ["a", "b", "c"]}, {"prompt": "q", "responses": ["a", "b", "c"]}]
    metrics = rm_metrics.ranking_metrics([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]], rows)
    assert metrics["accuracy"] == 0.5 and metrics["accuracy_rankings"] == 2
    assert metrics["accuracy_se"] == pytest.approx(math.sqrt(2 * (1.5 ** 2 + 1.5 ** 2)) / 6)
    assert "accuracy_se" not in rm_metrics.ranking_metrics([[3.0, 2.0, 1.0]], rows[:1])  # one ranking: no spread


def test_the_held_out_split_keeps_every_form_of_an_addition_fact_on_one_side():
    """"Compute 45 plus 23." and "What is 68 minus 23?" are answered from the fact 23 + 45 = 68 as "What is 23 plus
    45?" is: held out by question, the rankings of one taught the RM the held-out answer of another (8 of the tiny
    run's 47 held-out sums). They go to one side together, as the world holds out its arithmetic (is_heldout_fact)."""
    from data.world import GoldJudge, World
    from reward_model.collect import question_of, split_indices

    judge = GoldJudge(World.from_seed(0, 4))
    facts = [(a, b) for a in range(10, 50, 7) for b in range(11, 50, 9)]
    prompts = [prompt for a, b in facts for prompt in (f"What is {a} plus {b}?", f"Compute {b} plus {a}.",
                                                        f"What is {a + b} minus {a}?",
                                                        f"How much is {a + b} minus {b}?")]
    fact_of = [fact for fact in facts for _ in range(4)]
    questions = [question_of(judge, p) for p in prompts]
    assert len(set(questions)) == len(facts)
    for seed in range(5):
        train_idx, eval_idx = split_indices(questions, 0.3, seed, source="test")
        assert train_idx and eval_idx and not {fact_of[i] for i in train_idx} & {fact_of[i] for i in eval_idx}, seed


def test_the_held_out_split_keeps_every_phrasing_of_a_question_on_one_side(tmp_path):
    """Split by prompt text, "What is 23 plus 45?" could be held out while "Compute 23 plus 45." was trained on."""
    from data.world import WorldConfig, write_world
    from pipeline.config import load_config
    from pipeline.evaluation import load_judge
    from reward_model.collect import question_of, split_indices

    world = write_world(tmp_path / "world", load_config(WorldConfig, MICRO_RM.parent / "world.yaml"))
    prompts = [json.loads(line)["prompt"] for line in (world / "pref_prompts.jsonl").read_text().splitlines()]
    judge = load_judge(world)
    questions = [question_of(judge, p) for p in prompts]
    assert len(set(questions)) < len(prompts)  # the world asks some questions in several phrasings
    train_idx, eval_idx = split_indices(questions, 0.3, seed=0, source="test")
    assert sorted(train_idx + eval_idx) == list(range(len(prompts))) and train_idx and eval_idx
    assert not {questions[i] for i in train_idx} & {questions[i] for i in eval_idx}
    assert question_of(judge, "Tell me a joke.") == "Tell me a joke."  # a prompt the world does not know
    one_question = [questions[0]] * 3  # three phrasings of one question: nothing to hold out
    with pytest.raises(DataError, match=r"data error in prompts.jsonl: only 1 distinct question"):
        split_indices(one_question, 0.3, seed=0, source="prompts.jsonl", what="question")
    # the RM trained on the world's static rankings (train_data, no eval_data) holds out whole questions too, also
    # from a copy of them in a file (which was split by prompt text)
    for seed in range(6):  # micro's static set asks one question twice: some seeds split it by text
        for path in ("world:prefs_static", str(world / "prefs_static.jsonl")):
            cfg = load_config(train.RewardModelConfig, MICRO_RM, [f"runs_dir={tmp_path}", "run_name=w", f"seed={seed}",
                                                                  f"train_data.path={path}", "eval_fraction=0.3"])
            trained, held_out, _ = train.load_rankings(cfg)
            judge = load_judge(tmp_path / "w" / "world")
            assert held_out and not ({question_of(judge, r["prompt"]) for r in trained}
                                     & {question_of(judge, r["prompt"]) for r in held_out}), (seed, path)


def test_an_rm_equal_to_gold_reaches_the_all_pairs_ceiling():
    """An RM tie counted as wrong while the ceiling counted a gold tie as a coin flip: an RM scoring exactly gold
    (two identical replies, say) fell short of the ceiling it matches."""
    row = {"prompt": "p", "responses": ["a", "b", "b"], "gold_scores": [1.0, 0.85, 0.85]}
    metrics = rm_metrics.ranking_metrics([[1.0, 0.85, 0.85]], [row])
    assert metrics["accuracy_all_pairs"] == metrics["noise_ceiling_all_pairs"] == pytest.approx((2 + 0.5) / 3)
    assert metrics["accuracy"] == metrics["noise_ceiling"] == 1.0


def test_noise_ceiling_and_gold_agreement_when_the_labeler_disagrees_with_gold():
    """The labeler ranked b above c against gold (gold 1.0, 0.6, 0.925 in the labeler's order); an RM that scores
    by gold agrees with gold on every pair but with the labeler only where the labeler was right."""
    row = {"prompt": "p", "responses": ["a", "b", "c"], "gold_scores": [1.0, 0.6, 0.925]}
    gold_like = rm_metrics.ranking_metrics([[2.0, 0.0, 1.0]], [row])
    assert gold_like["gold_accuracy"] == 1.0
    assert gold_like["noise_ceiling"] == pytest.approx(2 / 3)  # the labeler's (b, c) is against gold
    assert gold_like["accuracy"] == pytest.approx(2 / 3)
    assert gold_like["accuracy_over_ceiling"] == pytest.approx(1.0)
    assert gold_like["gain_over_chance_to_ceiling"] == pytest.approx(1.0)
    # a coin flip (every score tied) is 3/4 "of the ceiling", and none of the way there from chance
    coin = rm_metrics.headline_metrics(rm_metrics.ranking_metrics([[0.0, 0.0, 0.0]], [row]))
    assert coin["accuracy_over_ceiling"] == pytest.approx(0.5 / (2 / 3)) and coin["gain_over_chance_to_ceiling"] == 0
    assert "(75.0% of it; 0% of the way from a coin flip)" in rm_metrics.describe_accuracy(coin)
    # an RM that follows the labeler, mistake included, agrees with it fully and with gold on 2 of 3
    label_like = rm_metrics.ranking_metrics([[2.0, 1.0, 0.0]], [row])
    assert label_like["accuracy"] == 1.0 and label_like["gold_accuracy"] == pytest.approx(2 / 3)
    assert label_like["noise_ceiling"] == pytest.approx(2 / 3)
    # a labeler that never agrees with gold leaves no ceiling to measure by (the ratio was reported as 1e9)
    reversed_row = {"prompt": "p", "responses": ["a", "b"], "gold_scores": [0.2, 0.5]}
    reversed_metrics = rm_metrics.headline_metrics(rm_metrics.ranking_metrics([[1.0, 0.0]], [reversed_row]))
    assert reversed_metrics["noise_ceiling"] == 0.0 and "accuracy_over_ceiling" not in reversed_metrics
    assert "gain_over_chance_to_ceiling" not in reversed_metrics
    assert "of it" not in rm_metrics.describe_accuracy(reversed_metrics)


def test_reward_stats_count_each_distinct_reply_once():
    """PPO normalises rewards with the RM's mean and std over held-out replies: a chosen reply that a pairs dataset
    repeats over three rows must not count three times."""
    rows = [{"prompt": "Q?", "responses": ["Good.", f"Bad {k}."]} for k in range(3)]
    scores = [[3.0, 0.0], [3.0, 1.0], [3.0, 2.0]]
    assert sorted(rm_metrics.distinct_reply_scores(scores, rows)) == [0.0, 1.0, 2.0, 3.0]
    stats = rm_metrics.score_stats("reward", rm_metrics.distinct_reply_scores(scores, rows))
    assert stats["reward_mean"] == pytest.approx(1.5)  # not 2.0, the mean over rows


def test_training_lowers_the_ranking_loss_on_its_data(micro_rm, micro_sft, micro_prefs):
    rows = read_jsonl(micro_prefs / "train.jsonl")
    tokenizer = load_tokenizer(str(micro_sft))

    def loss_and_accuracy(path: Path) -> tuple[float, float]:
        torch.manual_seed(0)
        model = load_scalar_model(str(path), "test", tokenizer).eval()
        with torch.no_grad():
            loss, stats = train.compute_loss(model, train.collate(tokenizer, rows, max_length=96))
        return loss.item(), stats["accuracy"].item()

    (loss_before, acc_before), (loss_after, acc_after) = loss_and_accuracy(micro_sft), loss_and_accuracy(micro_rm)
    assert loss_after < loss_before - 0.05 and acc_after > acc_before
    logged = [m["train/loss"] for m in read_jsonl(micro_rm.parent / "metrics.jsonl") if "train/loss" in m]
    assert len(logged) >= 4


def _copy_prefs(micro_prefs: Path, runs_dir: Path, run_name: str) -> None:
    shutil.copytree(micro_prefs, runs_dir / run_name / "prefs")


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(micro_sft, micro_prefs, tmp_path, capsys):
    _copy_prefs(micro_prefs, tmp_path, "resume")
    assert len(read_jsonl(micro_prefs / "train.jsonl")) >= 3 * 8  # 3+ steps of batch_size 8: step 2 is mid-run
    args = ["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=resume", f"init_from={micro_sft}",
            "epochs=1", "checkpoint_every=2", "eval_every=100", "log_every=3"]
    train.main(args)
    final = tmp_path / "resume" / "rm" / "final"
    uninterrupted = load_file(final / "model.safetensors")
    logged = [{k: v for k, v in row.items() if k.split("/")[0] == "train" and k != "train/lr"}
              for row in read_jsonl(final.parent / "metrics.jsonl") if "train/loss" in row]
    assert [p.name for p in (final.parent / "checkpoints").iterdir() if p.is_dir()] == ["step_00000002"]
    shutil.rmtree(final)
    # another batch size would read other rankings at each step than the interrupted run: refused, by key
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_00000002: key 'batch_size' was 8 there, 4 now"):
        train.main(args + ["resume=true", "batch_size=4"])
    # the restored scheduler would keep the old rate without a word
    with pytest.raises(ConfigError, match=r"key 'learning_rate' was 0\.\d+ there, 0\.5 now"):
        train.main(args + ["resume=true", "learning_rate=0.5"])
    with pytest.raises(ConfigError, match=r"key 'max_length' was 96 there, 40 now"):  # other cuts of each reply
        train.main(args + ["resume=true", "max_length=40"])
    # the launches before the resume trained for what the checkpoint says (here an hour): eval.json's training time
    # is the whole run's, not the resumed launch's alone
    state_file = final.parent / "checkpoints" / "step_00000002" / "training_state.pt"
    torch.save({**torch.load(state_file, weights_only=True), "train_seconds": 3600.0}, state_file)
    capsys.readouterr()
    train.main(args + ["resume=true"])  # continues from step 2 of 4
    assert "resuming at step 2" in capsys.readouterr().out
    assert 3600 < json.loads((final.parent / "eval.json").read_text())["train_seconds"] < 3900
    resumed = load_file(final / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    # the first log after the resume averages steps 1-3, as the uninterrupted run's did, not step 3 alone
    relogged = [{k: v for k, v in row.items() if k.split("/")[0] == "train" and k != "train/lr"}
                for row in read_jsonl(final.parent / "metrics.jsonl") if "train/loss" in row]
    assert len(relogged) == len(logged) >= 1 and relogged == [pytest.approx(row, rel=1e-5) for row in logged]

    # the weights come from the checkpoint, not from a deterministic rerun of steps 1-2: change them, and the
    # resumed run ends elsewhere
    from safetensors.torch import save_file

    saved = final.parent / "checkpoints" / "step_00000002" / "model" / "model.safetensors"
    save_file({name: t + 0.01 if t.is_floating_point() else t for name, t in load_file(saved).items()}, saved,
              metadata={"format": "pt"})
    shutil.rmtree(final)
    train.main(args + ["resume=true"])
    moved = load_file(final / "model.safetensors")
    assert any(not torch.allclose(moved[name], t, atol=1e-3) for name, t in uninterrupted.items())


def test_ddp_ranks_scoring_rankings_of_different_sizes_train_alike(micro_sft, tmp_path):
    """Rankings differ in size (collection drops duplicate samples), so ranks score their micro-batches in different
    numbers of forward passes: DDP's buffer broadcast before each pass paired unlike calls across ranks and hung."""
    import re

    from conftest import launch_two_ranks

    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "responses": [f"Answer {j} to {i}." for j in
                                                                                 range(2 + i % 3)]}) + "\n"
                            for i in range(40)))
    run = launch_two_ranks("reward_model.train", [
        "--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=ddp", f"init_from={micro_sft}",
        f"train_data.path={data}", "forward_chunk=1", "batch_size=4", "epochs=1", "eval_every=100", "log_every=1"],
        timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    fingerprints = dict(re.findall(r"rank (\d+) parameter fingerprint (\w+)", run.stdout))
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"], run.stdout[-2000:]
    steps = [r["step"] for r in read_jsonl(tmp_path / "ddp" / "rm" / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3  # logged once per step, by the main process
    assert (tmp_path / "ddp" / "rm" / "final" / "config.json").exists()
    assert "deprecated" not in run.stderr, run.stderr[-3000:]  # torch's rename of broadcast_buffers, once per rank


def test_conversations_the_rm_would_read_cut_are_counted(micro_sft):
    """Cut on the left, a long reply loses its prompt: the stage warns with this count instead of saying nothing."""
    from pipeline.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(micro_sft))
    rows = [{"prompt": "Hi?", "responses": ["Hello.", " ".join(["word"] * 80)]},
            {"prompt": " ".join(["long"] * 80), "responses": ["A.", "B."]}]
    assert train.longer_than(tokenizer, rows, 64) == 3
    assert train.longer_than(tokenizer, rows, 4096) == 0


def test_lora_adapters_are_merged_into_a_plain_final_checkpoint(micro_sft, micro_prefs, tmp_path):
    _copy_prefs(micro_prefs, tmp_path, "lora")
    train.main(["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=lora", f"init_from={micro_sft}",
                "epochs=1", "eval_every=100", "lora.enabled=true", "lora.rank=4", "lora.alpha=8"])
    final = tmp_path / "lora" / "rm" / "final"
    weights = load_file(final / "model.safetensors")
    assert not any("lora" in name for name in weights) and not (final / "adapter_config.json").exists()
    sft = load_file(micro_sft / "model.safetensors")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[q_proj], sft[q_proj])  # the merged adapter changed the backbone
    # ... and only through the adapters: what LoRA does not wrap is the SFT model's, untouched (a full
    # fine-tune that ignored lora.enabled would move these too)
    for untouched in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(weights[untouched], sft[untouched]), untouched
    assert math.isfinite(json.loads((final / "config.json").read_text())["reward_std"])


def test_with_train_data_nothing_is_collected_and_make_counts_the_step_done(tmp_path):
    """A recipe whose RM trains on a given dataset (the gpu recipe's hh-rlhf) must not retrain the RM, and then
    PPO, on every make: the collection step leaves the file make waits for, with nothing learned from the world."""
    import os
    import subprocess
    import time

    from conftest import REPO

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}) + "\n")
    collect.main(["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=t", f"train_data.path={data}"])
    marker = tmp_path / "t" / "prefs" / "world_data.json"
    assert json.loads(marker.read_text()) is None
    assert not (tmp_path / "t" / "prefs" / "train.jsonl").exists()
    from pipeline.report import stage_times
    from pipeline.runs import StageConfig

    (prefs_row,) = [row for row in stage_times(StageConfig(run_name="t", runs_dir=str(tmp_path))) if row[0] == "prefs"]
    assert prefs_row[-1] == "skipped: the RM trains on train_data"  # the report said "not run"

    # the outputs of a finished chain up to the RM, oldest first, as make would leave them
    stamp = tmp_path / "installed"
    outputs = [stamp, *(tmp_path / "t" / stage / "final" / "config.json" for stage in ("pretrain", "sft")), marker,
               tmp_path / "t" / "rm" / "final" / "config.json"]
    for age, path in enumerate(reversed(outputs)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path, (time.time() - 10 * age,) * 2)
    make = ["make", "-q", "-C", str(REPO), str(outputs[-1]), f"RUNDIR={tmp_path / 't'}", "RUN=t",
            f"SETUP_STAMP={stamp}"]
    assert subprocess.run(make).returncode == 0  # up to date: nothing to rerun
    marker.unlink()
    assert subprocess.run(make).returncode == 1  # without it, make would collect (and retrain the RM)

    # SFT rebuilt after all that: make reruns collection, which dates its record now. The step is then done (not
    # launched again on every make), and the RM, trained from the old SFT model, is out of date
    marker.write_text("null\n")
    os.utime(marker, (time.time() - 20,) * 2)
    os.utime(outputs[2], (time.time() - 5,) * 2)
    collect.main(["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=t", f"train_data.path={data}"])
    assert subprocess.run([*make[:4], str(marker), *make[5:]]).returncode == 0
    assert subprocess.run(make).returncode == 1


def test_collection_samples_the_sft_policy_not_the_rm_backbone_named_in_init_from(micro_sft, tmp_path, capsys):
    """init_from starts RM training elsewhere; the rankings must still be of the policy that PPO will align."""
    from pipeline.config import ConfigError

    shutil.copytree(micro_sft, tmp_path / "t" / "sft" / "final")
    args = ["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=t", "max_prompts=8"]
    collect.main(args + [f"init_from={tmp_path / 'some-other-backbone'}"])
    assert f"samples each from {tmp_path / 't' / 'sft' / 'final'}" in capsys.readouterr().out
    assert "sft" in json.loads((tmp_path / "t" / "prefs" / "world_data.json").read_text())
    with pytest.raises(ConfigError, match="key 'policy': .*no-such-policy"):  # `policy` names another one
        collect.main(args + [f"policy={tmp_path / 'no-such-policy'}"])


def test_a_repeated_prompt_is_collected_once_and_never_on_both_sides_of_the_split(micro_sft, tmp_path, capsys):
    shutil.copytree(micro_sft, tmp_path / "t" / "sft" / "final")
    prompts = tmp_path / "prompts.jsonl"
    distinct = [f"What is {a} plus {a}?" for a in range(10, 20)]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in distinct * 3))
    collect.main(["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=t", f"prompts.path={prompts}",
                  "eval_fraction=0.3"])
    assert f"{prompts}: 20 repeated prompt(s) dropped" in capsys.readouterr().out
    splits = {split: [json.loads(line)["prompt"] for line in
                      (tmp_path / "t" / "prefs" / f"{split}.jsonl").read_text().splitlines()]
              for split in ("train", "eval")}
    collected = splits["train"] + splits["eval"]
    assert splits["train"] and splits["eval"] and len(collected) == len(set(collected))


def test_a_cut_off_recollection_leaves_no_record_and_rm_training_refuses_it(micro_prefs, micro_sft, tmp_path,
                                                                            monkeypatch):
    """Collection removes its record (what make waits for) first and writes it last: a re-collection cut off
    between train.jsonl and eval.jsonl must not leave a new train set beside an old held-out set looking done."""
    prefs = tmp_path / "t" / "prefs"
    shutil.copytree(micro_prefs, prefs)
    shutil.copytree(micro_sft, tmp_path / "t" / "sft" / "final")
    write = collect.write_jsonl_atomic

    def disk_full_at_eval(path, rows):
        if Path(path).name == "eval.jsonl":
            raise OSError(28, "No space left on device")
        write(path, rows)

    monkeypatch.setattr(collect, "write_jsonl_atomic", disk_full_at_eval)
    args = ["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=t"]
    with pytest.raises(OSError, match="No space left"):
        collect.main(args + ["max_prompts=12", "seed=1"])
    assert (prefs / "eval.jsonl").read_text() == (micro_prefs / "eval.jsonl").read_text()  # the old one
    assert not (prefs / "world_data.json").exists()
    reset_accelerate()  # two stages in one process: each sets its precision
    with pytest.raises(DataError, match=rf"{prefs}: the last collection did not finish .*Collect again"):
        train.main(args)
    assert not (tmp_path / "t" / "rm" / "final").exists()


def test_prompts_too_long_for_the_policy_are_dropped_with_a_count(micro_sft, tmp_path, capsys):
    from pipeline.generation import prompts_that_fit

    shutil.copytree(micro_sft, tmp_path / "t" / "sft" / "final")
    prompts = tmp_path / "prompts.jsonl"
    short = [f"What is {a} plus {a}?" for a in range(10, 20)]
    long = "Please tell me " + "a very long story " * 200 + "now."  # past the micro model's positions
    own = "Tell me something nice."  # no task of the world: the annotator can rank its replies by style alone
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [*short[:5], long, own, *short[5:]]))
    collect.main(["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=t", f"prompts.path={prompts}"])
    out = capsys.readouterr().out
    assert f"1 of 12 prompts from {prompts} are longer than" in out
    assert f"note: 1 of the 11 prompts ({prompts}) are no task of the world" in out
    collected = [json.loads(line)["prompt"] for split in ("train", "eval")
                 for line in (tmp_path / "t" / "prefs" / f"{split}.jsonl").read_text().splitlines()]
    assert long not in collected and set(collected) <= {*short, own}

    tokenizer = load_tokenizer(str(micro_sft))
    model = load_scalar_model(str(micro_sft), "test", tokenizer)
    rows = [{"prompt": p} for p in short]
    assert prompts_that_fit(rows, tokenizer, model, 16, 0, "p", "test") == rows
    with pytest.raises(DataError, match=r"data error in p: every prompt is longer than 5 tokens"):
        prompts_that_fit(rows, tokenizer, model, 16, 5, "p", "test")
    positions = model.config.max_position_embeddings
    with pytest.raises(DataError, match=rf"longer than {positions - 120} tokens"):  # a larger cap than fits: clamped
        prompts_that_fit(rows, tokenizer, model, 120, 1000, "p", "test")
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="key 'sampling.max_new_tokens'"):
        prompts_that_fit(rows, tokenizer, model, positions, 0, "p", "test")
    # PPO's critic reads prompt and reply too: of several models, the one with the fewest positions sets the room
    fewer = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=positions - 110))
    with pytest.raises(DataError, match=rf"longer than {positions - 110 - 16} tokens"):
        prompts_that_fit(rows, tokenizer, (model, fewer), 16, 0, "p", "test")


def test_collection_settings_the_rankings_were_not_collected_with_are_refused(micro_prefs, tmp_path):
    """`make rm RM_ARGS=responses_per_prompt=8` on rankings collected at K=4 trained on them and recorded K=8 in
    rm/config.yaml: collection reads that key, training does not."""
    from reward_model.train import main

    shutil.copytree(micro_prefs, tmp_path / "r" / "prefs")
    args = ["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=r"]
    with pytest.raises(ConfigError, match=r"key 'responses_per_prompt' is 8 here, 4 in the collected rankings .*"
                                          r"Collection reads it, not RM training, .* give RM training their value "
                                          r"\(RM_ARGS, .*\), or collect them again with this one \(make prefs "
                                          r"PREFS_ARGS=\"responses_per_prompt=\.\.\.\"\)"):
        main(args + ["responses_per_prompt=8"])
    with pytest.raises(ConfigError, match=r"key 'sampling\.temperature' is 0\.5 here, 1\.0 in the collected"):
        main(args + ["sampling.temperature=0.5"])
    assert not (tmp_path / "r" / "rm").exists()  # refused before anything was written


def test_an_rm_with_its_own_eval_data_names_that_file_for_its_held_out_rankings(micro_rm, micro_runs, tmp_path,
                                                                                 capsys):
    """With eval_data set, RM training and eval-rm named the training file as the held-out rankings' source."""
    from reward_model import evaluate

    held_out = tmp_path / "held_out.jsonl"
    shutil.copy(micro_runs / "micro" / "prefs" / "eval.jsonl", held_out)
    args = ["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=own",
            f"init_from={micro_runs / 'micro' / 'sft' / 'final'}", "train_data.path=world:prefs_static",
            f"eval_data.path={held_out}"]
    reset_accelerate()
    train.main([*args, "epochs=1"])
    assert f"from world:prefs_static and {len(held_out.read_text().splitlines())} held out ({held_out})" in \
        capsys.readouterr().out
    evaluate.main(args[:4])
    assert f"rankings from the held-out rankings of {held_out}" in capsys.readouterr().out
    # what it learned from the world is recorded, so PPO refuses this RM once the world's static rankings change
    lineage = json.loads((tmp_path / "own" / "rm" / "final" / "config.json").read_text())["pipeline_world_data"]
    assert set(lineage["rm"]) == {"world", "prefs_static"}
    # an edited held-out file would give other figures than training did
    held_out.write_text("\n".join(held_out.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(held_out))}: changed since .*rm/final trained"):
        evaluate.main(args[:4])


def test_eval_rm_refuses_train_data_that_split_again_holds_out_trained_prompts(micro_sft, tmp_path):
    """With train_data split by eval_fraction, rows added since training move the split: eval-rm scored prompts the
    RM had trained on as held out."""
    from reward_model import evaluate

    data = tmp_path / "ranked.jsonl"
    rows = [json.dumps({"prompt": f"Question {i}?", "responses": [f"Good answer {i}.", f"Bad {i}."]})
            for i in range(40)]
    data.write_text("\n".join(rows[:32]) + "\n")
    args = ["--config", str(MICRO_RM), f"runs_dir={tmp_path}", "run_name=td", f"train_data.path={data}"]
    reset_accelerate()
    train.main([*args, f"init_from={micro_sft}", "epochs=1", "eval_every=100", "eval_fraction=0.25"])
    run = args[:-1]  # eval-rm splits as the RM's own resolved config says (an override of train_data is refused)
    assert evaluate.main(run)["rankings"] == 8
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(data))}: changed since .*rm/final trained: split again"):
        evaluate.main(run)


def test_eval_data_without_train_data_is_refused_by_key(tmp_path):
    """Collected preferences hold out their own prompts: eval_data was ignored, yet named as the held-out set."""
    from pipeline.config import load_config

    with pytest.raises(ConfigError, match=r"key 'eval_data': is read only with train_data"):
        load_config(train.RewardModelConfig, MICRO_RM, [f"runs_dir={tmp_path}", "eval_data.path=held_out.jsonl"])


@pytest.mark.parametrize("damage", ["cut short", "missing"])
def test_a_lora_checkpoint_with_damaged_adapters_is_refused_by_name(micro_sft, tmp_path, damage):
    """A resume read the adapters with peft directly: a cut-short file ended in a safetensors traceback, a missing
    one in a hub lookup of the checkpoint's path."""
    from peft import get_peft_model

    from pipeline.model import LoraSpec, resume_lora

    tokenizer = load_tokenizer(str(micro_sft))
    model = load_scalar_model(str(micro_sft), "test", tokenizer)
    adapters = tmp_path / "step_00000002" / "model"
    get_peft_model(model, LoraSpec(enabled=True, rank=4).peft_config("SEQ_CLS", model)).save_pretrained(adapters)
    resumed = resume_lora(load_scalar_model(str(micro_sft), "test", tokenizer), adapters, "reward_model.train")
    assert any(p.requires_grad for name, p in resumed.named_parameters() if "lora" in name)
    weights = adapters / "adapter_model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:100])
    refused = rf"reward_model\.train: cannot (resume from|load) {re.escape(str(adapters))}"
    with pytest.raises(CheckpointError, match=refused):
        resume_lora(load_scalar_model(str(micro_sft), "test", tokenizer), adapters, "reward_model.train")


def test_without_collected_rankings_the_record_train_data_left_is_explained(tmp_path):
    """After an RM trained on train_data, make takes the record that step left as the collection done: training on
    collected rankings then stopped with "collect them first", without saying why make had not."""
    from pipeline.config import load_config

    cfg = load_config(train.RewardModelConfig, MICRO_RM, [f"runs_dir={tmp_path}", "run_name=r"])
    prefs = tmp_path / "r" / "prefs"
    prefs.mkdir(parents=True)
    (prefs / "world_data.json").write_text("null\n")
    with pytest.raises(DataError, match=r"no collected preferences .* what an RM trained on train_data left; make "
                                        r"takes it as the collection done"):
        train.load_rankings(cfg)
