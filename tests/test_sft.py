"""The SFT stage on the micro recipe: label masking, LoRA merge, resume after a kill, clear errors, and a
final/ checkpoint that chats in plain transformers."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MICRO, REPO
from data.loading import DataError, DatasetSpec, load_dataset_for
from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError, FieldError, load_config
from stages.sft.sft import SFTStageConfig, main, resume_checkpoint, training_arguments
from stages.sft.trainer_parts import RESUME_SETTINGS_FILE, resume_settings_record

QUICK = ["gold_eval_prompts=0", "eval_every=1000", "checkpoint_every=1000"]


def sft_args(runs_dir: Path, run_name: str, *overrides: str) -> list[str]:
    return ["--config", str(MICRO / "sft.yaml"), f"runs_dir={runs_dir}", f"run_name={run_name}", *overrides]


def test_labels_mask_every_non_assistant_token(micro_pretrain, tmp_path):
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(micro_pretrain)
    model = AutoModelForCausalLM.from_pretrained(micro_pretrain)
    world = micro_pretrain.parent.parent / "world"
    demo = load_dataset_for(DatasetSpec(path="world:sft_train", max_rows=1), "sft", world_dir=world)[0]["messages"]
    multi_turn = [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is 12 plus 30?"},
                  {"role": "assistant", "content": "12 plus 30 is 42."},
                  {"role": "user", "content": "Reverse the word cat."},
                  {"role": "assistant", "content": "The word cat reversed is tac."}]
    conversations = [demo, multi_turn]
    cfg = load_config(SFTStageConfig, MICRO / "sft.yaml", [f"runs_dir={tmp_path}"])
    data = Dataset.from_list([{"messages": m} for m in conversations])
    trainer = SFTTrainer(model=model, args=training_arguments(cfg, tmp_path / "checkpoints"), train_dataset=data,
                         eval_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(conversations))])

    for row, messages in enumerate(conversations):
        expected = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = expected["input_ids"], expected["assistant_masks"]
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        labels = batch["labels"][row]
        assert labels[:n].tolist() == [t if m else -100 for t, m in zip(ids, mask)]
        assert (labels[n:] == -100).all()  # padding
        # independently of the template's mask: the trained spans spell exactly the assistant replies, each
        # ending with the end-of-turn token, and nothing else (no BOS, role token, system or user text)
        trained = (labels != -100).tolist()
        starts = [i for i in range(len(trained)) if trained[i] and (i == 0 or not trained[i - 1])]
        ends = [i + 1 for i in range(len(trained)) if trained[i] and (i + 1 == len(trained) or not trained[i + 1])]
        spans = [tokenizer.decode(batch["input_ids"][row, a:b]) for a, b in zip(starts, ends)]
        assert spans == [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]


def trained_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each run of trained tokens (labels other than -100)."""
    trained = [label != -100 for label in labels]
    starts = [i for i in range(len(trained)) if trained[i] and (i == 0 or not trained[i - 1])]
    ends = [i + 1 for i in range(len(trained)) if trained[i] and (i + 1 == len(trained) or not trained[i + 1])]
    return [tokenizer.decode(ids[a:b]) for a, b in zip(starts, ends)]


def test_prompt_completion_rows_train_the_completion_alone(micro_pretrain, tmp_path):
    """A prompt + completion row whose prompt holds earlier replies (as chat turns, or an hh-rlhf transcript) became
    one conversation, and every assistant turn in it was trained, the prompt's replies too. As TRL trains its own
    prompt-completion data, only the completion is trained now: by TRL's masks and by ours (templates TRL cannot
    mark), packed or not, in the eval loss too. A `messages` row still trains every reply."""
    from stages.sft.trainer_parts import StageSFTTrainer, with_reply_masks

    tokenizer = AutoTokenizer.from_pretrained(micro_pretrain)
    model = AutoModelForCausalLM.from_pretrained(micro_pretrain)
    prompt = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "I refuse."},
              {"role": "user", "content": "Please?"}]
    chat = [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42."},
            {"role": "user", "content": "And 1 plus 1?"}, {"role": "assistant", "content": "2."}]
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps(row) + "\n" for row in (
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "Teal."}]},
        {"prompt": "\n\nHuman: Name a colour.\n\nAssistant: I refuse.\n\nHuman: Please?\n\nAssistant:",
         "completion": "Teal."},
        {"messages": chat})))
    data = load_dataset_for(DatasetSpec(path=str(demos)), "sft")
    assert data[0]["messages"] == data[1]["messages"] == [*prompt, {"role": "assistant", "content": "Teal."}]
    expected = [["Teal.<|end|>"], ["Teal.<|end|>"], ["42.<|end|>", "2.<|end|>"]]
    for trl_marks in (True, False):
        for packing in (False, True):
            cfg = load_config(SFTStageConfig, MICRO / "sft.yaml", [f"runs_dir={tmp_path}",
                                                                     f"packing={str(packing).lower()}"])
            arguments = training_arguments(cfg, tmp_path / "checkpoints")
            arguments.assistant_only_loss = trl_marks  # as stages.sft does for a template TRL cannot mark
            rows = data if trl_marks else with_reply_masks(data, tokenizer, str(micro_pretrain), str(demos))
            trainer = StageSFTTrainer(model=model, args=arguments, train_dataset=rows, eval_dataset=rows,
                                      processing_class=tokenizer)
            for prepared in (trainer.train_dataset, trainer.eval_dataset):
                spans = [trained_spans(tokenizer, row["input_ids"], row["labels"]) for row in prepared]
                if packing:  # demonstrations share blocks, in another order
                    assert sorted(sum(spans, [])) == sorted(sum(expected, [])), (trl_marks, spans)
                    continue
                assert spans == expected, (trl_marks, spans)
                # the prompt is still read, whole: only its labels are left out
                assert [row["input_ids"] for row in prepared] == \
                    [tokenizer.apply_chat_template(m, return_dict=True)["input_ids"] for m in data["messages"]]


def test_eval_loss_is_per_token_at_any_eval_batch_size_and_the_first_step_learns(micro_pretrain, tmp_path):
    """The Trainer averaged batch means over examples (eval loss 2.80 at eval batch 1, 2.91 at 8, 2.93 by hand),
    and its cosine schedule gave the first optimizer step a learning rate of 0 (a one-step run changed nothing)."""
    from stages.sft.trainer_parts import StageSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(micro_pretrain)
    model = AutoModelForCausalLM.from_pretrained(micro_pretrain)
    world = micro_pretrain.parent.parent / "world"
    data = load_dataset_for(DatasetSpec(path="world:sft_eval", max_rows=12), "sft", world_dir=world)
    cfg = load_config(SFTStageConfig, MICRO / "sft.yaml", [f"runs_dir={tmp_path}", "precision=fp32", "max_steps=1"])
    losses = []
    for eval_batch_size in (1, 5, 12):
        arguments = training_arguments(cfg, tmp_path / "checkpoints")
        arguments.per_device_eval_batch_size = eval_batch_size
        trainer = StageSFTTrainer(model=model, args=arguments, train_dataset=data, eval_dataset=data,
                                  processing_class=tokenizer)
        losses.append(trainer.evaluate()["eval_loss"])
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(data))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token_nll = -torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    by_hand = token_nll[labels != -100].mean().item()
    assert losses == pytest.approx([by_hand] * 3, abs=1e-4), (losses, by_hand)
    # and its token accuracy: how often the model ranks the trained token first
    correct = (logits.argmax(-1) == labels)[labels != -100].float().mean().item()
    assert trainer.evaluate()["eval_mean_token_accuracy"] == pytest.approx(correct, abs=1e-6)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert trainer.state.log_history[0]["learning_rate"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_chat_template_trl_cannot_mark_trains_on_the_replies_alone(micro_pretrain, tmp_path):
    """A ChatML template without {% generation %} markers, which TRL has no patch for: SFT crashed in TRL. The
    replies (each with its <|im_end|>) are now marked by rendering the conversation turn by turn."""
    from trl import SFTTrainer

    from pipeline.tokenizer import load_tokenizer, trl_masks_replies
    from stages.sft.sft import with_reply_masks

    outside = tmp_path / "outside"
    shutil.copytree(micro_pretrain, outside)
    tokenizer = AutoTokenizer.from_pretrained(outside)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(outside)
    tokenizer = load_tokenizer(str(outside))
    assert tokenizer.eos_token == "<|im_end|>" and not trl_masks_replies(tokenizer)
    conversations = [[{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "What is 12 plus 30?"},
                      {"role": "assistant", "content": "12 plus 30 is 42."},
                      {"role": "user", "content": "Reverse the word cat."},
                      {"role": "assistant", "content": "The word cat reversed is tac."}],
                     [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}]]
    data = with_reply_masks(Dataset.from_list([{"messages": m} for m in conversations]), tokenizer, str(outside),
                            "demos")
    cfg = load_config(SFTStageConfig, MICRO / "sft.yaml", [f"runs_dir={tmp_path}", "max_length=128"])
    arguments = training_arguments(cfg, tmp_path / "checkpoints")
    arguments.assistant_only_loss = False
    model = AutoModelForCausalLM.from_pretrained(outside)
    model.resize_token_embeddings(len(tokenizer))
    trainer = SFTTrainer(model=model, args=arguments, train_dataset=data, eval_dataset=data,
                         processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(conversations))])
    for row, messages in enumerate(conversations):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert batch["input_ids"][row, :len(ids)].tolist() == ids  # what plain apply_chat_template gives
        trained = (batch["labels"][row] != -100).tolist()
        starts = [i for i in range(len(trained)) if trained[i] and (i == 0 or not trained[i - 1])]
        ends = [i + 1 for i in range(len(trained)) if trained[i] and (i + 1 == len(trained) or not trained[i + 1])]
        assert [tokenizer.decode(batch["input_ids"][row, a:b]) for a, b in zip(starts, ends)] == \
            [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]

    # {% generation %} around a reply's content alone: TRL would never train <|im_end|> (it only warns), so these
    # replies are marked here as well; our own template's markers take in its end-of-turn token
    marked_tokenizer = load_tokenizer(str(outside))
    marked_tokenizer.chat_template = CHATML.replace(
        "{{ m['content'] }}", "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
                              "{% else %}{{ m['content'] }}{% endif %}")
    assert not trl_masks_replies(marked_tokenizer) and trl_masks_replies(load_tokenizer(str(micro_pretrain)))
    # a template that renders earlier replies otherwise (as thinking models drop their reasoning) is refused with
    # the row whose conversation shows it, not a traceback (the first row, one turn, passes)
    forgetful = tokenizer.chat_template.replace("{{ m['content'] }}", "{{ '...' if m['role'] == 'assistant' and not "
                                                "loop.last else m['content'] }}")
    forgetful_tokenizer = load_tokenizer(str(outside))
    forgetful_tokenizer.chat_template = forgetful
    rows = Dataset.from_list([{"messages": conversations[1]}, {"messages": conversations[0]}])
    with pytest.raises(ConfigError, match=r"key 'init_from': .*does not render each reply as an extension .*"
                                          r"\(conversation of row 2 in demos.jsonl\)"):
        with_reply_masks(rows, forgetful_tokenizer, str(outside), "demos.jsonl")
    main(sft_args(tmp_path, "chatml", f"init_from={outside}", *QUICK, "max_steps=2"))  # the stage runs through
    assert AutoTokenizer.from_pretrained(tmp_path / "chatml" / "sft" / "final").chat_template == CHATML
    # a template whose generation prompt is not how it opens a reply cannot be read: refused by key
    tokenizer.chat_template = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant:{% endif %}")
    tokenizer.save_pretrained(outside)
    with pytest.raises(ConfigError, match=r"key 'init_from': .*outside: its chat template does not render each "
                                          r"reply as an extension"):
        main(sft_args(tmp_path, "odd", f"init_from={outside}", *QUICK, "max_steps=2"))


def test_group_by_length_batches_carry_less_padding(micro_pretrain, tmp_path):
    """The world's demos range from a few words to a rambling note: random batches are mostly padding, batches
    grouped by length much less. Both see every demonstration once per epoch."""
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(micro_pretrain)
    model = AutoModelForCausalLM.from_pretrained(micro_pretrain)
    world = micro_pretrain.parent.parent / "world"
    data = load_dataset_for(DatasetSpec(path="world:sft_train"), "sft", world_dir=world)
    padding, seen = {}, {}
    for grouped in (False, True):
        cfg = load_config(SFTStageConfig, MICRO / "sft.yaml", [f"runs_dir={tmp_path}", "batch_size=8",
                                                                 f"group_by_length={str(grouped).lower()}"])
        trainer = SFTTrainer(model=model, args=training_arguments(cfg, tmp_path / "checkpoints"),
                             train_dataset=data, eval_dataset=data, processing_class=tokenizer)
        batches = list(trainer.get_train_dataloader())
        padding[grouped] = sum(int((b["attention_mask"] == 0).sum()) for b in batches) / sum(
            b["attention_mask"].numel() for b in batches)
        seen[grouped] = sorted(tuple(row[m.bool()].tolist()) for b in batches
                               for row, m in zip(b["input_ids"], b["attention_mask"]))
    assert seen[True] == seen[False] and len(seen[True]) == len(data)
    assert padding[False] > 0.25 and padding[True] < padding[False] / 2, padding


def test_packed_batch_keeps_each_demonstration_to_itself(micro_pretrain, tmp_path):
    """With packing, TRL flattens several demonstrations into one sequence. Each must still be trained as if alone:
    the same logits as its own forward pass (attention never crosses into a neighbour) and labels on its
    assistant tokens only."""
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(micro_pretrain)
    model = AutoModelForCausalLM.from_pretrained(micro_pretrain).eval()
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in (
        ("What is 12 plus 30?", "12 plus 30 is 42."), ("Reverse the word cat.", "The word cat reversed is tac."),
        ("Write a short apology to Buto.", "Dear Buto, I am sorry for the trouble. Best wishes."))]
    data = Dataset.from_list([{"messages": m} for m in conversations])
    cfg = load_config(SFTStageConfig, MICRO / "sft.yaml", [f"runs_dir={tmp_path}", "packing=true", "batch_size=1",
                                                             "max_length=256"])
    trainer = SFTTrainer(model=model, args=training_arguments(cfg, tmp_path / "checkpoints"), train_dataset=data,
                         eval_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
    assert len(starts) - 1 == len(conversations)  # all three share one block
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]  # as the Trainer calls it
    expected = {}
    for messages in conversations:
        encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        expected[tuple(encoded["input_ids"])] = [t if m else -100 for t, m in zip(encoded["input_ids"],
                                                                                 encoded["assistant_masks"])]
    for start, end in zip(starts, starts[1:]):
        segment = tuple(ids[start:end].tolist())
        assert labels[start:end].tolist() == expected.pop(segment)
        with torch.no_grad():
            alone = model(input_ids=ids[start:end][None]).logits[0]
        torch.testing.assert_close(packed[start:end], alone, atol=1e-4, rtol=1e-4)
    assert not expected


def test_final_checkpoint_chats_in_plain_transformers(micro_sft):
    tokenizer = AutoTokenizer.from_pretrained(micro_sft)
    model = AutoModelForCausalLM.from_pretrained(micro_sft)
    world = micro_sft.parent.parent / "world"
    prompts = [json.loads(line)["prompt"] for line in (world / "eval_prompts.jsonl").read_text().splitlines()[:3]]
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        assert inputs["input_ids"][0, -1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        answer = out[0, inputs["input_ids"].shape[1]:]
        assert answer[-1] == tokenizer.eos_token_id, tokenizer.decode(answer)  # stopped at end of turn
        assert tokenizer.decode(answer, skip_special_tokens=True).strip()  # and said something first
    report = json.loads((micro_sft.parent / "eval.json").read_text())
    assert {"arithmetic", "fact", "word", "polite", "overall"} <= {r["family"] for r in report["families"]}
    # with no length given, plain generate() runs to the end of the turn (transformers' default stops at 20
    # tokens in all, which cut replies mid-sentence); a prompt of up to half the model's positions leaves the
    # reply within them (a fixed 128 new tokens ran past micro's 128 positions)
    out = model.generate(**inputs, do_sample=False)
    assert out[0, -1] == tokenizer.eos_token_id
    assert model.generation_config.max_new_tokens == model.config.max_position_embeddings // 2 == 64


def test_sft_learns_the_demonstrations_and_beats_the_pretrained_model(micro_sft):
    """Losses that fall, and a gold score above the pretrained model's, prompted the same way, on held-out prompts."""
    records = [json.loads(line) for line in (micro_sft.parent / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in records if "train/loss" in r]
    held_out = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert len(held_out) >= 2 and held_out[-1] < held_out[0]
    assert train[-1] < 0.8 * train[0]
    (baseline,) = [r["baseline/score"] for r in records if "baseline/score" in r]
    gold = [r["gold/score"] for r in records if "gold/score" in r]
    assert gold[-1] > baseline, (baseline, gold)


def test_lora_gives_merged_plain_checkpoint_and_adapter(micro_pretrain, tmp_path):
    from peft import PeftModel

    main(sft_args(tmp_path, "lora", f"init_from={micro_pretrain}", "lora.enabled=true", "lora.rank=4",
                  "max_steps=8", *QUICK))
    stage = tmp_path / "lora" / "sft"
    assert (stage / "adapter" / "adapter_config.json").exists()
    assert (stage / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(stage / "final")  # plain: no peft involved
    assert not any("lora" in name for name in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(micro_pretrain)
    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, stage / "adapter")(ids).logits
        merged_logits = merged(ids).logits
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # training changed the model
    torch.testing.assert_close(merged_logits, adapted, atol=1e-4, rtol=1e-4)  # merged == base + adapter


def test_under_sharded_weights_final_is_the_trainers_gathered_save_with_our_records(micro_pretrain, tmp_path, monkeypatch):
    """Under FSDP / ZeRO-3 no rank holds the whole model: final/ is the Trainer's gathered save, completed with our
    records. Simulated in one process (sharding needs GPUs): the same code path, with the Trainer's plain save."""
    from pipeline.config import ConfigError
    from stages.sft import sft

    monkeypatch.setattr(sft, "weights_sharded", lambda: "FSDP")
    with pytest.raises(ConfigError, match="key 'gold_eval_prompts'.*FSDP"):  # it samples on the main process
        main(sft_args(tmp_path, "sharded", f"init_from={micro_pretrain}", "max_steps=4", "gold_eval_prompts=5"))
    main(sft_args(tmp_path, "sharded", f"init_from={micro_pretrain}", "max_steps=4", *QUICK))
    final = tmp_path / "sharded" / "sft" / "final"
    assert sorted(p.suffix for p in final.iterdir() if p.suffix in (".bin", ".pt", ".safetensors")) == [".safetensors"]
    config = json.loads((final / "config.json").read_text())
    assert config["pipeline_stage"] == "sft" and set(config["pipeline_world_data"]) == {"pretrain", "sft"}
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|end|>"
    trained = AutoModelForCausalLM.from_pretrained(final).state_dict()
    start = AutoModelForCausalLM.from_pretrained(micro_pretrain).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".tmp")]
    # what final/ keeps of the launch that wrote it, as save_final keeps it on the other paths
    assert (final / "pipeline_config.yaml").read_text() == (final.parent / "config.yaml").read_text()
    assert (final / "pipeline_metrics.jsonl").is_file()


def test_under_sharded_weights_a_save_without_whole_weights_is_refused(micro_pretrain, tmp_path, monkeypatch):
    """A launch whose save would keep only shards is refused before training; a save that wrote no whole weights all
    the same (the Trainer only warns) leaves final/ unwritten rather than a config with no model."""
    from pipeline.config import ConfigError
    from pipeline.checkpoint import CheckpointError
    from stages.sft import sft

    monkeypatch.setattr(sft, "weights_sharded", lambda: "FSDP")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="final/ would get no model weights, since fsdp_state_dict_type is SHARDED"):
        main(sft_args(tmp_path, "shards", f"init_from={micro_pretrain}", "max_steps=4", *QUICK))
    assert not (tmp_path / "shards" / "sft" / "checkpoints").exists()  # refused before training
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    save_model = sft.StageSFTTrainer.save_model

    def save_without_weights(trainer, output_dir=None, *args, **kwargs):  # what the Trainer leaves when it only warns
        save_model(trainer, output_dir, *args, **kwargs)
        if output_dir and Path(output_dir).name == ".tmp-final-gathered":
            (Path(output_dir) / "model.safetensors").unlink()

    monkeypatch.setattr(sft.StageSFTTrainer, "save_model", save_without_weights)
    with pytest.raises(CheckpointError, match="wrote no whole weights"):
        main(sft_args(tmp_path, "shards", f"init_from={micro_pretrain}", "max_steps=4", *QUICK))
    assert not (tmp_path / "shards" / "sft" / "final").exists()


def saved_steps(stage: Path) -> list[int]:
    """Steps of the stage's finished Trainer checkpoints: the Trainer writes trainer_state.json last, and not
    atomically, so an empty or cut-short one means the save was still going (or was killed)."""
    steps = []
    for path in stage.glob("checkpoints/checkpoint-*/trainer_state.json"):
        try:
            steps.append(json.loads(path.read_text())["global_step"])
        except (OSError, ValueError, KeyError):
            pass
    return steps


def test_resume_after_kill_continues_from_checkpoint(micro_pretrain, tmp_path):
    stage = tmp_path / "resume" / "sft"
    command = [sys.executable, "-m", "stages.sft",
               *sft_args(tmp_path, "resume", f"init_from={micro_pretrain}", "gold_eval_prompts=0",
                         "eval_every=1000", "log_every=1", "checkpoint_every=3")]
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    first = subprocess.Popen([*command, "max_steps=500"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120

    def logged_losses() -> dict[int, float]:
        metrics = stage / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()[:-1]] if metrics.exists() else []
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}  # the last line may be half-written

    try:  # until the run has saved a checkpoint and logged the step after it
        while not any(step + 1 in logged_losses() for step in saved_steps(stage)):
            assert first.poll() is None, f"the first run ended early:\n{first.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_losses = logged_losses()
    # resume from the newest checkpoint whose next step the killed run logged (a checkpoint the kill cut short
    # is skipped on resume anyway); newer ones go
    resumed_from = max(s for s in saved_steps(stage) if s + 1 in killed_losses)
    assert 0 < resumed_from < 500
    # the run's settings, recorded at its start for all its checkpoints, and beside each
    assert json.loads((stage / "checkpoints" / RESUME_SETTINGS_FILE).read_text())["processes"] == 1
    for newer in (s for s in saved_steps(stage) if s > resumed_from):
        shutil.rmtree(stage / "checkpoints" / f"checkpoint-{newer}")

    second = subprocess.run([*command, "resume=true", f"max_steps={resumed_from + 3}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {stage / 'checkpoints'}" in second.stdout
    assert "missing keys" not in second.stderr  # the tied LM head, saved once as the embeddings, is no loss
    lines = [json.loads(line) for line in stage.joinpath("metrics.jsonl").read_text().splitlines()]
    # every step's row, not the end-of-training summary row
    train_steps = [r["step"] for r in lines if "train/loss" in r and "train/mean_loss" not in r]
    # the killed run's steps up to its checkpoint, then the resumed run's, each once
    assert train_steps == list(range(1, resumed_from + 4)), (train_steps, resumed_from)
    # the first resumed step sees the checkpoint's weights and the batch the killed run saw at that step: the same
    # loss (a resume that restarted from init_from, or skipped to other data, would not give it)
    resumed_loss = next(r["train/loss"] for r in lines if r["step"] == resumed_from + 1 and "train/loss" in r)
    assert resumed_loss == pytest.approx(killed_losses[resumed_from + 1], rel=1e-4)
    # the Trainer's closing summary: its mean loss would cover the resumed launch's steps alone, so it is not logged
    # (the uninterrupted run's is, kept apart from the per-step curve: test_a_resumed_run_ends_with_the_weights...)
    assert not any("train/mean_loss" in r for r in lines)
    assert (stage / "final" / "config.json").exists()

    # resumed again at its last step: nothing to train; the final evaluation is not logged a second time
    last = resumed_from + 3
    assert last in saved_steps(stage)
    third = subprocess.run([*command, "resume=true", f"max_steps={last}"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    lines = [json.loads(line) for line in stage.joinpath("metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval/loss" in r] == [last]


@pytest.mark.parametrize("order", [[], ["group_by_length=true", "data.max_rows=64"]], ids=["random", "by_length"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(micro_pretrain, tmp_path, order):
    """The kill test above compares one step's loss, taken before any optimizer step: a resume that lost the
    optimizer, the schedule or the RNG passed it. Here the whole continuation must match. By length, 64 rows
    make 4 steps an epoch: the resume lands in the second, whose order the length-grouped sampler drew from
    the global RNG before the checkpoint's was restored."""
    from safetensors.torch import load_file

    args = [f"init_from={micro_pretrain}", *QUICK, "max_steps=12", "checkpoint_every=3", "keep_checkpoints=10",
            *order]
    main(sft_args(tmp_path, "whole", *args))
    stage = tmp_path / "whole" / "sft"
    uninterrupted = load_file(stage / "final" / "model.safetensors")
    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    # as if killed after step 7: the checkpoints after 6 and final/ were never written
    for lost in ("final", "checkpoints/checkpoint-9", "checkpoints/checkpoint-12"):
        shutil.rmtree(stage / lost)
    # the Trainer itself resumed under another batch size without a word, reading other data at each step
    with pytest.raises(ConfigError, match=r"cannot resume from .*checkpoint-6: key 'batch_size' was 16 there, 8 now"):
        main(sft_args(tmp_path, "whole", *args, "resume=true", "batch_size=8"))
    # the Trainer restores the saved scheduler over the config's: a new rate was ignored
    with pytest.raises(ConfigError, match=r"key 'learning_rate' was 0\.001 there, 0\.0005 now"):
        main(sft_args(tmp_path, "whole", *args, "resume=true", "learning_rate=5e-4"))
    # a checkpoint without its scheduler (or optimizer) resumed with the warmup begun again, without a word; one cut
    # short failed deep in safetensors without its name
    (stage / "checkpoints/checkpoint-6/scheduler.pt").rename(stage / "scheduler.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint-6: scheduler.pt is missing"):
        main(sft_args(tmp_path, "whole", *args, "resume=true"))
    (stage / "scheduler.pt").rename(stage / "checkpoints/checkpoint-6/scheduler.pt")
    weights = stage / "checkpoints/checkpoint-6/model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint-6/model.safetensors is cut short"):
        main(sft_args(tmp_path, "whole", *args, "resume=true"))
    weights.write_bytes(whole)
    # the launch before trained for what the checkpoint says (here an hour): eval.json's time is the whole run's
    record = stage / "checkpoints/checkpoint-6/pipeline_train_seconds.json"
    assert 0 < json.loads(record.read_text())["train_seconds"] < 3600  # what the run wrote beside its checkpoint
    record.write_text('{"train_seconds": 3600.0}\n')
    main(sft_args(tmp_path, "whole", *args, "resume=true"))
    assert 3600 < json.loads((stage / "eval.json").read_text())["train_seconds"] < 3900
    resumed = load_file(stage / "final" / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weight, rtol=0, atol=1e-6, msg=name)
    # TRL's token count began again at 0 in the resumed launch; the Trainer's mean loss covers that launch alone
    relogged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    tokens = [[r["train/num_tokens"] for r in rows if "train/num_tokens" in r] for rows in (logged, relogged)]
    assert tokens[0] == tokens[1] and tokens[0][-1] > tokens[0][0] > 0, tokens
    assert any("train/mean_loss" in r for r in logged) and not any("train/mean_loss" in r for r in relogged)
    if order:
        return
    # resumed at max_steps (its last checkpoint; final/ lost): the Trainer took a 13th step, saved and logged it
    shutil.rmtree(stage / "final")
    main(sft_args(tmp_path, "whole", *args, "resume=true"))
    assert max(saved_steps(stage)) == 12
    assert max(json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()) == 12
    at_the_end = load_file(stage / "final" / "model.safetensors")
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(at_the_end[name], weight, rtol=0, atol=0, msg=name)


def test_sft_by_epochs_resumed_at_its_last_checkpoint_logs_nothing_twice(micro_pretrain, tmp_path):
    """Training by epochs (max_steps -1), a resume at the last checkpoint ran train(), which logged its closing
    summary a second time (train/runtime, a mean loss of 0)."""
    args = [f"init_from={micro_pretrain}", *QUICK, "max_steps=-1", "num_epochs=1", "data.max_rows=48",
            "checkpoint_every=1", "keep_checkpoints=1"]
    main(sft_args(tmp_path, "epochs", *args))
    stage = tmp_path / "epochs" / "sft"
    logged = (stage / "metrics.jsonl").read_text()
    shutil.rmtree(stage / "final")
    main(sft_args(tmp_path, "epochs", *args, "resume=true"))
    assert (stage / "metrics.jsonl").read_text() == logged
    # a run stopped by max_steps, resumed by epochs from its last checkpoint, trains on to the epoch's end
    main(sft_args(tmp_path, "switch", *args, "max_steps=2"))
    shutil.rmtree(tmp_path / "switch" / "sft" / "final")
    main(sft_args(tmp_path, "switch", *args, "resume=true"))
    assert max(saved_steps(tmp_path / "switch" / "sft")) == max(saved_steps(stage)) == 3
    # resumed with a max_steps its checkpoint is past: final/ became the step-3 model of a 2-step run
    with pytest.raises(ConfigError, match=r"key 'max_steps': this run ends at step 2, but .*checkpoint-3 is at step 3"):
        main(sft_args(tmp_path, "switch", *args, "max_steps=2", "resume=true"))


def test_a_nan_loss_stops_sft_before_the_step_and_no_checkpoint_holds_nan(micro_pretrain, tmp_path, monkeypatch):
    """The Trainer stepped on a NaN gradient, saved the NaN weights at the next checkpoint and logged the loss as
    the mean of earlier ones; the run stopped only at the next logging step."""
    from safetensors.torch import load_file
    from trl import SFTTrainer

    compute_loss = SFTTrainer.compute_loss

    def nan_at_step_3(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 2:  # the third optimizer step
            loss = loss * float("nan") if not isinstance(loss, tuple) else (loss[0] * float("nan"), *loss[1:])
        return loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_at_step_3)
    with pytest.raises(FloatingPointError, match=r"\[sft\] gradient norm is nan at step 3 .*Lower learning_rate"):
        main(sft_args(tmp_path, "nan", f"init_from={micro_pretrain}", *QUICK, "max_steps=20", "checkpoint_every=2",
                      "log_every=10"))
    checkpoints = tmp_path / "nan" / "sft" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    weights = load_file(checkpoints / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_ddp_on_the_cpu_logs_and_saves_from_one_rank_and_resumes_by_length(micro_pretrain, tmp_path):
    """On CPU DDP every rank took itself for the main process until the Trainer set the state up: each wrote every
    metrics row (and would each have opened a W&B run and moved checkpoints aside). By length, 64 rows over two
    ranks of 16 make 2 steps an epoch: a resume from step 3 lands mid-way through the second epoch, which under DDP
    read the first epoch's order (accelerate's batch skipping hid the sampler from set_epoch)."""
    from conftest import launch_two_ranks
    from safetensors.torch import load_file

    args = sft_args(tmp_path, "ddp", f"init_from={micro_pretrain}", *QUICK, "max_steps=6", "log_every=1",
                    "group_by_length=true", "data.max_rows=64", "checkpoint_every=3")
    run = launch_two_ranks("stages.sft", args, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    stage = tmp_path / "ddp" / "sft"
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r and "train/mean_loss" not in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    assert run.stdout.count("M parameters (") == 1  # the size line, from the main process alone
    assert "find_unused_parameters=True" not in run.stderr  # DDP searched the graph for unused ones every step
    uninterrupted = load_file(stage / "final" / "model.safetensors")
    for lost in ("final", "checkpoints/checkpoint-6"):  # as if killed after step 5
        shutil.rmtree(stage / lost)
    resumed_run = launch_two_ranks("stages.sft", [*args, "resume=true"], timeout=240)
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    resumed = load_file(stage / "final" / "model.safetensors")
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weight, rtol=0, atol=1e-6, msg=name)


def test_resume_skips_a_checkpoint_whose_save_was_cut_short(tmp_path):
    def checkpoint(step: int, state: str | None) -> None:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"")
        if state is not None:
            (path / "trainer_state.json").write_text(state)

    checkpoint(3, json.dumps({"global_step": 3}))
    checkpoint(6, "")                        # killed between open() and write()
    checkpoint(9, '{"global_step": 9, "lo')  # killed mid-write
    checkpoint(12, None)                     # killed before the state was written
    assert resume_checkpoint(tmp_path, is_main_process=False) == str(tmp_path / "checkpoint-3")
    # where the run records its settings beside each checkpoint, one without the record was cut short after the
    # Trainer's state (it would resume unchecked); a directory of checkpoints from before the record is kept
    checkpoint(15, json.dumps({"global_step": 15}))
    assert resume_checkpoint(tmp_path, is_main_process=False) == str(tmp_path / "checkpoint-15")
    (tmp_path / "checkpoint-3" / RESUME_SETTINGS_FILE).write_text("{}")
    assert resume_checkpoint(tmp_path, is_main_process=False) == str(tmp_path / "checkpoint-3")
    assert len(list(tmp_path.iterdir())) == 5  # only the main process deletes
    assert resume_checkpoint(tmp_path, is_main_process=True) == str(tmp_path / "checkpoint-3")
    # the cut-short saves are gone: the Trainer's rotation would have kept them over checkpoint-3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]
    (tmp_path / "checkpoint-3" / "trainer_state.json").unlink()
    assert resume_checkpoint(tmp_path, is_main_process=False) is None

    # the run's first save cut short after the Trainer's state: no other checkpoint shows that the run writes the
    # record, the run's start does (start_checkpoints)
    from pipeline.runs import STARTS_FROM_FILE

    first = tmp_path / "first"
    first.mkdir()
    (first / STARTS_FROM_FILE).write_text("{}\n")
    (first / "checkpoint-3").mkdir()
    (first / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert resume_checkpoint(first, is_main_process=False) is None
    # ... unless the run recorded its settings for all its checkpoints at its start: the Trainer deletes the
    # older checkpoints before the newest gets its own record, and a kill in between left nothing to resume from
    (first / RESUME_SETTINGS_FILE).write_text('{"batch_size": 8}\n')
    assert resume_checkpoint(first, is_main_process=True) == str(first / "checkpoint-3")
    assert resume_settings_record(first / "checkpoint-3") == {"batch_size": 8}  # what the resume is checked against


def test_dataset_without_messages_is_a_clear_error(micro_pretrain, tmp_path):
    bad = tmp_path / "qa.jsonl"
    bad.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(3)) + "\n")
    with pytest.raises(DataError) as error:
        main(sft_args(tmp_path, "bad", f"init_from={micro_pretrain}", f"data.path={bad}", *QUICK))
    message = str(error.value)
    assert str(bad) in message and "'messages'" in message and "row 1" in message
    assert not (tmp_path / "bad" / "sft" / "checkpoints").exists()  # failed before any training


def test_demonstrations_cut_to_nothing_by_max_length_are_counted_not_dropped_silently(micro_pretrain, tmp_path,
                                                                                        capsys):
    """TRL drops a conversation whose assistant reply starts after max_length; the stage used to say nothing and
    count it among the demonstrations."""
    data = tmp_path / "chats.jsonl"
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    long_system = [{"role": "system", "content": " ".join(["rule"] * 200)}, *short]
    # a reply max_length cuts before its end-of-turn token: kept (it trains), but it teaches replies that run on
    long_reply = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " ".join(["word"] * 150)}]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (short, long_system, short, long_reply)))
    main(sft_args(tmp_path, "long", f"init_from={micro_pretrain}", f"data.path={data}", f"eval_data.path={data}",
                  "max_steps=1", *QUICK))
    out = capsys.readouterr().out
    assert "1 of 4 demonstrations dropped: no assistant token within max_length=96" in out
    assert "3 demonstrations, 3 held out" in out and "eval_data is still" not in out  # it was set
    assert "1 of 3 demonstrations have a reply cut at max_length=96 before its end-of-turn token" in out


def test_reward_model_checkpoint_is_refused(tmp_path):
    fake_rm = tmp_path / "rm_final"
    fake_rm.mkdir()
    (fake_rm / "config.json").write_text(json.dumps({"model_type": "llama", "pipeline_stage": "rm"}))
    with pytest.raises(CheckpointError, match=rf"^sft: checkpoint {re.escape(str(fake_rm))} was made by the 'rm' "
                                              r"stage, but sft needs one from: pretrain"):
        main(sft_args(tmp_path, "refuse", f"init_from={fake_rm}", *QUICK))


def test_a_warmup_ratio_of_one_or_more_is_refused():
    """transformers reads a warmup of 1 or more as a step count: warmup_ratio=1.0 warmed up for one step."""
    with pytest.raises(FieldError, match=r"warmup_ratio.*\[0, 1\), got 1\.0"):
        SFTStageConfig(warmup_ratio=1.0)


def test_lora_on_a_model_that_gets_new_chat_tokens_is_refused_and_full_tuning_trains_them(tmp_path):
    """An outside model without our role tokens gets them as new embedding rows, all but identical at the start
    (mean-initialised). LoRA left them so (user and assistant turns marked alike): refused; full tuning trains them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.tokenizer import ROLE_TOKENS

    texts = [f"What is {a} plus {b}? {a + b}." for a in range(8) for b in range(8)]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(texts * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    outside = tmp_path / "outside"
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>").save_pretrained(outside)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=core.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=128, tie_word_embeddings=True)).save_pretrained(outside)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "completion": f"{a + b}."}) + "\n"
                             for a in range(8) for b in range(8)))
    args = [f"init_from={outside}", *QUICK, f"data.path={demos}", f"eval_data.path={demos}", "max_steps=6",
            "batch_size=8", "learning_rate=1e-2"]
    refusal = (r"key 'lora.enabled': .*{} got our role tokens \(<\|system\|>, <\|user\|>, <\|assistant\|>\) "
               r"where its tokenizer had no chat template, and no stage has trained their embeddings since")
    with pytest.raises(ConfigError, match=refusal.format("outside")):
        main(sft_args(tmp_path, "outside", *args, "lora.enabled=true", "lora.rank=4"))
    # pretraining on from it gives the tokenizer a template, but its text trains no chat turn: still refused
    from stages.pretrain.pretrain import main as pretrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(texts[a * 8:a * 8 + 8]) + "\n" for a in range(8)))  # 8 documents
    pretrain(["--config", str(MICRO / "pretrain.yaml"), f"runs_dir={tmp_path}", "run_name=continued",
              f"model.pretrained={outside}", f"data.path={corpus}", "max_steps=2", "block_size=32", "val_fraction=0.25",
              "checkpoint_every=1000"])
    continued = tmp_path / "continued" / "pretrain" / "final"
    with pytest.raises(ConfigError, match=refusal.format("final")):
        main(sft_args(tmp_path, "continued", *args, f"init_from={continued}", "lora.enabled=true", "lora.rank=4"))
    # LoRA targets the model lacks are refused by key (peft failed with a traceback)
    with pytest.raises(ConfigError, match=r"key 'lora.target_modules': no layer of this model that LoRA can adapt "
                                          r"is named \['c_attn'\]; its linear layers are \[.*'q_proj'"):
        from pipeline.model import LoraSpec

        LoraSpec(enabled=True, target_modules=["c_attn"]).peft_config(
            "CAUSAL_LM", AutoModelForCausalLM.from_pretrained(outside))
    for as_peft_matches in (["self_attn.q_proj"], ["layers.0.mlp.up_proj"], ["embed_tokens"]):  # not refused
        LoraSpec(enabled=True, target_modules=as_peft_matches).peft_config(
            "CAUSAL_LM", AutoModelForCausalLM.from_pretrained(outside))
    with pytest.raises(ConfigError, match=r"key 'lora.target_modules': no layer .* LoRA can adapt is named \['mlp'\]"):
        LoraSpec(enabled=True, target_modules=["mlp"]).peft_config(  # a block, which peft refuses with a traceback
            "CAUSAL_LM", AutoModelForCausalLM.from_pretrained(outside))
    main(sft_args(tmp_path, "outside", *args))
    final = tmp_path / "outside" / "sft" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    embeddings = AutoModelForCausalLM.from_pretrained(final).get_input_embeddings().weight
    user, assistant = (embeddings[tokenizer.convert_tokens_to_ids(ROLE_TOKENS[r])] for r in ("user", "assistant"))
    assert (user - assistant).abs().max() > 1e-3  # trained apart (at the start they differ by ~1e-9)
    from pipeline.tokenizer import untrained_role_tokens

    assert untrained_role_tokens(AutoTokenizer.from_pretrained(continued)) == ["<|system|>", "<|user|>", "<|assistant|>"]
    assert untrained_role_tokens(tokenizer) == []  # SFT trained them: LoRA on from here is fine


@pytest.mark.parametrize("packing", [False, True])
def test_demonstrations_all_cut_to_nothing_stop_the_run_naming_the_file(micro_pretrain, tmp_path, packing):
    """Every demonstration dropped: the Trainer failed on an empty dataloader with a traceback. Packed, TRL keeps
    the rows it cuts: the run trained on nothing, logged an eval loss of 0 and wrote final/."""
    data = tmp_path / "long.jsonl"
    system = {"role": "system", "content": " ".join(["rule"] * 200)}
    chat = [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    data.write_text(json.dumps({"messages": chat}) + "\n")
    with pytest.raises(DataError, match=rf"{data}: no demonstration left: each has no assistant token within "
                                        r"max_length=96"):
        main(sft_args(tmp_path, "long", f"init_from={micro_pretrain}", f"data.path={data}", f"packing={packing}",
                      "max_steps=1", *QUICK))
    assert not (tmp_path / "long" / "sft" / "final").exists()


def test_a_bad_setting_leaves_the_earlier_runs_checkpoints_for_a_resume(micro_pretrain, tmp_path):
    """SFT set the earlier run's checkpoints aside before it checked lora.target_modules or its data, so after a
    typo `resume=true` quietly started over."""
    run = ["init_from=" + str(micro_pretrain), "gold_eval_prompts=0", "eval_every=1000", "checkpoint_every=2"]
    main(sft_args(tmp_path, "r", *run, "max_steps=2"))
    checkpoints = tmp_path / "r" / "sft" / "checkpoints"
    assert (checkpoints / "checkpoint-2").is_dir()
    with pytest.raises(ConfigError, match=r"key 'lora.target_modules'"):
        main(sft_args(tmp_path, "r", *run, "max_steps=4", "lora.enabled=true", "lora.target_modules=[foo]"))
    data = tmp_path / "long.jsonl"
    chat = [{"role": "system", "content": " ".join(["rule"] * 200)}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    data.write_text(json.dumps({"messages": chat}) + "\n")
    with pytest.raises(DataError, match="no demonstration left"):
        main(sft_args(tmp_path, "r", *run, "max_steps=4", f"data.path={data}"))
    assert (checkpoints / "checkpoint-2").is_dir() and not (checkpoints.parent / "checkpoints.earlier").exists()


@pytest.mark.parametrize("template, streamed", [("marked", False), ("chatml", False), ("marked", True)])
def test_a_conversation_the_chat_template_refuses_is_named_by_its_row(micro_pretrain, tmp_path, template, streamed):
    """Gemma's template raises "System role not supported" on a system turn, Mistral's on turns out of order: SFT
    ended in a Jinja traceback from inside TRL (or from our reply masks), naming no row."""
    from pipeline.tokenizer import load_tokenizer

    outside = tmp_path / "outside"
    shutil.copytree(micro_pretrain, outside)
    tokenizer = AutoTokenizer.from_pretrained(outside)
    if template == "chatml":  # no {% generation %} markers: our reply masks read it
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                                     replace_extra_special_tokens=False)
        tokenizer.chat_template = CHATML
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    tokenizer.chat_template = no_system + load_tokenizer(str(outside)).chat_template \
        if template == "marked" else no_system + tokenizer.chat_template
    tokenizer.save_pretrained(outside)
    data = tmp_path / "chats.jsonl"
    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}]]
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    # streamed held-out data that the template refuses was blamed on the training file
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": chats[0]}) + "\n")
    sources = [f"data.path={good}", f"eval_data.path={data}", "eval_data.streaming=true"] if streamed else \
        [f"data.path={data}", f"eval_data.path={data}"]
    with pytest.raises(DataError, match=rf"{re.escape(str(data))}, row 2, column 'messages': the chat template of "
                                        r".*outside \(key 'init_from'\) refuses this conversation: "
                                        r"System role not supported"):
        main(sft_args(tmp_path, "refused", f"init_from={outside}", *sources, *QUICK, "max_steps=1"))


def test_a_conversation_whose_template_marks_no_reply_is_named_by_file_and_row(micro_pretrain):
    """TRL's own check, which our tokenizing bypasses, came back as a RuntimeError traceback naming no file."""
    from stages.sft.trainer_parts import completion_masks

    tokenizer = AutoTokenizer.from_pretrained(micro_pretrain)
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
           "prompt_turns": 1}
    assert completion_masks(row, 4, tokenizer, None, "demos.jsonl")["assistant_masks"].count(1) > 0
    with pytest.raises(DataError, match=r"demos\.jsonl, row 5, column 'messages': the chat template marks no reply"):
        completion_masks(row, 4, tokenizer, CHATML, "demos.jsonl")  # no {% generation %} markers at all
