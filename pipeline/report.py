"""The report card of a pipeline run: `make report` writes runs/<run>/report.md, with plots in runs/<run>/report/.

    python -m pipeline.report --config configs/tiny/ppo.yaml run_name=tiny [--limit N] [--samples 4]

Every policy checkpoint (pretrain, SFT, PPO final/) answers the same held-out world prompts, and the gold judge
and the PPO reward model score the answers, now: `pipeline.evaluate.evaluate_checkpoint` with the same prompts,
seed and sampling as `make eval`, so the report's figures equal a separate `make eval` of the same checkpoint.
The reward model is re-scored on its held-out rankings, and the PPO policy's KL to the SFT model is measured
on responses it samples to the held-out prompts. Curves come from each stage's metrics.jsonl, times from its
files and eval.json. A stage that has not run gets a "not run yet" section. The figures also go to
report/report.json and to W&B (a `report` run in the run's group, plots as images, headline numbers in its summary).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.checkpoint import write_text_atomic  # noqa: E402
from pipeline.evaluate import (CRITERIA, EVAL_BATCH_SIZE, EVAL_FLAGS, RUN_KEYS, add_sampling_arguments,  # noqa: E402
                               at_least_one, default_device, describe_sampling, evaluate_checkpoint, family_counts,
                               int_at_least, limit_count, load_policy, load_run_config, markdown_table,
                               run_ppo_settings, run_reward_model, run_world,
                               sampling_from_args, shared_config)
from pipeline.evaluation import (EVAL_SAMPLING, family_table, held_out_prompts, load_judge,  # noqa: E402
                                 paired_gain, win_rate)
from pipeline.generation import SamplingConfig, encode_prompts, sample, stop_token_ids  # noqa: E402
from pipeline.runs import WORLD_DATA_FILE, StageConfig, resolve_precision, run_dir, run_main, stage_paths  # noqa: E402
from pipeline.tokenizer import check_chat_prompts  # noqa: E402

STAGES = ("pretrain", "sft", "prefs", "rm", "ppo")
POLICIES = ("pretrain", "sft", "ppo")
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "wandb")
NOT_RUN = "_Not run yet: {what} is missing. Run `make {stage}`, then `make report` again._"


# ---- reading what the stages wrote -----------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict]:
    """The scalar records of a metrics.jsonl (tables skipped); [] if the file is missing."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # blank, or the last line of a killed run, cut mid-write
            continue
    return [r for r in records if isinstance(r, dict) and "table" not in r]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def last(records: list[dict], key: str) -> float | None:
    values = series(records, key)[1]
    return values[-1] if values else None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stage_done(cfg, stage: str) -> bool:
    paths = stage_paths(cfg, stage)
    return (paths.root / "eval.jsonl").exists() if stage == "prefs" else (paths.final / "config.json").exists()


# ---- measurements ------------------------------------------------------------------------------------------

@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer, prompts: list[str], sampling: SamplingConfig, seed: int,
                    batch_size: int) -> dict[str, float]:
    """KL(policy || reference) in nats per response, along responses the policy samples to `prompts`.

    exact: the sum over response tokens of the full next-token KL (what PPO logs as eval/kl_to_sft; low
    variance). k1: the sum of log p_policy - log p_reference of the sampled tokens (InstructGPT's penalty).
    Both use temperature-scaled logits, as PPO's rollouts do.
    """
    from stages.ppo.ppo_math import response_mask

    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    exact, k1 = [], []
    stops = stop_token_ids(policy, tokenizer)
    for start in range(0, len(prompts), batch_size):
        enc = encode_prompts(tokenizer, prompts[start:start + batch_size], device)
        responses = sample(policy, enc["input_ids"], enc["attention_mask"], sampling, stops, tokenizer.pad_token_id,
                           generator)
        # as PPO masks its rollouts: a pad in a reply without EOS was sampled, and counts (passes.score_rollout)
        mask = response_mask(responses, stops, None)[0].float()
        attention = torch.cat([enc["attention_mask"], mask.long()], dim=1)
        inputs = {"input_ids": torch.cat([enc["input_ids"], responses], dim=1), "attention_mask": attention,
                  "position_ids": (attention.cumsum(-1) - 1).clamp(min=0)}
        n_prompt = enc["input_ids"].size(1)
        logp, ref_logp = (model(**inputs).logits[:, n_prompt - 1:-1].float().div(temperature).log_softmax(-1)
                          for model in (policy, reference))
        exact.append(((logp.exp() * (logp - ref_logp)).sum(-1) * mask).sum(1))
        taken = responses[..., None]
        k1.append(((logp.gather(-1, taken) - ref_logp.gather(-1, taken)).squeeze(-1) * mask).sum(1))
    return {"exact": torch.cat(exact).mean().item(), "k1": torch.cat(k1).mean().item(), "responses": len(prompts)}


def measure_rm(cfg, scorer) -> dict:
    """Re-score the RM's held-out rankings (those `make eval-rm` scores): pairwise accuracy, gold agreement, noise
    ceiling, and the (normalised) scores of the preferred and the other response of every held-out pair."""
    from reward_model.evaluate import held_out_rankings
    from reward_model.metrics import labeled_pairs, ranking_metrics
    from reward_model.train import score_rankings

    held_out, source = held_out_rankings(cfg)
    scores = score_rankings(scorer.model, scorer.tokenizer, held_out, scorer.max_length, 64, scorer.device)
    pairs = [((s[i] - scorer.mean) / scorer.std, (s[j] - scorer.mean) / scorer.std)
             for s, row in zip(scores, held_out) for i, j in labeled_pairs(row)]
    return {**ranking_metrics(scores, held_out), "rankings": len(held_out), "source": source,
            "chosen": [c for c, _ in pairs], "rejected": [r for _, r in pairs]}


# ---- run facts -----------------------------------------------------------------------------------------------

def stage_times(cfg) -> list[list]:
    """Per stage: wall time after setup of the launch that wrote its output (config.yaml, written once the data and
    models are loaded -> the output; nothing records the launch's start) and the training time the stage recorded
    in its eval.json, when it did."""
    rows = []
    for stage in STAGES:
        paths = stage_paths(cfg, stage)
        end_file = paths.root / "eval.jsonl" if stage == "prefs" else paths.final / "config.json"
        # started: when the launch that wrote final/ (or the rankings) wrote its config; a copy keeps that date
        start_file = paths.of_final("config.yaml")
        if not start_file.exists() or not end_file.exists():
            # collection with train_data set leaves only a null record (make's marker): nothing was collected
            skipped = stage == "prefs" and read_json(paths.root / WORLD_DATA_FILE) is None
            rows.append([stage, "-", "-", "skipped: the RM trains on train_data" if skipped else "not run"])
            continue
        wall = end_file.stat().st_mtime - start_file.stat().st_mtime
        train = read_json(paths.root / "eval.json").get("train_seconds")
        finished = datetime.datetime.fromtimestamp(end_file.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        rows.append([stage, f"{wall:.1f}", f"{train:.1f}" if isinstance(train, (int, float)) else "-", finished])
    return rows


def hardware() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        ram = "unknown"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    # what `precision: auto` takes here: the CPU's bf16 units decide both speed and the run's exact figures
    auto = resolve_precision(StageConfig())
    return {"CPU": cpu, "cores": str(os.cpu_count()), "RAM": ram, "GPU": ", ".join(gpus) or "none",
            "precision: auto is": "bf16 autocast" if auto == "bf16" else auto,
            "OS": platform.platform(), "Python": platform.python_version()}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + (" (with uncommitted changes)" if dirty else "")


# ---- plots ---------------------------------------------------------------------------------------------------

def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pretrain(records: list[dict], path: Path) -> Path | None:
    train, val = series(records, "train/loss"), series(records, "eval/loss")
    if not train[0] and not val[0]:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(*train, label="train loss")
    ax.plot(*val, "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_families(results: dict, path: Path) -> Path:
    stages = [s for s in POLICIES if s in results]
    families = [f for f, _, _ in family_table(results[stages[0]].summary)] + ["overall"]
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    width = 0.8 / len(stages)
    for k, stage in enumerate(stages):
        s = results[stage].summary
        values = [s.get(f"gold/{f}/score", s["gold/score"] if f == "overall" else 0.0) for f in families]
        ax.bar([i + (k - (len(stages) - 1) / 2) * width for i in range(len(families))], values, width, label=stage)
    ax.set_xticks(range(len(families)), families, rotation=20, ha="right")
    ax.set(ylabel="gold score", ylim=(0, 1), title="Held-out gold score by task family")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_rm(chosen: list[float], rejected: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    # one set of bin edges for both sides: each hist() call would fit its own to its side's range, with other widths
    bins = np.histogram_bin_edges(chosen + rejected, bins=30 if len(chosen) > 100 else 12)
    # one entry per side of every labelled pair, as accuracy counts them: a reply is in as many pairs as it has rivals
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"preferred side (mean {sum(chosen) / len(chosen):.2f})")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"other side (mean {sum(rejected) / len(rejected):.2f})")
    ax.set(xlabel="RM score (normalised)", ylabel="pairs", title="Reward model on held-out pairs")
    ax.legend()
    return save_figure(fig, path)


def smooth(values: list[float]) -> list[float]:
    """A trailing moving average over ~5% of the points: per-step rollout statistics are noisy."""
    window = max(1, len(values) // 20)
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_proxy_vs_gold(records: list[dict], path: Path) -> Path | None:
    proxy, gold = series(records, "objective/rm_score"), series(records, "objective/gold_score")
    if not proxy[0]:
        return None
    proxy, gold = (proxy[0], smooth(proxy[1])), (gold[0], smooth(gold[1]))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(*proxy, color="tab:blue", label="RM score (proxy, normalised)")
    # no gold series: PPO trained on prompts of your own, which the world's judge cannot score
    ax.set(xlabel="PPO step", ylabel="RM score", title="Proxy vs gold reward on PPO rollouts" if gold[0] else
           "RM score on PPO rollouts (no world prompts: no gold)")
    ax.tick_params(axis="y", labelcolor="tab:blue")
    lines = ax.get_lines()
    if gold[0]:
        right = ax.twinx()
        right.plot(*gold, color="tab:orange", label="gold score")
        right.set_ylabel("gold score")
        right.tick_params(axis="y", labelcolor="tab:orange")
        lines += right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_rollouts(records: list[dict], path: Path) -> Path | None:
    panels = [("rollout/response_length", "response tokens"), ("rollout/eos_rate", "EOS rate"),
              ("objective/kl", "KL to SFT (nats)")]
    panels = [(key, label) for key, label in panels if series(records, key)[0]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        steps, values = series(records, key)
        ax.plot(steps, smooth(values))
        ax.set(xlabel="PPO step", title=label)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


# ---- the Markdown ---------------------------------------------------------------------------------------------

def relative(path: str | Path, run: Path) -> str:
    """A path as the report shows it: relative to the run directory when inside it."""
    try:
        return Path(path).resolve().relative_to(run.resolve()).as_posix()
    except ValueError:
        return str(path)


def image(path: Path | None, alt: str, run: Path) -> str:
    return f"![{alt}]({path.relative_to(run).as_posix()})" if path else f"_No data to plot {alt}._"


def change(after: float | None, before: float | None) -> str:
    if after is None or before is None:
        return "-"
    # as precise as the figures it compares (fmt: one decimal from 10 up): "17.6 -> 22.9" is +5.3, not +5.250
    coarse = max(abs(after), abs(before), abs(after - before)) >= 10
    return f"{after - before:+.1f}" if coarse else f"{after - before:+.3f}"


def compare_table(a: dict, b: dict, names: tuple[str, str]) -> str:
    """Overall, per criterion, EOS rate and length of two evaluations side by side, with the change."""
    keys = [("gold score", "gold/score")] + [(f"  {c}", f"gold/{c}") for c in CRITERIA] + [
        ("EOS rate", "eos_rate"), ("response chars", "response_chars"), ("RM score (normalised)", "rm/score")]
    rows = [[label, a.get(k), b.get(k), change(b.get(k), a.get(k))] for label, k in keys if k in a or k in b]
    return markdown_table(["metric", *names, "change"], rows, align="lrrr")


def family_compare(a, b, names: tuple[str, str]) -> str:
    counts = family_counts(b)
    rows = [[f, counts.get(f, 0), a.summary.get(f"gold/{f}/score"), score, a.summary.get(f"gold/{f}/correctness"),
             correct, b.summary.get(f"gold/{f}/chance")] for f, score, correct in family_table(b.summary)]
    return markdown_table(["family", "prompts", f"gold {names[0]}", f"gold {names[1]}", f"correct {names[0]}",
                           f"correct {names[1]}", "chance"], rows)


def clip(text: str, width: int = 72) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def sample_rows(rows: list[dict], n: int) -> list[int]:
    """Indices of up to n prompts, one per family first, in file order."""
    picked, families = [], set()
    for i, row in enumerate(rows):
        if row.get("family") not in families:
            picked.append(i)
            families.add(row.get("family"))
    picked += [i for i in range(len(rows)) if i not in picked]
    return sorted(picked[:n])


def pretrain_section(cfg, records: list[dict], plot: Path | None, run: Path, facts: dict) -> tuple[list, list]:
    if not stage_done(cfg, "pretrain"):
        return [NOT_RUN.format(what="pretrain/final", stage="pretrain")], []
    rates = series(records, "perf/tokens_per_sec")[1]
    p = facts["pretrain"] = {"val_loss": last(records, "eval/loss"), "val_perplexity": last(records, "eval/perplexity"),
                             "tokens_seen": last(records, "train/tokens_seen"),
                             "steps": records[-1]["step"] if records else None,
                             "tokens_per_sec_median": statistics.median(rates) if rates else None}
    table = markdown_table(["metric", "value"], [
        ["validation loss (nats/token)", p["val_loss"]], ["validation perplexity", p["val_perplexity"]],
        ["steps", p["steps"]], ["tokens seen", f"{p['tokens_seen']:,.0f}" if p["tokens_seen"] else None],
        ["tokens/s (median)", f"{p['tokens_per_sec_median']:,.0f}" if p["tokens_per_sec_median"] else None]],
        align="lr")
    glance = [["pretrain", f"validation loss {p['val_loss']:.3f} (perplexity {p['val_perplexity']:.1f})", ""]] \
        if p["val_loss"] is not None and p["val_perplexity"] is not None else []
    return [table, "", "From pretrain/metrics.jsonl (the last validation).", "",
            image(plot, "pretraining loss", run)], glance


def compare_verdict(scores: list[float], baseline_scores: list[float], baseline: str) -> str:
    """Better or worse than `baseline` on the same prompts when the mean gold gain is beyond two standard errors;
    else within noise (a micro run's few prompts decide nothing)."""
    gain, se = paired_gain(scores, baseline_scores)
    if gain > 2 * se:
        return f"better than {baseline}"
    if gain < -2 * se:
        return f"worse than {baseline}"
    return f"within noise of {baseline} (gain {gain:+.3f} ± {2 * se:.3f} over {len(scores)} prompts)"


def ppo_verdict(ppo, sft) -> str:
    """compare_verdict of PPO's gold against SFT's, flagged as over-optimisation where the RM score rose beyond
    its noise (paired, per prompt) while gold fell or did not rise."""
    verdict = compare_verdict(ppo.scores, sft.scores, "SFT")
    rm = [(a.get("rm_score"), b.get("rm_score")) for a, b in zip(ppo.samples, sft.samples, strict=True)]
    if not rm or any(None in pair for pair in rm):
        return verdict
    gain, se = paired_gain([a for a, _ in rm], [b for _, b in rm])
    if gain <= 2 * se:
        return verdict
    if verdict.startswith("worse"):
        return "RM up, gold down: over-optimised?"
    if verdict.startswith("within") and sum(ppo.scores) <= sum(sft.scores):
        return f"RM up, gold not: over-optimised? ({verdict})"
    return verdict


def rm_verdict(accuracy: float, rankings: int, gold_decided: bool = False) -> str:
    """Above or below chance beyond two standard errors of a coin's accuracy, counted over the rankings that hold
    the pairs accuracy counts (a ranking's pairs share its scores, so they are not independent); else within noise.
    `gold_decided`: accuracy counts only the pairs gold decides, so only the rankings holding one count."""
    noise = 2 * 0.5 / math.sqrt(rankings) if rankings else float("inf")
    if accuracy > 0.5 + noise:
        return "above chance"
    if accuracy < 0.5 - noise:
        return "below chance"
    counted = f"{rankings} ranking{'' if rankings == 1 else 's'}" + (" with gold-decided pairs" if gold_decided else "")
    return f"within noise of chance (±{noise:.3f} over {counted})"


def sft_section(results: dict, plot: Path | None, run: Path) -> tuple[list, list]:
    if "sft" not in results:
        return [NOT_RUN.format(what="sft/final", stage="sft")], []
    s = results["sft"].summary
    if "pretrain" not in results:
        return ["_No pretrained baseline (pretrain/final is missing)._", "",
                compare_table({}, s, ("pretrained", "SFT")), "", image(plot, "gold score by family", run)], \
            [["SFT", f"gold {s['gold/score']:.3f}", ""]]
    b = results["pretrain"].summary
    verdict = compare_verdict(results["sft"].scores, results["pretrain"].scores, "pretrained")
    return ["Gold judge on the held-out prompts; the pretrained model, prompted the same way, is the baseline.", "",
            compare_table(b, s, ("pretrained", "SFT")), "",
            family_compare(results["pretrain"], results["sft"], ("pretrained", "SFT")), "",
            image(plot, "gold score by family", run)], \
        [["SFT", f"gold {s['gold/score']:.3f} vs {b['gold/score']:.3f} pretrained", verdict]]


def rm_section(cfg, measured: dict | None, error: str | None, plot: Path | None, run: Path) -> tuple[list, list]:
    from reward_model.metrics import by_deciding_criterion, family_breakdown

    if measured is None and error is None:
        return [NOT_RUN.format(what="rm/final", stage="rm")], []
    if measured is None:
        logged = read_json(stage_paths(cfg, "rm").root / "eval.json")
        return [f"_Could not re-score the held-out rankings ({error}); the figures the RM stage logged:_", "",
                markdown_table(["metric", "value"], [[k, v] for k, v in logged.items()
                                                      if isinstance(v, (int, float))])], []
    r = measured
    table = markdown_table(["metric", "value"], [
        ["pairwise accuracy (agrees with the labeler)", r["accuracy"]],
        ["gold agreement (agrees with the gold judge)", r.get("gold_accuracy")],
        ["noise ceiling (labeler agrees with gold)", r.get("noise_ceiling")],
        ["accuracy / noise ceiling", r.get("accuracy_over_ceiling")],
        ["(accuracy - 1/2) / (ceiling - 1/2)", r.get("gain_over_chance_to_ceiling")],
        ["accuracy over all pairs", r.get("accuracy_all_pairs")],
        ["held-out rankings", r["rankings"]], ["pairs decided by gold", int(r.get("decided_pairs", 0))]], align="lr")
    ceiling = f" (ceiling {r['noise_ceiling']:.3f})" if r.get("noise_ceiling") is not None else ""
    verdict = rm_verdict(r["accuracy"], int(r.get("accuracy_rankings", r.get("rankings", 0))), "decided_pairs" in r)
    criteria = by_deciding_criterion(r)
    by_criterion = ["Gold agreement by the criterion that contributes most to each decided pair's gold difference:",
                    "", markdown_table(["deciding criterion", "pairs", "gold agreement", "by task family (pairs)"],
                                       [[c, v["pairs"], v["gold_accuracy"], family_breakdown(v["by_family"])]
                                        for c, v in criteria.items()], align="lrrl"), ""] \
        if criteria else []
    source = relative(r["source"], run) + ("/" if Path(r["source"]).is_dir() else "")
    return [f"Re-scored now on the held-out rankings ({source}), which the RM never trained on.",
            "", table, "", *by_criterion,
            image(plot, "RM scores of chosen and rejected responses", run)], \
        [["RM", f"held-out accuracy {r['accuracy']:.3f}{ceiling}", verdict]]


def ppo_section(results: dict, facts: dict, plots: dict, run: Path) -> tuple[list, list]:
    if "ppo" not in results:
        return [NOT_RUN.format(what="ppo/final", stage="ppo")], []
    s = results["ppo"].summary
    curves = ["Proxy (RM) vs gold reward on the training rollouts, from ppo/metrics.jsonl (moving averages over",
              "5% of the steps):", "",
              image(plots["ppo_proxy_vs_gold"], "proxy vs gold reward", run), "",
              image(plots["ppo_rollouts"], "response length, EOS rate and KL during PPO", run)]
    if "sft" not in results:
        return ["_No SFT model to compare with (sft/final is missing)._", "", compare_table({}, s, ("SFT", "PPO")), "",
                *curves], []
    b, kl, wins = results["sft"].summary, facts["kl_to_sft"], facts["win_rate_vs_sft"]
    verdict = ppo_verdict(results["ppo"], results["sft"])
    lines = ["Before (SFT) and after (PPO), same prompts and decoding.", "", compare_table(b, s, ("SFT", "PPO")), "",
             markdown_table(["metric", "value"], [["win rate vs SFT (gold, ties count half)", f"{wins:.1%}"],
                                                  ["KL to SFT, nats/response (exact)", kl["exact"]],
                                                  ["KL to SFT, nats/response (k1 estimate)", kl["k1"]]], align="lr"),
             "", f"KL: the mean over {kl['responses']} responses the PPO policy sampled to the held-out prompts",
             f"({describe_sampling(SamplingConfig(**kl['sampling']))}, as in its rollouts).", "",
             family_compare(results["sft"], results["ppo"], ("SFT", "PPO")), "", *curves]
    return lines, [["PPO", f"gold {s['gold/score']:.3f} vs {b['gold/score']:.3f} SFT, win rate {wins:.0%}, "
                           f"KL {kl['exact']:.2f}", verdict]]


def samples_section(rows: list[dict], results: dict, picked: list[int]) -> list:
    if not results:
        return ["_No policy checkpoint yet._"]
    lines = []
    for n, i in enumerate(picked, 1):
        table = markdown_table(["model", "gold", "answer"],
                               [[stage, r.samples[i]["gold_score"], clip(r.samples[i]["response"]) or "(empty)"]
                                for stage, r in results.items()], align="lrl")
        lines += [f"**{n}. {rows[i]['prompt']}** ({rows[i].get('family', '?')})", "", table, ""]
    return lines[:-1]


def run_facts_section(cfg, facts: dict) -> list:
    cfg_run = run_dir(cfg)
    lines = [markdown_table(["stage", "wall time after setup (s)", "training (s)", "finished"], facts["times"],
                            align="lrrl"), "",
             "Wall time after setup: from the stage writing its config.yaml, once its data and models are loaded, to",
             "its final output, in the launch that wrote it (start-up and loading are not recorded). Training: the",
             "time of the stage's training loop, as it recorded it in eval.json.", "",
             markdown_table(["hardware", ""], [[k, v] for k, v in facts["hardware"].items()]), "",
             markdown_table(["package", "version"], [[k, v] for k, v in facts["packages"].items()]), "",
             f"Git commit: `{facts['git']}`", "", "Resolved configs:", ""]
    for stage in STAGES:
        paths = stage_paths(cfg, stage)
        config_file = paths.of_final("config.yaml")
        if config_file.exists():
            lines += [f"<details><summary>{stage}: {relative(config_file, cfg_run)}</summary>", "", "```yaml",
                      config_file.read_text().rstrip(), "```", "", "</details>", ""]
    return lines


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a stage YAML naming the run's world, e.g. configs/tiny/ppo.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the keys that locate the run and its world "
                             "(run_name=..., seed=...)")
    add_sampling_arguments(parser, EVAL_SAMPLING)
    parser.add_argument("--limit", type=limit_count, default=0, help="evaluate on the first N held-out prompts (0: all)")
    parser.add_argument("--batch-size", type=at_least_one, default=EVAL_BATCH_SIZE)
    parser.add_argument("--samples", type=int_at_least(0, "none"), default=4,
                        help="held-out prompts shown with every model's answer")
    parser.add_argument("--kl-samples", type=at_least_one, default=4, help="responses per prompt for the KL to SFT")
    args = parser.parse_intermixed_args(argv)
    cfg = load_run_config(args.config, args.overrides, "report", (*RUN_KEYS, "seed", "world", "wandb_project"),
                          EVAL_FLAGS)
    sampling = sampling_from_args(args, parser)
    started = time.perf_counter()
    run = run_dir(cfg)
    if not any(stage_done(cfg, s) for s in STAGES):
        sys.exit(f"[report] nothing to report: no stage has finished in {run} (run `make all`, or check run_name)")
    out_dir = run / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    device = default_device()

    # ---- reward models: the RM stage's, and the one PPO optimised (the same unless ppo.yaml named another)
    from reward_model.scoring import RewardScorer

    ppo_settings = run_ppo_settings(cfg)  # as the run's ppo/final trained: its RM, rollout sampling, reward shaping
    ppo_rm_path, ppo_sampling = run_reward_model(cfg, ppo_settings), ppo_settings.sampling
    scorers: dict[str, RewardScorer] = {}
    for path in (str(stage_paths(cfg, "rm").final), ppo_rm_path):
        if path not in scorers and (Path(path) / "config.json").exists():
            scorers[path] = RewardScorer(path, device, cfg.trust_remote_code, needed_by="report")
    rm_scorer, ppo_scorer = scorers.get(str(stage_paths(cfg, "rm").final)), scorers.get(ppo_rm_path)

    # ---- every policy answers the same held-out prompts; the gold judge and PPO's RM score the answers
    world = run_world(cfg)
    rows = held_out_prompts(world)[:args.limit or None]
    judge = load_judge(world)
    facts = {"run": cfg.run_name, "prompts": len(rows), "seed": cfg.seed, "sampling": dataclasses.asdict(sampling),
             "policies": {}}
    results, models = {}, {}
    for stage in POLICIES:
        if not stage_done(cfg, stage):
            continue
        model, tokenizer = load_policy(str(stage_paths(cfg, stage).final), cfg.trust_remote_code, device, "report")
        check_chat_prompts(tokenizer, str(stage_paths(cfg, stage).final), [(rows, str(world / "eval_prompts.jsonl"))])
        print(f"[report] {stage}: answering {len(rows)} held-out prompts", flush=True)
        results[stage] = evaluate_checkpoint(model, tokenizer, rows, judge, sampling, cfg.seed, args.batch_size,
                                             ppo_scorer, reward=ppo_settings)
        facts["policies"][stage] = results[stage].summary
        if stage in ("sft", "ppo"):
            models[stage] = (model, tokenizer)

    # ---- PPO against SFT: paired win rate on the answers above, KL on responses PPO samples
    if "sft" in models and "ppo" in models:
        print("[report] ppo: KL to SFT on sampled responses", flush=True)
        (ppo_model, tokenizer), (sft_model, _) = models["ppo"], models["sft"]
        kl_prompts = [r["prompt"] for r in rows for _ in range(args.kl_samples)]
        # full-vocabulary log-probs of two models at once: a smaller batch than generation's
        facts["kl_to_sft"] = {**kl_to_reference(ppo_model, sft_model, tokenizer, kl_prompts, ppo_sampling, cfg.seed,
                                                min(args.batch_size, 16)), "sampling": dataclasses.asdict(ppo_sampling)}
        facts["win_rate_vs_sft"] = win_rate(results["ppo"].scores, results["sft"].scores)
    models.clear()

    # ---- the reward model on its held-out rankings
    rm_measured, rm_error = None, None
    if rm_scorer is not None:
        try:
            rm_measured = measure_rm(cfg, rm_scorer)
            facts["rm"] = {k: v for k, v in rm_measured.items() if k not in ("chosen", "rejected")}
        except (OSError, ValueError) as e:  # rankings gone or config unreadable: show what training measured
            rm_error = str(e)

    # ---- plots, then the report section by section
    pretrain_records = read_metrics(stage_paths(cfg, "pretrain").of_final("metrics.jsonl"))
    ppo_records = read_metrics(stage_paths(cfg, "ppo").of_final("metrics.jsonl"))
    plots = {"pretrain_loss": plot_pretrain(pretrain_records, out_dir / "pretrain_loss.png"),
             "gold_by_family": plot_families(results, out_dir / "gold_by_family.png") if results else None,
             "rm_scores": plot_rm(rm_measured["chosen"], rm_measured["rejected"], out_dir / "rm_scores.png")
             if rm_measured and rm_measured["chosen"] else None,
             "ppo_proxy_vs_gold": plot_proxy_vs_gold(ppo_records, out_dir / "ppo_proxy_vs_gold.png"),
             "ppo_rollouts": plot_rollouts(ppo_records, out_dir / "ppo_rollouts.png")}
    picked = sample_rows(rows, args.samples)
    facts["samples"] = [{"prompt": rows[i]["prompt"], **{s: r.samples[i]["response"] for s, r in results.items()}}
                        for i in picked]
    facts.update(times=stage_times(cfg), hardware=hardware(), packages=package_versions(), git=git_commit())

    sections, glance = [], []
    for title, (lines, row) in (
            ("Pretrain", pretrain_section(cfg, pretrain_records, plots["pretrain_loss"], run, facts)),
            ("SFT", sft_section(results, plots["gold_by_family"], run)),
            ("Reward model", rm_section(cfg, rm_measured, rm_error, plots["rm_scores"], run)),
            ("PPO", ppo_section(results, facts, plots, run)),
            ("Samples", (samples_section(rows, results, picked), [])),
            ("Run facts", (run_facts_section(cfg, facts), []))):
        sections += [f"## {title}", "", *lines, ""]
        glance += row
    facts["report_seconds"] = time.perf_counter() - started
    # the flags this report used that `make eval` would not take by default
    eval_flags = [f"--{name.replace('_', '-')} {getattr(sampling, name):g}"
                  for name in ("temperature", "top_k", "top_p", "max_new_tokens")
                  if getattr(sampling, name) != getattr(EVAL_SAMPLING, name)] \
        + ([f"--limit {args.limit}"] if args.limit else []) \
        + ([f"--batch-size {args.batch_size}"]
           if sampling.temperature > 0 and args.batch_size != EVAL_BATCH_SIZE else [])
    header = [f"# Pipeline report: run `{cfg.run_name}`", "",
              f"Written {datetime.datetime.now():%Y-%m-%d %H:%M} by `make report` in {run}. Every policy figure",
              f"below was measured just now on the same {len(rows)} held-out world prompts "
              f"({relative(world / 'eval_prompts.jsonl', run)}),",
              f"{describe_sampling(sampling)}, seed {cfg.seed}: `make eval STAGE=<stage>"
              + (f' ARGS="{" ".join(eval_flags)}"' if eval_flags else "") + "` gives the same numbers"
              + (" (sampled answers depend on how the prompts are batched)."
                 if sampling.temperature > 0 and args.batch_size != EVAL_BATCH_SIZE else "."),
              "Gold scores are in [0, 1] (the world's judge); RM scores are PPO's rewards without the KL term"
              + (" (normalised)." if ppo_settings.missing_eos_penalty is None else
                 " (normalised; a reply cut at the length cap, or empty, scores "
                 f"{ppo_settings.missing_eos_penalty:g}, PPO's `missing_eos_penalty`)."), "",
              "## At a glance", "",
              markdown_table(["stage", "measured", "verdict"], glance) if glance else "_No stage has finished._", ""]
    footer = [f"_Measured in {facts['report_seconds']:.0f}s._", ""]
    report_file = run / "report.md"
    # atomic: make takes an existing report.md for a finished one
    write_text_atomic(out_dir / "report.json", json.dumps(facts, indent=1, default=str) + "\n")
    write_text_atomic(report_file, "\n".join(header + sections + footer))
    log_to_wandb(cfg, out_dir, report_file, plots, facts, results)
    print(f"[report] {report_file}, plots in {out_dir} ({facts['report_seconds']:.0f}s)")
    return report_file


def log_to_wandb(cfg, out_dir: Path, report_file: Path, plots: dict, facts: dict, results: dict) -> None:
    """A `report` run in the run's W&B group: the plots as images, the headline numbers as its summary."""
    from pipeline.tracking import Tracker

    upstream = {s: stage_paths(cfg, s).final for s in ("pretrain", "sft", "rm", "ppo") if stage_done(cfg, s)}
    tracker = Tracker(shared_config(cfg), "report", out_dir / "metrics.jsonl", upstream=upstream)
    headline = {f"report/{stage}/{key}": results[stage].summary[key] for stage in results
                for key in ("gold/score", "gold/correctness", "eos_rate", "rm/score") if key in results[stage].summary}
    headline.update({f"report/pretrain/{k}": v for k, v in facts.get("pretrain", {}).items() if v is not None})
    headline.update({f"report/rm/{k}": v for k, v in facts.get("rm", {}).items() if isinstance(v, (int, float))})
    if "kl_to_sft" in facts:
        headline.update({"report/ppo/win_rate_vs_sft": facts["win_rate_vs_sft"],
                         "report/ppo/kl_to_sft": facts["kl_to_sft"]["exact"],
                         "report/ppo/kl_to_sft_k1": facts["kl_to_sft"]["k1"]})
    tracker.summary(headline)
    if tracker.run is not None:
        import wandb

        tracker.run.log({f"report/{name}": wandb.Image(str(path)) for name, path in plots.items() if path})
        artifact = wandb.Artifact(f"{cfg.run_name}-report", type="report")
        artifact.add_file(str(report_file))
        for path in plots.values():
            if path:
                artifact.add_file(str(path), name=f"report/{path.name}")
        tracker.run.log_artifact(artifact)
    tracker.finish()


if __name__ == "__main__":
    run_main(main, interrupted="interrupted")
