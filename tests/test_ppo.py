"""The PPO stage on the micro recipe: masking in a real PPO step, a run with every option, 2-process DDP, and
resume after SIGKILL with an identical continuation. (The maths itself is tested in test_ppo_math.py.)"""
from __future__ import annotations

import contextlib
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
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MICRO, REPO, launch_two_ranks
from pipeline.config import ConfigError, load_config
from pipeline.generation import encode_prompts
from pipeline.model import load_scalar_model
from pipeline.tokenizer import SPECIAL_TOKENS, load_tokenizer
from stages.ppo.passes import TokenCritic, ppo_loss, score_rollout, trim_padding
from stages.ppo.config import PPOStageConfig
from stages.ppo.ppo_math import compute_rewards, gae, masked_whiten

# micro models gain nothing from intra-op threads, and on a busy machine spinning threads cost seconds per step
ENV = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
REQUIRED_EVERY_STEP = [
    "objective/rm_score", "objective/kl", "objective/rlhf_reward", "objective/entropy", "objective/gold_score",
    "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/explained_variance", "val/clipfrac",
    "rollout/response_length", "rollout/eos_rate", "perf/tokens_per_sec", "perf/generation_seconds",
    "perf/update_seconds"]
REQUIRED_AT_EVAL = ["eval/ppo_gold_score", "eval/sft_gold_score", "eval/ppo_rm_score", "eval/gold_win_rate",
                    "eval/kl_to_sft", "eval/rm_score_gain"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ppo_args(runs_dir: Path, run_name: str, sft: Path, rm: Path, *overrides: str) -> list[str]:
    return ["--config", str(MICRO / "ppo.yaml"), f"runs_dir={runs_dir}", f"run_name={run_name}",
            f"init_from={sft}", f"reward_model={rm}", *overrides]


def metrics(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


def test_masked_positions_change_nothing_in_a_ppo_step(micro_sft, micro_rm):
    """Garbage in padding and after EOS -- tokens, logits, values, old log-probs, advantages -- leaves the loss
    and every gradient of a PPO step unchanged; the same garbage at one real position changes them."""
    torch.manual_seed(0)
    cfg = load_config(PPOStageConfig, MICRO / "ppo.yaml", ["minibatch_size=4", "grad_accum=1"])
    tokenizer = load_tokenizer(str(micro_sft))
    policy = AutoModelForCausalLM.from_pretrained(micro_sft).eval()
    reference_model = AutoModelForCausalLM.from_pretrained(micro_sft).eval()
    critic = TokenCritic(load_scalar_model(str(micro_rm), "test", tokenizer)).eval()
    reference = lambda: contextlib.nullcontext(reference_model)  # noqa: E731
    enc = encode_prompts(tokenizer, ["What is 12 plus 30?", "Write a short thank-you note to Bob.",
                                     "Reverse the word cat.", "Hi"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses = torch.randint(len(SPECIAL_TOKENS), len(tokenizer), (4, 10))
    responses[0, 3], responses[0, 4:] = eos, pad  # ended early, then padding
    responses[1, 6], responses[1, 7:] = eos, pad
    responses[3, 0], responses[3, 1:] = eos, pad  # an empty reply; row 2 hit the length cap without EOS
    responses[2, 8:] = pad  # ... after sampling pad twice: our sampler pads only after EOS, so these are actions
    batch = score_rollout(policy, reference, critic, tokenizer, enc, responses, cfg)
    # scored one row at a time: the same numbers at the real tokens
    one_by_one = score_rollout(policy, reference, critic, tokenizer, enc, responses,
                               load_config(PPOStageConfig, MICRO / "ppo.yaml", ["grad_accum=1", "minibatch_size=1"]))
    for key in ("logprobs", "ref_logprobs", "entropy", "kl_exact", "values"):
        torch.testing.assert_close(one_by_one[key][batch["mask"]], batch[key][batch["mask"]], atol=1e-5, rtol=1e-4)
    batch["score"] = torch.tensor([0.5, -1.0, 0.3, 2.0])
    # the update sees a policy that has moved a little, so the ratio and value clipping are active
    batch["logprobs"] = batch["logprobs"] + 0.3 * torch.randn(batch["logprobs"].shape)
    mask = batch["mask"]
    assert mask.sum(1).tolist() == [4, 7, 10, 1] and (enc["attention_mask"] == 0).any()

    def grads_after_step(batch: dict, hide: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        """Rewards, GAE, whitening, then the loss and gradients of one PPO micro-batch. `hide` marks the
        response positions whose logits and values are replaced by noise inside the models' forward passes."""
        # response token t is predicted at position n_prompt - 1 + t
        n_prompt = batch["input_ids"].size(1) - batch["responses"].size(1)
        hide_full = torch.nn.functional.pad(hide.float(), (n_prompt - 1, 1)).bool()[..., None]
        noise = lambda module, args, out: torch.where(hide_full, out + 1e3 * torch.randn_like(out), out)  # noqa: E731
        handles = [policy.lm_head.register_forward_hook(noise), critic.rm.score.register_forward_hook(noise)]
        rewards, _ = compute_rewards(batch["score"], batch["logprobs"], batch["ref_logprobs"], batch["mask"], 0.05)
        batch["advantages"], batch["returns"] = gae(rewards, batch["values"], batch["mask"], 1.0, 0.95)
        batch["advantages"] = masked_whiten(batch["advantages"], batch["mask"])
        policy.zero_grad()
        critic.zero_grad()
        loss, _ = ppo_loss(policy, critic, batch, cfg)
        loss.backward()
        for h in handles:
            h.remove()
        return loss.item(), [p.grad.clone() for p in [*policy.parameters(), *critic.parameters()]]

    clean_loss, clean_grads = grads_after_step(dict(batch), torch.zeros_like(mask))
    garbage = dict(batch)
    post_eos = ~mask
    garbage["responses"] = torch.where(post_eos, torch.randint_like(responses, len(tokenizer)), responses)
    garbage["input_ids"] = torch.cat([torch.where(enc["attention_mask"].bool(), enc["input_ids"],
                                                  torch.randint_like(enc["input_ids"], len(tokenizer))),
                                      garbage["responses"]], dim=1)
    for key in ("logprobs", "ref_logprobs", "values"):
        garbage[key] = torch.where(post_eos, torch.full_like(batch[key], float("nan")), batch[key])
    loss, grads = grads_after_step(garbage, post_eos)
    assert loss == pytest.approx(clean_loss, abs=1e-6)
    for clean, noisy in zip(clean_grads, grads, strict=True):
        torch.testing.assert_close(noisy, clean, atol=1e-6, rtol=1e-5)

    # the check can fail: noise at one real response position does change the step
    one_real = torch.zeros_like(mask)
    one_real[1, 2] = True
    loss, _ = grads_after_step(dict(batch), one_real)
    assert loss != pytest.approx(clean_loss, abs=1e-4)

    # trim_padding drops columns that are padding in every row: same loss and gradients
    rows = torch.tensor([0, 3])  # short replies, and a short prompt
    sub = {k: v[rows] for k, v in batch.items()}
    trimmed = trim_padding(sub)
    assert trimmed["input_ids"].size(1) < sub["input_ids"].size(1) and trimmed["mask"].size(1) == 4
    loss, grads = grads_after_step(sub, torch.zeros_like(sub["mask"]))
    trimmed_loss, trimmed_grads = grads_after_step(trimmed, torch.zeros_like(trimmed["mask"]))
    assert trimmed_loss == pytest.approx(loss, abs=1e-6)
    # shorter sequences change matmul shapes, so only float round-off may differ
    for full, short in zip(grads, trimmed_grads, strict=True):
        torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-4)


def test_padded_passes_equal_each_row_alone_with_learnt_positions(micro_sft, tmp_path):
    """Policy log-probs and critic values of a padded batch equal those of each row alone and unpadded, for models
    with learnt absolute positions (GPT-2): the micro Llama's RoPE cannot tell when padding shifts the position ids
    (scored alone after trim_padding, a row keeps the batch's padding, so that comparison cannot tell either)."""
    from conftest import learnt_positions_checkpoints

    policy_path, rm_path = learnt_positions_checkpoints(micro_sft, tmp_path)
    tokenizer = load_tokenizer(str(policy_path))
    policy = AutoModelForCausalLM.from_pretrained(policy_path).eval()
    critic = TokenCritic(load_scalar_model(str(rm_path), "test", tokenizer)).eval()
    cfg = load_config(PPOStageConfig, MICRO / "ppo.yaml", ["minibatch_size=4", "grad_accum=1"])
    prompts = ["What is 12 plus 30?", "Write a short thank-you note to Bob.", "Hi"]
    enc = encode_prompts(tokenizer, prompts)
    assert (enc["attention_mask"] == 0).any()  # left-padded
    responses = torch.randint(len(SPECIAL_TOKENS), len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(0))
    responses[1, 3], responses[1, 4:] = tokenizer.eos_token_id, tokenizer.pad_token_id  # ended early: right-padded
    reference = lambda: contextlib.nullcontext(policy)  # noqa: E731
    batch = score_rollout(policy, reference, critic, tokenizer, enc, responses, cfg)
    for row, prompt in enumerate(prompts):
        alone = score_rollout(policy, reference, critic, tokenizer, encode_prompts(tokenizer, [prompt]),
                              responses[row:row + 1], cfg)
        for key in ("logprobs", "values"):  # response_logits and TokenCritic, as the update calls them too
            torch.testing.assert_close(batch[key][row][batch["mask"][row]], alone[key][0][alone["mask"][0]],
                                       atol=1e-5, rtol=1e-4, msg=f"{key} of row {row}")


def test_lora_is_refused_on_role_tokens_no_stage_has_trained(micro_sft, micro_rm, tmp_path):
    """A policy whose tokenizer got our role tokens (it had no chat template) and was never trained in full: LoRA
    would leave those embedding rows at their untrained start, as in SFT and the RM."""
    untrained = tmp_path / "untrained"
    shutil.copytree(micro_sft, untrained)
    config = json.loads((untrained / "tokenizer_config.json").read_text())
    config["pipeline_added_role_tokens"] = ["<|user|>", "<|assistant|>"]  # as load_tokenizer marks them
    (untrained / "tokenizer_config.json").write_text(json.dumps(config))
    from stages.ppo.ppo import main

    with pytest.raises(ConfigError, match=r"key 'lora.enabled': .*untrained got our role tokens \(<\|user\|>, "
                                          r"<\|assistant\|>\)"):
        main(ppo_args(tmp_path, "lora", untrained, micro_rm, "lora.enabled=true", "max_steps=1"))


def test_a_rollout_reply_ends_at_any_stop_token_the_model_lists(micro_sft, micro_rm):
    """A reply ended by a hub model's other stop token (<|endoftext|> beside <|im_end|>) was decoded with that token
    and the pads after it: the RM and the judge read them, and a reply of only that token escaped the empty-reply
    penalty."""
    from stages.ppo.passes import rollout
    from stages.ppo.ppo_math import answered

    cfg = load_config(PPOStageConfig, MICRO / "ppo.yaml", ["sampling.max_new_tokens=6"])
    tokenizer = load_tokenizer(str(micro_sft))
    policy = AutoModelForCausalLM.from_pretrained(micro_sft).eval()
    other_stop = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[1])  # BOS, as if it ended a turn
    assert other_stop not in (tokenizer.eos_token_id, tokenizer.pad_token_id)
    policy.generation_config.eos_token_id = [tokenizer.eos_token_id, other_stop]
    policy.lm_head.register_forward_hook(lambda module, args, out: out.index_add(  # always the other stop token
        -1, torch.tensor([other_stop]), torch.full((*out.shape[:-1], 1), 100.0)))
    critic = TokenCritic(load_scalar_model(str(micro_rm), "test", tokenizer))
    data = rollout(policy, lambda: contextlib.nullcontext(policy), critic, tokenizer, ["Hi?", "What is 2 plus 3?"],
                   cfg, torch.Generator().manual_seed(0))
    assert data["replies"] == ["", ""] and data["has_eos"].all()
    assert data["mask"].sum(1).tolist() == [1, 1]  # the stop token is the reply's one action
    assert not any(answered(data["has_eos"], data["replies"]))  # empty: missing_eos_penalty, as a cut reply


def test_ppo_updates_on_one_batch_follow_the_advantages_and_fit_the_returns(micro_sft, micro_rm):
    """A few optimizer steps on one rollout: tokens with a positive advantage become likelier, those with a
    negative one less likely, and the critic's value loss falls."""
    from pipeline.generation import SamplingConfig, sample

    torch.manual_seed(0)
    cfg = load_config(PPOStageConfig, MICRO / "ppo.yaml", ["minibatch_size=4", "grad_accum=1"])
    tokenizer = load_tokenizer(str(micro_sft))
    policy = AutoModelForCausalLM.from_pretrained(micro_sft)
    reference_model = AutoModelForCausalLM.from_pretrained(micro_sft).eval()
    critic = TokenCritic(load_scalar_model(str(micro_rm), "test", tokenizer))
    enc = encode_prompts(tokenizer, ["What is 12 plus 30?", "Write a short thank-you note to Bob.",
                                     "Reverse the word cat.", "What colour is Bob?"])
    responses = sample(policy.eval(), enc["input_ids"], enc["attention_mask"], SamplingConfig(12, temperature=0.7),
                       tokenizer.eos_token_id, tokenizer.pad_token_id)
    batch = score_rollout(policy, lambda: contextlib.nullcontext(reference_model), critic, tokenizer, enc,
                          responses, cfg)
    batch["score"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rewards, _ = compute_rewards(batch["score"], batch["logprobs"], batch["ref_logprobs"], batch["mask"], 0.05)
    advantages, batch["returns"] = gae(rewards, batch["values"], batch["mask"], 1.0, 0.95)
    batch["advantages"] = masked_whiten(advantages, batch["mask"])
    mask = batch["mask"]
    up, down = mask & (batch["advantages"] > 0), mask & (batch["advantages"] < 0)
    assert up.any() and down.any()

    policy.train(), critic.train()
    optimizer = torch.optim.AdamW([*policy.parameters(), *critic.parameters()], lr=1e-3)
    value_losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss, stats = ppo_loss(policy, critic, batch, cfg)
        loss.backward()
        optimizer.step()
        value_losses.append(stats["loss/value"].item())
    after = score_rollout(policy.eval(), lambda: contextlib.nullcontext(reference_model), critic.eval(), tokenizer,
                          enc, responses, cfg)
    change = after["logprobs"] - batch["logprobs"]
    assert change[up].mean() > 0 > change[down].mean(), (change[up].mean(), change[down].mean())
    assert value_losses[-1] < value_losses[0], value_losses


def test_eval_kl_of_an_unmoved_lora_ema_policy_is_zero(micro_sft, micro_rm, tmp_path):
    """The EMA copy and the reference (the policy with its adapter off) must be compared at one precision: with
    the reference left under the run's bf16 autocast, an unchanged policy showed a KL to itself."""
    from stages.ppo.ppo import main

    # step 1 trains the critic alone: its evaluation sees the policy unmoved
    main(ppo_args(tmp_path, "lora-ema", micro_sft, micro_rm, "max_steps=2", "critic_warmup_steps=1",
                  "lora.enabled=true", "lora.rank=4", "ema_decay=0.5", "eval_every=1", "eval_prompts=6",
                  "precision=bf16",  # the run's autocast is what the bug came from, on any CPU
                  "sampling.max_new_tokens=2"))  # every reply is cut at the cap (checked below)
    evals = [r for r in metrics(tmp_path / "lora-ema" / "ppo") if "eval/kl_to_sft" in r]
    assert [r["step"] for r in evals] == [1, 2] and evals[0]["eval/kl_to_sft"] == 0.0
    # the eval RM score is the reward PPO optimises: a reply cut at the cap scores missing_eos_penalty (-1), not
    # what the RM says of it read as a finished turn
    assert evals[0]["eval/ppo_eos_rate"] == 0.0
    table = next(r for r in metrics(tmp_path / "lora-ema" / "ppo") if r.get("table") == "eval/samples")
    rm_columns = [table["columns"].index("sft_rm"), table["columns"].index("ppo_rm")]
    assert {row[c] for row in table["rows"] for c in rm_columns} == {-1.0}


def test_micro_run_with_every_option_logs_metrics_and_writes_a_plain_final(micro_sft, micro_rm, tmp_path,
                                                                          monkeypatch, capsys):
    """LoRA policy (reference = adapter off), EMA, PPO-ptx and a critic warm-up step, in one short run."""
    from torch.optim.swa_utils import AveragedModel

    from stages.ppo.ppo import main

    # the EMA copy is what evaluation samples from and measures the KL of: its LoRA dropout must be off (peft
    # hands the policy over in train mode, and the copy was once taken before the policy was put in eval mode)
    ema_dropout_training = []
    update_parameters = AveragedModel.update_parameters

    def recording_update(self, model):
        ema_dropout_training.extend(m.training for m in self.module.modules() if isinstance(m, torch.nn.Dropout))
        return update_parameters(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", recording_update)
    main(ppo_args(tmp_path, "options", micro_sft, micro_rm, "max_steps=3", "critic_warmup_steps=1", "lora.enabled=true",
                  "lora.rank=4", "ema_decay=0.5", "ptx=true", "ptx_block_size=32", "eval_every=3", "eval_prompts=6"))
    stage = tmp_path / "options" / "ppo"
    records = [r for r in metrics(stage) if "table" not in r]
    steps = {r["step"]: r for r in records if "objective/kl" in r}
    assert sorted(steps) == [1, 2, 3]
    assert "loss/policy" not in steps[1] and "loss/value" in steps[1]  # warm-up: critic only
    # steps 1 and 2 sample from the policy before its first update (step 1 trains the critic alone): it is still
    # the reference. Step 3 samples after one update, so a KL of 0 there would mean the policy never moved
    assert steps[1]["objective/kl"] == 0.0 and steps[2]["objective/kl"] == 0.0
    assert steps[3]["objective/kl"] != 0.0
    for step in (2, 3):
        assert set(REQUIRED_EVERY_STEP + ["loss/ptx"]) <= set(steps[step]), set(REQUIRED_EVERY_STEP) - set(steps[step])
        assert steps[step]["loss/ptx"] > 0  # the pretraining term is computed on real text
    evals = [r for r in records if "eval/kl_to_sft" in r]
    assert [r["step"] for r in evals] == [3] and set(REQUIRED_AT_EVAL) <= set(evals[0])
    assert evals[0]["eval/kl_to_sft"] > 1e-6  # the EMA policy has moved (the LoRA+EMA test above checks 0 at rest)
    assert ema_dropout_training and not any(ema_dropout_training), ema_dropout_training
    table = [r for r in metrics(stage) if r.get("table") == "eval/samples"]
    assert len(table) == 1 and len(table[0]["rows"]) == 6 and "ppo_gold" in table[0]["columns"]

    report = json.loads((stage / "eval.json").read_text())
    assert {"sft_gold_score", "ppo_gold_score", "gold_win_rate", "kl_to_sft", "rm_score_gain",
            "per_family_gold", "per_criterion_gold"} <= set(report)
    assert set(report["per_family_gold"]["arithmetic"]) == {"sft", "ppo"}
    assert set(report["per_criterion_gold"]) == {"correctness", "on_task", "tone", "concision", "format"}
    assert all(0.0 <= v[k] <= 1.0 for v in report["per_criterion_gold"].values() for k in ("sft", "ppo"))

    final = stage / "final"
    assert not (final / "adapter_config.json").exists()  # LoRA merged: a plain checkpoint
    assert (stage / "adapter" / "adapter_config.json").exists()  # and the adapter alone beside it
    assert json.loads((final / "config.json").read_text())["pipeline_stage"] == "ppo"
    model, sft = AutoModelForCausalLM.from_pretrained(final), AutoModelForCausalLM.from_pretrained(micro_sft)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), sft.state_dict().values()))
    tokenizer = AutoTokenizer.from_pretrained(final)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert model.generate(**inputs, max_new_tokens=8, do_sample=False).shape[1] > inputs["input_ids"].shape[1]
    assert (stage / "final_online" / "config.json").exists()  # EMA is final/; the online policy is beside it
    online = AutoModelForCausalLM.from_pretrained(stage / "final_online")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), online.state_dict().values()))

    # trained for longer, the finished run goes on from its last step (not from step 2, training step 3 again)
    main(ppo_args(tmp_path, "options", micro_sft, micro_rm, "max_steps=4", "critic_warmup_steps=1", "lora.enabled=true",
                  "lora.rank=4", "ema_decay=0.5", "ptx=true", "ptx_block_size=32", "eval_every=3", "eval_prompts=6",
                  "resume=true"))
    assert "resuming from step 3" in capsys.readouterr().out


def test_beta_adapts_after_each_step_and_micro_batches_weigh_every_token_alike(micro_sft, micro_rm, tmp_path):
    """What only a run shows: the adaptive KL controller moves beta after a policy step, and the rewards subtract the
    beta logged; and a minibatch's update is the same whether it is one micro-batch or four (token_normaliser: a mean
    per micro-batch would weigh a token by how many others share its micro-batch)."""
    from stages.ppo.ppo import main

    # fp32: under bf16 (auto, on a CPU with bf16) a row's log-probs change with the micro-batch's size
    main(ppo_args(tmp_path, "whole", micro_sft, micro_rm, "max_steps=2", "grad_accum=1", "eval_prompts=0",
                  "precision=fp32"))
    main(ppo_args(tmp_path, "cut", micro_sft, micro_rm, "max_steps=1", "grad_accum=4", "eval_prompts=0",
                  "precision=fp32"))
    whole, cut = ({r["step"]: r for r in metrics(tmp_path / run / "ppo") if "objective/kl" in r} for run in
                  ("whole", "cut"))
    # step 1 samples from the unmoved policy: KL 0 against kl_target 4, so the controller's error is clipped at -0.2
    # and beta (init_kl_coef 0.05) shrinks by 0.2 * 8 rollouts / kl_horizon 1000
    assert whole[1]["objective/kl"] == 0.0 and whole[1]["objective/kl_coef"] == 0.05
    assert whole[2]["objective/kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 1000), rel=1e-9)
    assert whole[2]["objective/kl"] != 0.0  # the policy moved in step 1, so step 2's rewards pay for it
    assert whole[2]["objective/rlhf_reward"] == pytest.approx(
        whole[2]["objective/score"] - whole[2]["objective/kl_coef"] * whole[2]["objective/kl"], rel=1e-5, abs=1e-6)
    # the same minibatches in micro-batches of 1 reply: the same losses (means over every token of a minibatch) and
    # the same accumulated gradients (not approxkl and the clip fractions: those are means per micro-batch)
    for key in ("loss/policy", "loss/value", "policy/grad_norm", "val/grad_norm"):
        assert cut[1][key] == pytest.approx(whole[1][key], rel=1e-4), key


def test_ppo_on_prompts_of_your_own_logs_no_gold_for_them(micro_sft, micro_rm, tmp_path, capsys):
    """The world's judge grades only tone and form of a reply to a prompt it cannot parse: that "gold" was logged
    and printed at every step as if it measured the replies."""
    from stages.ppo.ppo import main

    own = tmp_path / "own_prompts.jsonl"
    own.write_text("".join(json.dumps({"prompt": f"Tell me something nice about the number {i}."}) + "\n"
                           for i in range(16)))
    main(ppo_args(tmp_path, "own", micro_sft, micro_rm, f"prompts.path={own}", "max_steps=1", "eval_prompts=0"))
    assert "16 of the 16 training prompts" in capsys.readouterr().out
    steps = [r for r in metrics(tmp_path / "own" / "ppo") if "objective/rm_score" in r]
    assert steps and not any("objective/gold_score" in r for r in steps), steps


def test_bf16_update_sees_the_rollouts_own_log_probs_at_unchanged_weights(micro_sft, micro_rm, tmp_path):
    """Under bf16 a row's log-probs change with the width of the batch it is computed in. The rollout scored
    chunks trimmed to their own width and the update re-trimmed shuffled micro-batches, so at unchanged weights
    the ratio was not 1 (approxkl 8e-6 here, instead of 0)."""
    from stages.ppo.ppo import main

    main(ppo_args(tmp_path, "bf16", micro_sft, micro_rm, "precision=bf16", "policy_lr=1e-30", "max_steps=1",
                  "eval_prompts=0", "sampling.max_new_tokens=24"))
    steps = [r for r in metrics(tmp_path / "bf16" / "ppo") if "policy/approxkl" in r]
    assert steps and steps[0]["policy/approxkl"] == 0.0 and steps[0]["policy/clipfrac"] == 0.0, steps


def test_a_non_rm_checkpoint_as_reward_model_is_refused_by_name(micro_sft, tmp_path):
    from pipeline.checkpoint import CheckpointError
    from stages.ppo.ppo import main

    with pytest.raises(CheckpointError, match=r"reward_model.*'sft' stage.*rm"):
        main(ppo_args(tmp_path, "bad", micro_sft, micro_sft))


def test_a_resume_past_max_steps_is_refused_by_key(micro_sft, micro_rm, tmp_path):
    """Resumed with max_steps=4 from a step-6 checkpoint, PPO trained nothing and saved the step-6 policy as the
    final/ of a 4-step run."""
    from stages.ppo.ppo import main

    (tmp_path / "past" / "ppo" / "checkpoints" / "step_00000006").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"^key 'max_steps': this run ends at step 4, but .*step_00000006 is at "
                                          r"step 6 already"):
        main(ppo_args(tmp_path, "past", micro_sft, micro_rm, "max_steps=4", "resume=true"))
    assert not (tmp_path / "past" / "ppo" / "final").exists()


@pytest.mark.parametrize("override, key", [("sampling.top_k=20", "sampling.top_k"),
                                           ("sampling.top_p=0.9", "sampling.top_p"),
                                           ("precision=fp16", "precision"),
                                           # the policy would never train: ppo/final the SFT model unchanged
                                           ("critic_warmup_steps=100", "critic_warmup_steps"),
                                           ("init_kl_coef=-0.1", "init_kl_coef"),
                                           # the adaptive controller scales beta: from 0 it stays 0, no KL leash
                                           ("init_kl_coef=0", "init_kl_coef"),
                                           ("kl_horizon=0", "kl_horizon"),  # a ValueError traceback at start-up
                                           ("grad_clip=0", "grad_clip"),  # every gradient zeroed
                                           ("ema_decay=1", "ema_decay"),
                                           # replaced before the clip: -10 and -50 both trained as -5
                                           ("missing_eos_penalty=-10", "missing_eos_penalty"),
                                           ("lam=1.5", "lam")])
def test_settings_ppo_cannot_honour_are_refused_by_key(micro_sft, micro_rm, tmp_path, override, key):
    from stages.ppo.ppo import main

    with pytest.raises(SystemExit, match=rf"^config error: .*'{re.escape(key)}'"):  # how a stage reports bad config
        main(ppo_args(tmp_path, "refused", micro_sft, micro_rm, override))
    assert not (tmp_path / "refused" / "ppo" / "final").exists()


def test_ddp_two_processes_keep_identical_policies(micro_sft, micro_rm, tmp_path):
    # one world prompt among prompts of our own, so one rank's rollouts hold none: its gold-score sums were int64
    # zeros against the other rank's floats, and gloo aborted on the mismatched all-reduce
    prompts = tmp_path / "mixed.jsonl"
    own = [{"prompt": f"Tell me something nice about the number {i}."} for i in range(15)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in [*own[:7], {"prompt": "How much is 25 minus 13?"},
                                                                  *own[7:]]))
    run = launch_two_ranks("stages.ppo", ppo_args(tmp_path, "ddp", micro_sft, micro_rm, "max_steps=2", "eval_every=2",
                                                  "eval_prompts=4", f"prompts.path={prompts}"))
    assert run.returncode == 0, run.stderr[-3000:]
    stage = tmp_path / "ddp" / "ppo"
    fingerprints = dict(re.findall(r"rank (\d+) policy fingerprint (\w+)", run.stdout))
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"], run.stdout[-2000:]
    assert run.stdout.count("[ppo] final policy in") == 1  # final/ written by the main process only
    assert [r["step"] for r in metrics(stage) if "objective/kl" in r] == [1, 2]  # logged once, by the main process
    assert (stage / "final" / "config.json").exists()
    sft = AutoModelForCausalLM.from_pretrained(micro_sft).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(stage / "final").state_dict()
    assert any(not torch.equal(trained[k], sft[k]) for k in sft)  # the ranks agree on a policy that moved


OPTIONS = ("lora.enabled=true", "lora.rank=4", "ema_decay=0.5", "ptx=true", "ptx_block_size=32")


@pytest.mark.parametrize("options", [(), OPTIONS], ids=["plain", "lora-ema-ptx"])
def test_resume_after_sigkill_continues_identically(micro_sft, micro_rm, tmp_path, options):
    """With LoRA, EMA and PPO-ptx too: the adapter, the EMA copy and the pretraining stream's position are restored."""
    stage = tmp_path / "resume" / "ppo"
    args = ppo_args(tmp_path, "resume", micro_sft, micro_rm, "checkpoint_every=2", "eval_prompts=0",
                     "anneal_lr=false", *options)  # the schedule would depend on max_steps, which differs below
    first = subprocess.Popen([sys.executable, "-m", "stages.ppo", *args, "max_steps=100"], cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    try:  # kill once step 3 is logged: the newest checkpoint is then step 2 (step 4's comes after step 4)
        while not (stage / "metrics.jsonl").exists() or 3 not in [r["step"] for r in metrics(stage)]:
            assert first.poll() is None, f"the first run ended early:\n{first.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "step 3 not reached within 180 s"
            time.sleep(0.1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert sorted(p.name for p in (stage / "checkpoints").iterdir() if p.is_dir() and not p.name.startswith(".")) \
        == ["step_00000002"]
    killed = {r["step"]: r for r in metrics(stage) if "objective/kl" in r}

    if options:  # the saved adapter and EMA would otherwise decide without a word, or fail with a traceback
        for changed, key in (("lora.enabled=false", "lora.enabled"), ("ema_decay=0", "ema_decay")):
            refused = subprocess.run([sys.executable, "-m", "stages.ppo", *args, "resume=true", "max_steps=3",
                                      changed], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
            assert refused.returncode == 1 and f"error: key '{key}': cannot resume from" in refused.stderr, \
                refused.stderr[-2000:]
    else:  # the reply length decides which prompts fit the model's positions, so which prompts each step reads;
        # other prompts were once refused as "another version of the world", with no key named
        for changed, said in (("sampling.max_new_tokens=9", "key 'sampling.max_new_tokens' was 16 there, 9 now"),
                              ("prompts.path=world:pref_prompts", "key 'prompts.path' was world:ppo_prompts there, world:pref_prompts now"),
                              ("ptx=true", "key 'ptx' was False there, True now"),
                              # the restored KL controller kept the old coefficient without a word
                              ("init_kl_coef=0.5", "key 'init_kl_coef' was 0.05 there, 0.5 now")):
            refused = subprocess.run([sys.executable, "-m", "stages.ppo", *args, "resume=true", "max_steps=3",
                                      changed], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
            assert refused.returncode == 1 and said in refused.stderr, refused.stderr[-2000:]
    second = subprocess.run([sys.executable, "-m", "stages.ppo", *args, "resume=true", "max_steps=3"], cwd=REPO,
                            env=ENV, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 2" in second.stdout
    # metrics.jsonl: the killed run's steps up to its checkpoint, then the resumed run's step 3, each once
    logged = [r for r in metrics(stage) if "objective/kl" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    resumed = logged[2:]
    # identical continuation: same prompts, samples, rewards and update as the run that was killed
    for key, value in killed[3].items():
        if not key.startswith("perf/"):
            assert resumed[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert (stage / "final" / "config.json").exists()
    if options:  # the EMA copy is only seen in final/: it must match a run that was never interrupted
        whole = subprocess.run([sys.executable, "-m", "stages.ppo", *args, "run_name=whole", "max_steps=3"],
                               cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
        assert whole.returncode == 0, whole.stderr[-3000:]
        from safetensors.torch import load_file

        resumed_final = load_file(stage / "final" / "model.safetensors")
        for name, tensor in load_file(tmp_path / "whole" / "ppo" / "final" / "model.safetensors").items():
            torch.testing.assert_close(resumed_final[name], tensor, rtol=0, atol=1e-5, msg=name)
