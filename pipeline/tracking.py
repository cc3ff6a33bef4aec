"""Tracking: W&B, the console and runs/<run>/<stage>/metrics.jsonl, from the main process only.

The stages of one pipeline run share a W&B group (the run name) with `job_type` set to the stage. Each stage
logs its final/ as a model artifact (a reference to the local path). Online, the next stage declares it as
input (`use_artifact`), so the lineage graph shows the chain; offline (wandb refuses `use_artifact` there),
the upstream run id and checkpoint path go into the run config instead.

With no credentials W&B runs offline and the stage prints the `wandb sync` command at the end. A mode that
`wandb offline` or `wandb disabled` saved wins over credentials, as in plain wandb; `WANDB_MODE` wins over both.
A resumed stage continues its interrupted attempt's W&B run when online (its id is kept in wandb_run.json);
wandb cannot continue an offline run, so offline each attempt is a run of its own.
`WANDB_MODE=disabled` turns it off. Keys and tokens are never logged.
"""
from __future__ import annotations

import configparser
import json
import math
import netrc
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm.auto import tqdm
from transformers import TrainerCallback

from pipeline.checkpoint import write_text_atomic
from pipeline.config import to_dict

# beside a stage's metrics.jsonl: the W&B run its latest attempt logs to, which a resumed attempt continues
WANDB_RUN_FILE = "wandb_run.json"
# a fresh start's predecessor: the metrics of the stage's earlier run, kept until the next fresh start
EARLIER_METRICS_FILE = "metrics.earlier.jsonl"


def wandb_mode() -> str:
    """`WANDB_MODE` if set (`dryrun` is wandb's old name for offline); else offline or disabled if `wandb offline`
    or `wandb disabled` saved that in wandb's settings files (`_saved_setting`); otherwise online when credentials
    for the W&B server exist, offline when they do not. Credentials: `WANDB_API_KEY`, `WANDB_IDENTITY_TOKEN_FILE`,
    or a `wandb login` entry in the netrc file (`NETRC`, default ~/.netrc) for the server's host (`WANDB_BASE_URL`,
    or the `base_url` that `wandb login --host` saved; default api.wandb.ai)."""
    mode = os.environ.get("WANDB_MODE") or _saved_mode()
    if mode:
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    # the netrc entry wandb writes and reads is the server's host with its port (localhost:8080)
    saved_url, _ = _saved_setting("base_url") or (None, None)
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or saved_url or "https://api.wandb.ai").netloc
    netrc_file = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        # an explicit path, as wandb reads it: Python's own lookup refuses a netrc others can read, wandb does not
        if host and netrc.netrc(str(netrc_file)).authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):  # none, unreadable or malformed: wandb cannot log in with it either
        pass
    return "offline"


def _saved_mode() -> str | None:
    """The mode `wandb offline` / `wandb disabled` saved, if it turns W&B off or offline. We pass a mode to
    wandb.init, which overrides the files', so they must be read here or a stage ignores them. A saved `online`
    (or none) leaves it to the credentials, as before."""
    saved = _saved_setting("mode")
    return saved[0] if saved and saved[0] in ("offline", "disabled", "dryrun") else None


def _settings_files() -> list[Path]:
    """wandb's settings files, as wandb 0.31 finds them when it loads its settings (wandb_setup._load_settings),
    the one that wins first: the workspace file `wandb offline` / `wandb disabled` write in the directory a command
    runs from (`.wandb/settings` if `.wandb/` exists, else `wandb/settings`), then the global one
    (`$WANDB_CONFIG_DIR/settings`, default ~/.config/wandb/settings). wandb reads the workspace file under the
    working directory before it applies WANDB_DIR, so WANDB_DIR does not move it."""
    workspace = Path(".wandb" if Path(".wandb").exists() else "wandb").absolute() / "settings"
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    return [workspace, config_dir / "settings"]


def _saved_setting(key: str) -> tuple[str, Path] | None:
    """A setting's value in wandb's settings files (section [default]) and the file it came from. A file wandb
    cannot read counts as empty, as in wandb."""
    for path in _settings_files():
        settings = configparser.ConfigParser()
        try:
            settings.read(path, encoding="utf-8")
            value = settings.get("default", key, fallback=None)
        except (OSError, UnicodeError, configparser.Error):
            continue
        if value is not None:
            return value, path
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _offline_reason() -> str:
    """Why W&B runs offline. wandb's own banner then says only "Run `wandb online`", a setting that changes
    nothing where there are no credentials."""
    if os.environ.get("WANDB_MODE"):
        return f"WANDB_MODE={os.environ['WANDB_MODE']}"
    saved = _saved_setting("mode")
    if saved and saved[0] in ("offline", "dryrun"):
        return f"`wandb offline` saved mode = {saved[0]} in {saved[1]} (`wandb online` undoes it)"
    return "no W&B credentials here (set WANDB_API_KEY, or run `wandb login`, to log online)"


def _wandb_command() -> str:
    """`wandb` if the shell finds it, else the venv's own (make never activates the venv)."""
    if shutil.which("wandb"):
        return "wandb"
    beside = Path(sys.executable).parent / "wandb"
    return os.path.relpath(beside) if beside.exists() else "wandb"


class Tracker:
    """Log metrics to W&B, metrics.jsonl and the console. A no-op on non-main processes."""

    def __init__(self, cfg: Any, stage: str, metrics_file: Path, is_main: bool = True,
                 upstream: dict[str, Path] | None = None, start_step: int = 0):
        """`start_step`: where the run (re)starts. metrics.jsonl keeps only the rows up to it: a resumed run
        logs the steps after its checkpoint again, and a fresh run starts the file over."""
        self.stage, self.is_main, self.metrics_file = stage, is_main, Path(metrics_file)
        self.run = None
        self.muted = False  # on: log and table write nothing (a resumed run recomputing a step already logged)
        # steps the W&B run already holds: a resumed run continues the interrupted one's W&B run, which has the
        # steps up to the kill; the replayed ones are not sent again (W&B would drop them, warning at each)
        self.wandb_holds_through = -1
        if not is_main:
            return
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        if self.metrics_file.exists():
            steps = [(line, _step_of(line)) for line in self.metrics_file.read_text().splitlines()]
            earlier = self.metrics_file.with_name(EARLIER_METRICS_FILE)
            # a fresh start: the earlier run's metrics stay beside, since this one may fail (they are those of
            # the final/ in place, if that run finished)
            if not start_step and steps:
                os.replace(self.metrics_file, earlier)
                print(f"[{stage}] starting fresh: the earlier run's metrics moved to {earlier}")
            kept = [line for line, step in steps if start_step and step is not None and step <= start_step]
            write_text_atomic(self.metrics_file, "".join(line + "\n" for line in kept))
        self.mode = wandb_mode()
        # in checkpoints/, so it moves with them to checkpoints.earlier/ and back; a fresh start forgets it
        run_record = self.metrics_file.parent / "checkpoints" / WANDB_RUN_FILE
        if not start_step:
            run_record.unlink(missing_ok=True)
        if self.mode == "disabled":
            # a `wandb disabled` left in a settings file is easily forgotten: say where it is (WANDB_MODE is seen)
            saved = None if os.environ.get("WANDB_MODE") else _saved_setting("mode")
            if saved:
                print(f"[{stage}] W&B is off: `wandb disabled` saved mode = disabled in {saved[1]}; `wandb enabled` "
                      f"turns it back on. Metrics go to {self.metrics_file} and the console only.")
            return
        if self.mode == "offline":
            print(f"[{stage}] W&B logs offline: {_offline_reason()}. The stage prints the `wandb sync` command that "
                  "uploads the run when it ends.")
        import wandb

        config = to_dict(cfg)
        upstream_info = {name: _upstream_record(path) for name, path in (upstream or {}).items()}
        if upstream_info and self.mode != "online":
            config["upstream"] = upstream_info
        resumed_id = _resumable_run_id(run_record) if start_step and self.mode == "online" else None
        self.run = wandb.init(project=cfg.wandb_project, group=cfg.run_name, job_type=stage,
                              name=f"{cfg.run_name}-{stage}", config=config, dir=str(self.metrics_file.parent),
                              mode=self.mode, reinit="finish_previous",
                              id=resumed_id, resume="allow" if resumed_id else None)
        if resumed_id:
            self.wandb_holds_through = self.run.step - 1  # what the run holds, whichever attempts sent it
            print(f"[{stage}] W&B: continuing run {resumed_id} from step {start_step}")
        elif start_step:  # wandb cannot resume an offline run (it ignores resume= there)
            print(f"[{stage}] W&B: this resumed attempt is a run of its own ({self.run.id}); W&B continues a run "
                  "only online")
        if run_record.parent.is_dir():  # a stage that checkpoints (and so can resume)
            write_text_atomic(run_record, json.dumps({"id": self.run.id, "mode": self.mode}) + "\n")
        if self.mode == "online":
            for name, info in upstream_info.items():
                if info.get("artifact"):
                    try:
                        self.run.use_artifact(info["artifact"])
                    except Exception as e:  # lineage is nice to have; never fail a stage over it
                        print(f"[{stage}] could not link upstream artifact {info['artifact']}: {e}")

    def log(self, metrics: dict[str, Any], step: int, console: bool = True,
            console_keys: Iterable[str] | None = None) -> None:
        """`console_keys`: print only these (the rest still go to W&B and metrics.jsonl).

        The NaN check runs before the main-process-only part: training metrics, which every rank logs with the
        same reduced values, then stop all ranks together instead of leaving the others waiting in the next
        collective. (Evaluations log from the main process alone.)"""
        clean = {k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}
        for key, value in clean.items():
            # any NaN; an infinite loss too (other figures, e.g. a ratio's max, may overflow on their own)
            if isinstance(value, float) and (math.isnan(value) or ("loss" in key and math.isinf(value))):
                raise FloatingPointError(f"[{self.stage}] {key} is {value} at step {step}; stopping the run. "
                                         "Lower the learning rate or check the data.")
        if not self.is_main or self.muted:
            return
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.run is not None and step > self.wandb_holds_through:
            self.run.log(clean, step=step)
        if console:
            shown = clean if console_keys is None else {k: clean[k] for k in console_keys if k in clean}
            tqdm.write(f"[{self.stage}] step {step} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A W&B table (samples with their scores); also kept in metrics.jsonl for the report."""
        if not self.is_main or self.muted:
            return
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, "table": key, "columns": columns, "rows": rows}) + "\n")
        if self.run is not None and step > self.wandb_holds_through:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.is_main and self.run is not None:
            for key, value in metrics.items():
                self.run.summary[key] = value

    def finish(self, final_dir: Path | None = None) -> None:
        if not self.is_main or self.run is None:
            return
        import wandb

        if final_dir is not None:
            artifact = wandb.Artifact(name=f"{self.run.group}-{self.stage}", type="model",
                                      metadata={"path": str(Path(final_dir).resolve())})
            artifact.add_reference(f"file://{Path(final_dir).resolve()}", checksum=False)
            self.run.log_artifact(artifact)
            _write_run_record(final_dir, self.run, self.stage)
        run_dir = self.run.dir
        self.run.finish()
        if self.mode == "offline":
            offline_dir = Path(run_dir).parent
            print(f"[{self.stage}] W&B ran offline. To upload this run: {_wandb_command()} sync {offline_dir}")


def _resumable_run_id(run_record: Path) -> str | None:
    """The W&B run an interrupted attempt of this stage logged to online (WANDB_RUN_FILE), if any."""
    try:
        record = json.loads(run_record.read_text())
    except (OSError, ValueError):
        return None
    return record.get("id") if isinstance(record, dict) and record.get("mode") == "online" else None


def _write_run_record(final_dir: Path, run: Any, stage: str) -> None:
    """Beside the checkpoint: which W&B run made it, so the next stage can record its lineage."""
    record = {"stage": stage, "wandb_run_id": run.id, "wandb_project": run.project,
              "artifact": f"{run.group}-{stage}:latest"}
    write_text_atomic(Path(final_dir) / "pipeline_run.json", json.dumps(record, indent=1) + "\n")


def _upstream_record(path: Path) -> dict:
    record_file = Path(path) / "pipeline_run.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    return {"path": str(Path(path).resolve()) if Path(path).exists() else str(path), **record}


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line a killed run left half-written."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


# fp16 loss scaling starts at 2**16 and halves on every overflow: below 1, overflows are not the scale's doing
MIN_LOSS_SCALE = 1.0


def stop_if_not_finite(grad_norm: Any, stage: str, step: int, hint: str, scaler: Any = None) -> None:
    """Raise if the gradient norm from clipping is NaN or inf; call it before the optimizer step.

    A non-finite loss in any micro-batch on any rank makes the all-reduced gradients, and so this norm,
    non-finite on every rank alike: all ranks stop together (none is left waiting in a collective), with no
    extra communication, and before the step, so the weights and the last checkpoint stay clean.
    Under fp16 loss scaling (`scaler`: accelerate's GradScaler) an inf norm is an overflow the scaler handles by
    skipping the step and halving its scale; the run stops only once the scale has fallen below MIN_LOSS_SCALE."""
    value = float(grad_norm)
    if math.isfinite(value):
        return
    if scaler is not None and scaler.get_scale() >= MIN_LOSS_SCALE:
        return
    scaled = f"; the fp16 loss scale has fallen to {scaler.get_scale():g}" if scaler is not None else ""
    raise FloatingPointError(f"[{stage}] gradient norm is {value} at step {step} (a non-finite loss on some "
                             f"micro-batch or rank{scaled}); stopping. {hint}")


class Throughput:
    """Tokens per second between two calls of `rate`."""

    def __init__(self):
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self, accelerator: Any = None) -> float:
        """With `accelerator`, every rank's tokens (each rank adds its own, and every rank must call): ranks whose
        batches differ in length (the RM's rankings) would make rank 0's count times the ranks another figure."""
        tokens = self.tokens
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            tokens = accelerator.reduce(torch.tensor(float(tokens), device=accelerator.device), reduction="sum").item()
        now = time.perf_counter()
        value = tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return value


class LogWindow:
    """Per-micro-batch figures (loss, ...) summed on this rank since the last log. Its state goes into each
    checkpoint, so a resumed run's first log averages the micro-batches an uninterrupted run's would: restarted
    empty, it averaged only those after the checkpoint."""

    def __init__(self, *names: str):
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.sums, self.count = [0.0] * len(self.names), 0

    def add(self, *values: Any) -> None:
        """Numbers or tensors (kept on their device: no sync per micro-batch)."""
        self.sums = [s + v for s, v in zip(self.sums, values)]
        self.count += 1

    def means(self, accelerator: Any) -> dict[str, float]:
        """Each figure's mean over the window's micro-batches on every rank (ranks count alike); then empty."""
        import torch

        local = torch.tensor([float(s) / self.count for s in self.sums], device=accelerator.device)
        means = accelerator.reduce(local, reduction="mean").tolist()
        self.reset()
        return dict(zip(self.names, means))

    def state(self, accelerator: Any) -> dict:
        """The sums over all ranks (every rank calls this), for a checkpoint."""
        import torch

        local = torch.tensor([float(s) for s in self.sums], device=accelerator.device)
        return {"sums": accelerator.reduce(local, reduction="sum").tolist(), "count": self.count}

    def restore(self, state: dict | None, processes: int) -> None:
        """Each of the `processes` ranks (as many as saved: resume refuses another number) takes an equal share of
        the saved sums, so the mean over ranks comes out as it would have."""
        if state:  # a checkpoint from before windows were saved: start empty
            self.sums = [s / processes for s in state["sums"]]
            self.count = state["count"]


class TrackerCallback(TrainerCallback):
    """Route a transformers Trainer's logs through our Tracker (the Trainer's own reporting is off)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.last_tokens, self.last_time = 0, time.perf_counter()
        self.resumed = False

    def _restart_clock(self, state) -> None:
        self.last_tokens, self.last_time = getattr(state, "num_input_tokens_seen", 0) or 0, time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        # on resume the token count starts at the checkpoint's, not at 0
        self._restart_clock(state)
        self.resumed = state.global_step > 0

    def on_evaluate(self, args, state, control, **kwargs):
        # tokens/s measures training: time spent evaluating, or saving (below), does not count
        self._restart_clock(state)

    def on_save(self, args, state, control, **kwargs):
        self._restart_clock(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        metrics = {}
        for key, value in logs.items():
            if not isinstance(value, (int, float)) or key in ("epoch", "total_flos"):
                continue
            if key.startswith("train_") and key.endswith("_per_second"):
                continue  # the Trainer's whole-run rates count evaluation time too; perf/tokens_per_sec does not
            if key.startswith("eval_"):
                metrics[f"eval/{key[5:]}"] = value
            elif key == "train_loss":  # the closing log's mean over the whole run: not a point of the loss curve
                if not self.resumed:  # the Trainer's mean covers this launch's steps alone
                    metrics["train/mean_loss"] = value
            elif key == "num_tokens" and getattr(state, "num_input_tokens_seen", 0):
                # TRL's count starts at 0 in every launch; the Trainer's (non-padding, every process) is checkpointed
                metrics["train/num_tokens"] = state.num_input_tokens_seen
            elif key.startswith("train_"):
                metrics[f"train/{key[6:]}"] = value
            else:
                metrics[f"train/{key}"] = value
        tokens = getattr(state, "num_input_tokens_seen", 0) or 0
        if tokens > self.last_tokens and not any(k.startswith("eval/") for k in metrics):
            now = time.perf_counter()
            metrics["perf/tokens_per_sec"] = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            self.last_tokens, self.last_time = tokens, now
        if metrics:
            self.tracker.log(metrics, step=state.global_step)
