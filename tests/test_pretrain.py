"""The pretrain stage on `micro`: it learns, hands off a plain HF checkpoint, resumes, runs under DDP, logs to W&B."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import MICRO, REPO, launch_two_ranks, run_stage


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_losses(metrics_file: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["eval/loss"]) for m in read_metrics(metrics_file) if "eval/loss" in m]


def stage_env() -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def test_pretrain_loss_falls_and_beats_unigram(micro_pretrain: Path):
    metrics = micro_pretrain.parent / "metrics.jsonl"
    losses = eval_losses(metrics)
    assert len(losses) >= 2
    assert losses[-1][1] < losses[0][1], f"validation loss did not fall: {losses}"
    # the unigram entropy is printed and kept in the W&B summary; recompute it here from the corpus
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_pretrain)
    texts = [row["text"] for row in read_metrics(micro_pretrain.parents[1] / "world" / "pretrain.jsonl")]
    ids = [t for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in row]
    counts = torch.bincount(torch.tensor(ids)).double()
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * p.log()).sum())
    assert losses[-1][1] < unigram_entropy - 0.3, (losses[-1][1], unigram_entropy)


def test_sample_continuations_are_logged_whole_with_the_prompt_intact(micro_pretrain: Path):
    """A continuation decoded apart from its prompt lost its leading space ("48 minus 18" + " is" -> "18is")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_pretrain)
    model = AutoModelForCausalLM.from_pretrained(micro_pretrain).eval()
    tables = [m for m in read_metrics(micro_pretrain.parent / "metrics.jsonl") if m.get("table") == "eval/samples"]
    assert tables and tables[-1]["columns"] == ["prompt", "text"]
    spaced = 0
    for prompt, text in tables[-1]["rows"]:
        assert text.startswith(prompt) and len(text) > len(prompt), (prompt, text)
        with torch.no_grad():
            first = int(model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax())
        if tokenizer.convert_ids_to_tokens(first).startswith("Ġ"):  # greedy goes on with a new word: " is"
            spaced += 1
            assert text[len(prompt)] == " ", (prompt, text)
    assert spaced, "no sample went on with a new word: nothing was checked"


def test_final_loads_in_plain_transformers(micro_pretrain: Path, tmp_path: Path):
    """No project import: a fresh interpreter outside the repo loads and generates from final/."""
    script = textwrap.dedent(f"""
        import sys, json
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(micro_pretrain)!r})
        model = AutoModelForCausalLM.from_pretrained({str(micro_pretrain)!r})
        ids = tok("The word", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        project = [m for m in sys.modules if m.split(".")[0] in ("pipeline", "stages", "reward_model", "data")]
        print(json.dumps({{"text": tok.decode(out[0]), "template": tok.chat_template is not None,
                           "eos": tok.eos_token, "pad": tok.pad_token, "project_modules": project}}))
    """)
    env = {k: v for k, v in stage_env().items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["template"] and info["eos"] == "<|end|>" and info["pad"] == "<|pad|>"
    assert info["text"].startswith("The word")
    assert info["project_modules"] == []


def test_checkpoint_reload_generates_same_tokens(micro_pretrain: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import SamplingConfig, sample

    tokenizer = AutoTokenizer.from_pretrained(micro_pretrain)
    model = AutoModelForCausalLM.from_pretrained(micro_pretrain).eval()
    # the reloaded checkpoint continues the run's last evaluation prompts exactly as the trained model did in
    # memory: a save that dropped or mangled a weight would change these greedy continuations
    records = [json.loads(line) for line in (micro_pretrain.parent / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in records if r.get("table") == "eval/samples"][-1:]
    assert last["step"] == max(r["step"] for r in records)  # sampled from the weights final/ holds
    for prompt, text in last["rows"]:
        prompt_ids = tokenizer(prompt, return_tensors="pt")
        tokens = sample(model, prompt_ids["input_ids"], prompt_ids["attention_mask"],
                        SamplingConfig(max_new_tokens=24, temperature=0), tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert tokenizer.decode(torch.cat([prompt_ids["input_ids"][0], tokens[0]]), skip_special_tokens=True) == text
    # our KV-cache sampler agrees with transformers' greedy generate on an unpadded prompt
    single = tokenizer("The word", return_tensors="pt")
    ours = sample(model, single["input_ids"], single["attention_mask"], SamplingConfig(12, temperature=0),
                  tokenizer.eos_token_id, tokenizer.pad_token_id)
    ref = model.generate(**single, max_new_tokens=12, do_sample=False)[0, single["input_ids"].shape[1]:]
    n = min(len(ref), ours.shape[1])
    assert torch.equal(ours[0, :n], ref[:n])


def test_resume_after_sigkill_continues_and_matches(micro_pretrain: Path, tmp_path: Path):
    command = [sys.executable, "-m", "stages.pretrain", "--config", str(MICRO / "pretrain.yaml"),
               f"runs_dir={tmp_path}", "run_name=micro"]
    stage_dir = tmp_path / "micro" / "pretrain"
    first_checkpoint = stage_dir / "checkpoints" / "step_00000040"
    process = subprocess.Popen(command, cwd=REPO, env=stage_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not first_checkpoint.exists():
        assert process.poll() is None, f"stage exited early: {process.stderr.read()}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (stage_dir / "final").exists(), "the run finished before it could be killed"
    killed_at = max(m["step"] for m in read_metrics(stage_dir / "metrics.jsonl"))

    resumed = subprocess.run(command + ["resume=true"], cwd=REPO, env=stage_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stdout
    restart_step = int(re.search(r"resuming from step (\d+)", resumed.stdout).group(1))
    assert 40 <= restart_step <= killed_at, (restart_step, killed_at)
    # metrics.jsonl: the first run's rows up to the checkpoint, then the resumed run's, each step once (the steps
    # the killed run logged past its checkpoint are replayed, not duplicated)
    steps = [m["step"] for m in read_metrics(stage_dir / "metrics.jsonl") if "train/loss" in m]
    assert steps == sorted(set(steps)), steps
    assert min(steps) <= restart_step < max(steps), (steps, restart_step)

    resumed_loss = eval_losses(stage_dir / "metrics.jsonl")[-1][1]
    reference_loss = eval_losses(micro_pretrain.parent / "metrics.jsonl")[-1][1]
    assert abs(resumed_loss - reference_loss) / reference_loss < 0.01, (resumed_loss, reference_loss)
    # and the weights: a resume that restored them but lost the optimizer's moments or the data position would
    # drift further than the uninterrupted run's own run-to-run noise
    from safetensors.torch import load_file

    resumed_weights = load_file(stage_dir / "final" / "model.safetensors")
    reference_weights = load_file(micro_pretrain / "model.safetensors")
    for name, tensor in reference_weights.items():  # equal to the last bit on one machine
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-3, msg=name)

    # a finished run trained for longer goes on from its last step (it went back to the checkpoint before it and
    # trained those steps again)
    trained = json.loads((stage_dir / "eval.json").read_text())["train_seconds"]
    longer = subprocess.run(command + ["resume=true", "max_steps=125", "eval_every=5"], cwd=REPO, env=stage_env(),
                            capture_output=True, text=True, timeout=300)
    assert longer.returncode == 0, longer.stderr
    assert "resuming from step 120" in longer.stdout, longer.stdout
    # the training time is the whole run's, not that of the five steps of this launch
    assert json.loads((stage_dir / "eval.json").read_text())["train_seconds"] > trained


def test_ddp_two_ranks_identical_parameters_and_equal_to_one_process(tmp_path: Path):
    """Two ranks of 8 blocks each train exactly as one process with batches of 16: rank r takes the r-th half of
    the one-process batch, and DDP averages their gradients. fp32, so the two differ only by summation order."""
    env = {**stage_env(), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    settings = ["--config", str(MICRO / "pretrain.yaml"), f"runs_dir={tmp_path}", "max_steps=12",
                "checkpoint_every=6", "eval_every=6", "precision=fp32"]
    result = launch_two_ranks("stages.pretrain", [*settings, "run_name=ddp", "batch_size=8"])
    assert result.returncode == 0, result.stderr[-3000:]
    fingerprints = dict(re.findall(r"rank (\d+) parameter fingerprint (\w+)", result.stdout))
    assert set(fingerprints) == {"0", "1"}, result.stdout
    assert fingerprints["0"] == fingerprints["1"]
    stage_dir = tmp_path / "ddp" / "pretrain"
    steps = [m["step"] for m in read_metrics(stage_dir / "metrics.jsonl") if "train/loss" in m]
    assert steps == sorted(set(steps)), "metrics were written by more than one rank"
    assert [p.name for p in stage_dir.iterdir() if p.name.startswith(".tmp")] == []
    assert (stage_dir / "final" / "model.safetensors").exists()

    single = subprocess.run([sys.executable, "-m", "stages.pretrain", *settings, "run_name=one", "batch_size=16"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    from safetensors.torch import load_file

    ddp, one = (load_file(tmp_path / run / "pretrain" / "final" / "model.safetensors") for run in ("ddp", "one"))
    for name, tensor in one.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=0, atol=2e-4, msg=name)


def read_wandb_records(path: Path) -> list:
    """Decode an offline run file: a 7-byte header, then LevelDB-log records (32 KiB blocks) of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, pending = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):  # FIRST, MIDDLE
            pending += chunk
        else:
            break
    return records


def test_wandb_offline_logs_metrics_group_and_job_type(tmp_path: Path, monkeypatch):
    from stages.pretrain.pretrain import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_stage(main, "pretrain.yaml", tmp_path, "max_steps=10", "eval_every=5", "log_every=5", "peak_flops=1e12",
              run_name="wb")
    import wandb

    wandb.teardown()  # wandb-core writes the run file asynchronously; wait for it to finish
    (run_file,) = (tmp_path / "wb" / "pretrain" / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.time() + 30
    while True:
        records = read_wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            break
        time.sleep(0.5)
    logged = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history"
              for item in r.history.item}
    for key in ("train/loss", "eval/loss", "perf/tokens_per_sec", "perf/mfu"):
        assert key in logged, f"{key} not logged; history has {sorted(logged)}"
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
    assert run.run_group == "wb" and run.job_type == "pretrain"
    config = {item.key: item.value_json for item in run.config.update}
    assert config["max_steps"] == "10"


@pytest.mark.parametrize("key", ["model.pretrained", "init_from"])  # init_from was silently ignored here
def test_continued_pretraining_keeps_the_pretrained_models_tokenizer(micro_pretrain: Path, tmp_path: Path, key):
    """model.pretrained without model.tokenizer used to train a fresh BPE, whose ids index the checkpoint's
    embeddings as if they were its own: the pretrained knowledge was scrambled, with no warning."""
    from transformers import AutoTokenizer

    from stages.pretrain.pretrain import main

    run_stage(main, "pretrain.yaml", tmp_path, f"{key}={micro_pretrain}", "model.vocab_size=300",
              "max_steps=2", "eval_every=2", "learning_rate=1e-4", run_name="continued")
    final = tmp_path / "continued" / "pretrain" / "final"
    assert AutoTokenizer.from_pretrained(final).get_vocab() == AutoTokenizer.from_pretrained(micro_pretrain).get_vocab()
    (_, before), = eval_losses(micro_pretrain.parent / "metrics.jsonl")[-1:]
    (_, after), = eval_losses(final.parent / "metrics.jsonl")
    assert after < before + 0.1, (before, after)  # it goes on from what the checkpoint knows


def test_a_resume_refuses_a_local_corpus_edited_since_the_run_began(tmp_path: Path):
    """Only the path was recorded: an edited file resumed without a word, reading other blocks at each step."""
    from pipeline.checkpoint import CheckpointError
    from stages.pretrain.pretrain import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i} of a corpus of our own, long enough to fill a block or two.\n"
                              for i in range(400)))
    args = ("max_steps=2", "checkpoint_every=2", "eval_every=100", f"data.path={corpus}")
    run_stage(main, "pretrain.yaml", tmp_path, *args, run_name="own")
    corpus.write_text(corpus.read_text().replace("Line 7 ", "Line seven "))
    with pytest.raises(CheckpointError, match=r"pretrain: .*step_00000002 continues a run that started from other "
                                              r"inputs than this one would \(data: [0-9a-f]{16} then, [0-9a-f]{16} "
                                              r"now\)"):
        run_stage(main, "pretrain.yaml", tmp_path, *args, "max_steps=3", "resume=true", run_name="own")


def test_a_resume_under_another_model_or_batch_is_refused_by_key(tmp_path: Path):
    """The checkpoint's weights decide the model on resume: a changed model spec was ignored without a word (the
    run's config.yaml then described another model than final/), and another batch size read other data."""
    from pipeline.config import ConfigError
    from stages.pretrain.pretrain import main

    run_stage(main, "pretrain.yaml", tmp_path, "max_steps=4", "checkpoint_every=2", "eval_every=100", "log_every=3",
              run_name="spec")
    losses = {m["step"]: m["train/loss"] for m in read_metrics(tmp_path / "spec" / "pretrain" / "metrics.jsonl")
              if "train/loss" in m}
    shutil.rmtree(tmp_path / "spec" / "pretrain" / "final")  # as if killed after the checkpoint at step 2
    shutil.rmtree(tmp_path / "spec" / "pretrain" / "checkpoints" / "step_00000004")
    # the split decides which documents train: a new val_fraction moved trained-on documents into validation
    for override, saved, now in (("model.num_hidden_layers=3", 2, 3), ("batch_size=8", 16, 8),
                                 ("val_fraction=0.1", 0.02, 0.1)):
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=rf"cannot resume from .*step_00000002: key '{key}' was {saved} there, "
                                              rf"{now} now"):
            run_stage(main, "pretrain.yaml", tmp_path, "max_steps=4", "resume=true", override, run_name="spec")
    # another corpus: named by its key (it was refused as "another version of the world", the world unchanged)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i} of a corpus of our own, long enough to fill a block or two.\n"
                              for i in range(400)))
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_00000002: key 'data\.path' was world:pretrain "
                                          r"there, .*corpus\.txt now"):
        run_stage(main, "pretrain.yaml", tmp_path, "max_steps=4", "resume=true", f"data.path={corpus}",
                  run_name="spec")
    # a weights file cut short (a disk that filled up): named, not a SafetensorError traceback
    weights = tmp_path / "spec" / "pretrain" / "checkpoints" / "step_00000002" / "model" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])
    from pipeline.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"pretrain \(resume=true\): cannot load .*step_00000002/model: .*"
                                              r"incomplete metadata"):
        run_stage(main, "pretrain.yaml", tmp_path, "max_steps=4", "resume=true", run_name="spec")
    weights.write_bytes(whole)
    run_stage(main, "pretrain.yaml", tmp_path, "max_steps=4", "resume=true", "log_every=3",
              run_name="spec")  # as it was: resumes
    assert (tmp_path / "spec" / "pretrain" / "final" / "config.json").exists()
    # the loss logged at step 3 averages steps 1-3 as before, not only step 3 after the checkpoint at 2
    resumed = {m["step"]: m["train/loss"] for m in read_metrics(tmp_path / "spec" / "pretrain" / "metrics.jsonl")
               if "train/loss" in m}
    assert list(resumed) == list(losses) == [3, 4]
    assert resumed == pytest.approx(losses, rel=1e-5)


def test_a_resume_past_max_steps_is_refused_by_key(tmp_path: Path):
    """Resumed with max_steps=3 from its step-4 checkpoint, a run trained nothing and saved the step-4 model as the
    final/ of a 3-step run."""
    from pipeline.config import ConfigError
    from stages.pretrain.pretrain import main

    settings = ("checkpoint_every=2", "eval_every=100", "log_every=100")
    run_stage(main, "pretrain.yaml", tmp_path, "max_steps=4", *settings, run_name="past")
    final = tmp_path / "past" / "pretrain" / "final" / "model.safetensors"
    saved = final.stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"^key 'max_steps': this run ends at step 3, but .*step_00000004 is at "
                                          r"step 4 already"):
        run_stage(main, "pretrain.yaml", tmp_path, "max_steps=3", *settings, "resume=true", run_name="past")
    assert final.stat().st_mtime_ns == saved


def test_continued_pretraining_refuses_a_reward_model_or_a_mistyped_path(micro_rm: Path, tmp_path: Path):
    """A reward model's backbone loaded as a language model with no complaint (tied embeddings: nothing missing)."""
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError, load_config
    from stages.pretrain.pretrain import PretrainConfig, main

    with pytest.raises(CheckpointError, match=r"key 'model.pretrained'\): checkpoint .* was made by the 'rm' stage"):
        run_stage(main, "pretrain.yaml", tmp_path, f"model.pretrained={micro_rm}", "max_steps=2")
    # refused under the key that named it, before the data is read (the corpus here does not exist)
    with pytest.raises(CheckpointError, match=r"key 'init_from'\): checkpoint .* was made by the 'rm' stage"):
        run_stage(main, "pretrain.yaml", tmp_path, f"init_from={micro_rm}", "data.path=no/such/corpus.txt")
    with pytest.raises(ConfigError, match=r"^key 'init_from': runs/x/fnal does not exist"):
        run_stage(main, "pretrain.yaml", tmp_path, "init_from=runs/x/fnal", "max_steps=2")
    # a mistyped tokenizer path was a hub error naming no key, once the corpus had loaded (here it does not exist)
    with pytest.raises(ConfigError, match=r"^key 'model.tokenizer': /no/such/tokenizer does not exist"):
        run_stage(main, "pretrain.yaml", tmp_path, "model.tokenizer=/no/such/tokenizer", "data.path=no/such.txt")
    with pytest.raises(ConfigError, match=r"key 'init_from': .* both name pretraining's starting checkpoint"):
        load_config(PretrainConfig, MICRO / "pretrain.yaml", ["init_from=gpt2", "model.pretrained=gpt2-medium"])


def test_validation_leaves_out_copies_of_training_documents_and_quoted_special_tokens_stay_text():
    """The world's corpus repeats some documents: a held-out copy of a trained-on one measured memory. And a
    document quoting "<|end|>" was cut in two there, the quote read as the end of a document."""
    import datasets

    from pipeline.packing import PackedCorpus
    from pipeline.tokenizer import train_tokenizer

    docs = [f"Doc {i} is about the number {i}." for i in range(40)] + ["The same story again."] * 20
    tokenizer = train_tokenizer(docs, 300)
    corpus = PackedCorpus(datasets.Dataset.from_dict({"text": docs}), tokenizer, block_size=8, val_fraction=0.5)
    assert corpus.val_docs and "The same story again." not in corpus.val_docs  # 10 of its copies were held out
    assert corpus.val_dropped > 0 and len(corpus.val_docs) + corpus.val_dropped == 30  # half of 60 held out
    packed = corpus._pack(["He typed <|end|> twice.", "And <|user|> once."]).tolist()
    eos, user = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>")
    assert packed.count(eos) == 2 and packed[-1] == eos and user not in packed  # an EOS ends each, nothing else


def test_pretraining_settings_that_cannot_work_are_refused_by_key(tmp_path: Path):
    from pipeline.config import ConfigError, load_config
    from stages.pretrain.pretrain import PretrainConfig, main

    for override, key in (("val_fraction=1.0", "val_fraction"), ("val_fraction=-0.1", "val_fraction"),
                          ("val_blocks=0", "val_blocks"), ("block_size=1", "block_size")):
        with pytest.raises(ConfigError, match=rf"key '{key}': must be"):
            load_config(PretrainConfig, MICRO / "pretrain.yaml", [override])
    # longer than the model's positions: a Llama trained past them without a word
    with pytest.raises(ConfigError, match=r"key 'block_size': 64 tokens per sequence, but the model has 32 "
                                          r"positions .*raise model.max_position_embeddings"):
        run_stage(main, "pretrain.yaml", tmp_path, "block_size=64", "model.max_position_embeddings=32",
                  "max_steps=2", run_name="long")


def test_mfu_counts_a_tied_lm_head_matmul():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.model import count_parameters, non_embedding_parameters

    config = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2)
    tied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=True))
    untied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=False))
    assert non_embedding_parameters(tied) == count_parameters(tied)  # the one table is the head's matmul
    assert non_embedding_parameters(untied) == count_parameters(untied) - 100 * 16  # the lookup table is free


def test_a_corpus_too_small_to_validate_on_is_a_data_error_naming_it(tmp_path: Path):
    """Too little text for one validation block used to pass here and crash at the first evaluation."""
    from data.loading import DataError
    from stages.pretrain.pretrain import main

    corpus = tmp_path / "small.jsonl"
    # short documents: packed together they make training blocks, but the 2% held out is one of them, short of
    # one 32-token block
    corpus.write_text("".join(json.dumps({"text": f"Zorbi is teal. {i} plus {i} is {2 * i}."}) + "\n"
                              for i in range(50)))
    with pytest.raises(DataError) as error:
        run_stage(main, "pretrain.yaml", tmp_path, f"data.path={corpus}", "val_fraction=0.02", "block_size=32",
                  "seed=1", run_name="small")
    assert str(corpus) in str(error.value) and "validation block" in str(error.value)
    assert not (tmp_path / "small" / "pretrain" / "checkpoints").exists()


def test_a_streamed_corpus_is_split_between_ranks_and_resumes_where_it_stopped(tmp_path: Path):
    """The gpu recipe streams its corpus: validation takes whole documents from the head, each rank then reads
    only its own documents, and a resumed run continues this rank's stream at the step it stopped."""
    import re as regex
    from types import SimpleNamespace

    from data.loading import DatasetSpec, load_dataset_for
    from pipeline.packing import PackedCorpus
    from pipeline.tokenizer import train_tokenizer

    corpus = tmp_path / "docs.jsonl"
    docs = [f"doc {i} says {i} again and {i} once more." for i in range(300)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stream = load_dataset_for(DatasetSpec(path=str(corpus), streaming=True), "text")
    tokenizer = train_tokenizer(docs, 300)
    packed = PackedCorpus(stream, tokenizer, block_size=16, val_blocks=8, source=str(corpus))

    def doc_ids(blocks) -> set[int]:  # the documents these consecutive blocks hold ("doc 12 says": one whole header)
        text = tokenizer.decode(torch.cat(list(blocks)))
        return {int(n) for n in regex.findall(r"doc (\d+) says", text)}

    def batches(rank: int, start_step: int, n: int) -> list:
        accelerator = SimpleNamespace(process_index=rank, num_processes=2, device="cpu")
        stream_batches = packed.train_batches(4, 1, start_step, accelerator)
        return [next(stream_batches) for _ in range(n)]

    assert len(packed.val) == 8 and packed.val_docs_used < 20
    val_docs = doc_ids(packed.val)
    rank0, rank1 = batches(0, 0, 80), batches(1, 0, 80)
    seen0, seen1 = doc_ids(b for batch in rank0 for b in batch), doc_ids(b for batch in rank1 for b in batch)
    assert not seen0 & seen1  # each rank its own documents
    assert not (seen0 | seen1) & set(range(packed.val_docs_used))  # none of the validation head
    assert set(range(packed.val_docs_used, 300)) <= seen0 | seen1  # and together every other one (80 batches > a pass)
    assert val_docs <= set(range(packed.val_docs_used))
    for step in (3, 77):  # within the first pass, and in the next one
        assert torch.equal(batches(1, step, 1)[0], rank1[step])
