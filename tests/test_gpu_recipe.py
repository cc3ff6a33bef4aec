"""The gpu recipe's configs, run end to end on local files shaped like the hub datasets they name.

This machine has no hub, so each dataset is a small local copy with the hub's own columns and file layout
(split-named parquet files): fineweb-edu (streamed), ultrachat_200k, Dahoas/full-hh-rlhf and UltraFeedback
binarized. Only the model and the step counts are shrunk; the data settings are the recipe's.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
import torch

from conftest import REPO, run_stage

GPU = REPO / "configs" / "gpu"
SMALL_MODEL = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
               "model.num_key_value_heads=2", "model.intermediate_size=128", "model.vocab_size=600",
               "model.max_position_embeddings=256"]
WORDS = "the a model learns data from text and then it writes small plain words about cats dogs rivers hills".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """Local copies in the hub datasets' schemas and layouts."""
    root, rng = tmp_path_factory.mktemp("hub"), random.Random(0)
    parquet(root / "fineweb-edu" / "sample" / "10BT" / "000_00000.parquet",
            [{"text": " ".join(sentence(rng, 12) for _ in range(20)), "id": f"<urn:uuid:{i}>", "url": "https://x",
              "language": "en", "token_count": 300, "score": 3.1, "int_score": 3} for i in range(300)])
    for split, n in (("train_sft", 160), ("test_sft", 24)):
        rows = []
        for i in range(n):
            ask = f"Tell me about {rng.choice(WORDS)} number {i}."
            rows.append({"prompt": ask, "prompt_id": str(i), "messages": [
                {"content": ask, "role": "user"}, {"content": sentence(rng, 10), "role": "assistant"},
                {"content": "And more?", "role": "user"}, {"content": sentence(rng, 8), "role": "assistant"}]})
        parquet(root / "ultrachat_200k" / "data" / f"{split}-00000-of-00001.parquet", rows)
    # the preferred reply differs by its closing words only, so a trained RM can tell them apart and a fresh one
    # cannot (equal lengths: no length cue)
    good, bad = "Thanks for asking kindly.", "Go away now, stop it."
    for split, n in (("train", 240), ("test", 40)):
        rows = []
        for i in range(n):
            reply = sentence(rng, 5)
            rows.append({"prompt": f"\n\nHuman: Question {i}?\n\nAssistant: {sentence(rng, 4)}\n\nHuman: Why?"
                                   f"\n\nAssistant:", "response": f" {reply} {good}",
                         "chosen": f" {reply} {good}", "rejected": f" {reply} {bad}"})
        parquet(root / "full-hh-rlhf" / "data" / f"{split}-00000-of-00001.parquet", rows)
    for split, n in (("train_prefs", 120), ("test_prefs", 30), ("train_gen", 40)):
        rows = []
        for i in range(n):
            user = {"content": f"Explain {rng.choice(WORDS)} {i}.", "role": "user"}
            reply = sentence(rng, 5)
            chosen, rejected = f"{reply} {good}", f"{reply} {bad}"
            rows.append({"prompt": user["content"], "prompt_id": str(i),
                         "chosen": [user, {"content": chosen, "role": "assistant"}],
                         "rejected": [user, {"content": rejected, "role": "assistant"}],
                         "messages": [user, {"content": chosen, "role": "assistant"}],
                         "score_chosen": 8.0, "score_rejected": 3.0})
        parquet(root / "ultrafeedback_binarized" / "data" / f"{split}-00000-of-00001.parquet", rows)
    # openbmb/UltraFeedback: each instruction's 4 completions as records, each with its rating, in any order
    rows = []
    for i in range(120):
        reply = sentence(rng, 5)
        replies = [f"{reply} {good}", f"{reply} Thanks.", f"{reply} Fine.", f"{reply} {bad}"]
        completions = [{"model": f"m{k}", "response": replies[k], "overall_score": [5.0, 3.0, 3.0, 1.0][k]}
                       for k in rng.sample(range(4), 4)]
        rows.append({"source": "evol_instruct", "instruction": f"Explain {rng.choice(WORDS)} {i}.",
                     "completions": completions})
    parquet(root / "UltraFeedback" / "data" / "train-00000-of-00001.parquet", rows)
    return root


def run(main, config: str, runs_dir: Path, *overrides: str, run_name: str = "gpu") -> None:
    run_stage(main, config, runs_dir, *overrides, run_name=run_name, recipe=GPU)


def test_the_gpu_recipe_runs_end_to_end_on_hub_shaped_data(hub, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from reward_model import train as rm_train
    from reward_model.scoring import conversation_text
    from stages.ppo.ppo import main as ppo_main
    from stages.pretrain.pretrain import main as pretrain_main
    from stages.sft.sft import main as sft_main

    runs = tmp_path / "runs"
    run(pretrain_main, "pretrain.yaml", runs, *SMALL_MODEL, f"data.path={hub / 'fineweb-edu'}", "block_size=128",
        "batch_size=4", "grad_accum=1", "max_steps=30", "warmup_steps=3", "eval_every=15", "checkpoint_every=15",
        "val_blocks=8")
    run(sft_main, "sft.yaml", runs, f"data.path={hub / 'ultrachat_200k'}", f"eval_data.path={hub / 'ultrachat_200k'}",
        "max_length=256", "batch_size=4", "grad_accum=1", "eval_every=20", "checkpoint_every=20",
        "gold_eval_prompts=4", "gold_sampling.max_new_tokens=4", "gold_batch_size=4")
    out = capsys.readouterr().out
    assert "160 demonstrations, 24 held out" in out  # train_sft and test_sft, each only its own split
    sft_final = runs / "gpu" / "sft" / "final"
    vocab = AutoModelForCausalLM.from_pretrained(sft_final).config.vocab_size
    assert vocab == len(AutoTokenizer.from_pretrained(sft_final))

    rm_overrides = ["max_length=256", "batch_size=8", "grad_accum=1", "eval_every=100", "checkpoint_every=100",
                    "eval_batch_size=16", "epochs=3", "learning_rate=3e-3"]
    run(rm_train.main, "rm.yaml", runs, f"train_data.path={hub / 'full-hh-rlhf'}",
        f"eval_data.path={hub / 'full-hh-rlhf'}", *rm_overrides)
    out = capsys.readouterr().out
    hh_path = hub / "full-hh-rlhf"
    assert f"240 training rankings (240 pairs) from {hh_path} and 40 held out ({hh_path});" in out
    hh = json.loads((runs / "gpu" / "rm" / "eval.json").read_text())
    assert hh["accuracy"] >= 0.9, hh  # it learnt the closing words (a fresh head is at chance on equal lengths)
    tokenizer = AutoTokenizer.from_pretrained(runs / "gpu" / "rm" / "final")
    text = conversation_text(tokenizer, "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Why?\n\nAssistant:", "Because.")
    assert text.count("<|user|>") == 2 and text.count("<|assistant|>") == 2  # an hh prompt is read as its turns

    run(rm_train.main, "rm.yaml", runs, f"init_from={sft_final}",
        f"train_data.path={hub / 'ultrafeedback_binarized'}", "train_data.split=train_prefs",
        f"eval_data.path={hub / 'ultrafeedback_binarized'}", "eval_data.split=test_prefs", *rm_overrides,
        run_name="gpu_uf")
    uf_path = hub / "ultrafeedback_binarized"  # the held-out split's file named, not the training one's alone
    assert f"120 training rankings (120 pairs) from {uf_path} and 30 held out ({uf_path});" in capsys.readouterr().out
    uf = json.loads((runs / "gpu_uf" / "rm" / "eval.json").read_text())
    assert uf["accuracy"] >= 0.9, uf
    assert AutoModelForSequenceClassification.from_pretrained(runs / "gpu_uf" / "rm" / "final").config.num_labels == 1

    # K = 4 rated completions: the K-way loss over the 5 pairs that are no ties (the two 3s are one)
    run(rm_train.main, "rm.yaml", runs, f"init_from={sft_final}",
        f"train_data.path={hub / 'UltraFeedback'}", "train_data.columns.prompt=instruction",
        "train_data.columns.responses=completions.response", "train_data.columns.ratings=completions.overall_score",
        "eval_data=null", "eval_fraction=0.2", *rm_overrides, run_name="gpu_rated")
    out = capsys.readouterr().out
    assert f"96 training rankings (480 pairs) from {hub / 'UltraFeedback'} and 24 held out;" in out, out
    rated = json.loads((runs / "gpu_rated" / "rm" / "eval.json").read_text())
    assert rated["pairs"] == 24 * 5 and rated["accuracy"] >= 0.9, rated

    run(ppo_main, "ppo.yaml", runs, f"prompts.path={hub / 'ultrafeedback_binarized'}", "prompts.split=train_gen",
        "max_steps=2", "rollout_batch_size=8", "minibatch_size=4", "grad_accum=1", "ppo_epochs=1",
        "sampling.max_new_tokens=8", "rm_max_length=256", "eval_prompts=4", "eval_every=2", "eval_batch_size=4",
        "checkpoint_every=2")
    assert "40 prompts" in capsys.readouterr().out
    ppo_final = runs / "gpu" / "ppo" / "final"
    assert json.loads((ppo_final / "config.json").read_text())["pipeline_stage"] == "ppo"
    ppo_weights = AutoModelForCausalLM.from_pretrained(ppo_final).state_dict()
    sft_weights = AutoModelForCausalLM.from_pretrained(sft_final).state_dict()
    assert any(not torch.equal(ppo_weights[name], sft_weights[name]) for name in sft_weights)  # PPO moved it
    rows = [json.loads(line) for line in (runs / "gpu" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "objective/kl" in row] == [1, 2]  # both PPO steps ran and logged
