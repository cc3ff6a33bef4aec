# The pipeline: pretrain -> sft -> (prefs ->) rm -> ppo, then a report.
#
#   make all                  set up, then run every stage of the `tiny` recipe and write the report
#   make test                 set up, then run the test suite
#   make sft RECIPE=micro     run one stage; missing upstream stages are built first
#                             (stages: pretrain sft prefs rm ppo)
#   make report               build what is missing through ppo, then evaluate every stage: runs/<RUN>/report.md
#   make eval STAGE=sft       held-out gold evaluation of one stage (or STAGE=path/to/a/checkpoint)
#   make eval-rm              the run's reward model on its held-out rankings (ARGS="--data path-or-hub-id --split test")
#   make chat STAGE=ppo       talk to a stage's model (ARGS="--temperature 0 --prompt '...'" for one greedy reply)
#   make bench                throughput benchmarks of the tiny recipe (whatever RECIPE), printed as a table
#   make setup                only the venv (.venv; `. .venv/bin/activate` to use it in a shell)
#   make clean                delete runs/ (every run's outputs and checkpoints), wandb/ and .pytest_cache/
#
# Variables:
#   PYTHON=python3.11         the Python setup makes the venv with (default: python3; 3.10 or newer)
#   RECIPE=tiny|micro|gpu     which configs/<recipe>/ to use
#   RUN=<name>                run name: outputs in runs/<RUN>/<stage>/, one W&B group (default: RECIPE)
#   ACCELERATE_CONFIG=<file>  accelerate launch config (default: configs/accelerate/cpu.yaml, or
#                             single_gpu.yaml when a GPU is present)
#   ARGS="k=v ..."            config overrides for the stage you name on the command line
#   PRETRAIN_ARGS, SFT_ARGS, PREFS_ARGS, RM_ARGS, PPO_ARGS
#                             overrides for that stage whenever it runs (also when built as a dependency)
#   RESUME=1                  every stage that runs continues from its newest checkpoint (resume=true), e.g.
#                             `make all RESUME=1` after an interrupted `make all`

RECIPE ?= tiny
RUN ?= $(RECIPE)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
ACCELERATE_CONFIG ?= configs/accelerate/$(if $(HAS_GPU),single_gpu,cpu).yaml
# --quiet: a stage that stops on bad input says why itself; no launcher traceback after its message.
# On the CPU config, the threads per process accelerate would choose itself (OMP_NUM_THREADS, else the physical
# cores), given so that it does not warn at every launch; read when a stage starts, once the venv exists.
CPU_THREADS = $(or $(OMP_NUM_THREADS),$(shell $(PY) -c "import psutil; print(psutil.cpu_count(logical=False) or 1)"))
# (pipeline/launch.py is `accelerate launch` that leaves Ctrl-C to the stage: no launcher traceback under its message)
LAUNCH = $(PY) -m pipeline.launch --quiet --config_file $(ACCELERATE_CONFIG) \
	$(if $(filter %/cpu.yaml,$(ACCELERATE_CONFIG)),--num_cpu_threads_per_process $(CPU_THREADS))
RUNDIR := runs/$(RUN)
# which torch build setup installed: a venv set up where no GPU was visible is set up again on a GPU host
SETUP_STAMP := $(VENV)/.installed-$(if $(HAS_GPU),cuda,cpu)
export TOKENIZERS_PARALLELISM ?= false
export RECIPE  # a stage that refuses a stale upstream names the make command that rebuilds it
# cpu_ddp.yaml is two DDP processes on the CPU: without this accelerate makes each a run of its own
ifneq ($(filter %cpu_ddp.yaml,$(ACCELERATE_CONFIG)),)
export ACCELERATE_USE_CPU ?= 1
endif

# stage outputs: a stage is done when its final/ checkpoint exists
PRETRAIN_OUT := $(RUNDIR)/pretrain/final/config.json
SFT_OUT := $(RUNDIR)/sft/final/config.json
# collection writes world_data.json last; it writes it alone when rm.yaml sets train_data (nothing to collect)
PREFS_OUT := $(RUNDIR)/prefs/world_data.json
RM_OUT := $(RUNDIR)/rm/final/config.json
PPO_OUT := $(RUNDIR)/ppo/final/config.json
REPORT_OUT := $(RUNDIR)/report.md

# $(call stage,<module>,<config>,<stage args>,<command-line args>)
stage = $(LAUNCH) -m $(1) --config configs/$(RECIPE)/$(2).yaml run_name=$(RUN) $(if $(filter 1 true yes,$(RESUME)),resume=true) $(3) $(4)

.PHONY: help setup all pretrain sft prefs rm ppo report eval eval-rm chat test bench clean
.DEFAULT_GOAL := help

help:
	@sed -n '1,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

# ---- setup: a venv with CPU torch where there is no CUDA -------------------------------------------
setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml
	@# a venv without a working pip (an interrupted or failed venv, a removed interpreter) is made again
	@if ! $(PY) -m pip --version >/dev/null 2>&1; then \
	  $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
	    echo "setup: $(PYTHON) is not Python 3.10 or newer; name one with PYTHON=python3.11"; exit 1; }; \
	  echo "setup: creating $(VENV) with $(PYTHON)"; \
	  $(PYTHON) -m venv --clear $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(HAS_GPU)" ]; then \
	  echo "setup: GPU found, installing the default (CUDA) torch build"; \
	  $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null || { \
	    $(PY) -m pip uninstall -y -q torch 2>/dev/null; $(PY) -m pip install -q "torch==2.13.0"; }; \
	  $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null || \
	    echo "setup: WARNING: nvidia-smi sees a GPU but this torch cannot use it (a driver older than its CUDA?):" \
	      "every stage would train on the CPU"; \
	elif [ "$$(uname -s)" != Linux ]; then \
	  echo "setup: no CUDA here ($$(uname -s)): PyPI's torch build for this system has no CUDA in it"; \
	  $(PY) -m pip install -q "torch==2.13.0"; \
	elif ! $(PY) -c "import torch" 2>/dev/null; then \
	  echo "setup: no GPU, installing the CPU build of torch"; \
	  $(PY) -m pip install -q "torch==2.13.0+cpu" 2>$(VENV)/torch-local.log || { \
	    echo "setup: pip's configured indexes gave no torch 2.13.0+cpu (why: $(VENV)/torch-local.log);" \
	      "trying download.pytorch.org"; \
	    $(PY) -m pip install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu \
	      --extra-index-url https://pypi.org/simple; }; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# ---- stages: naming a stage runs it; its missing upstream stages are built first ------------------
# a stage writes final/ atomically: make, interrupted (Ctrl-C) after that, must not delete the finished output
.PRECIOUS: $(PRETRAIN_OUT) $(SFT_OUT) $(PREFS_OUT) $(RM_OUT) $(PPO_OUT)
all: $(REPORT_OUT)

pretrain: | $(SETUP_STAMP)
	$(call stage,stages.pretrain,pretrain,$(PRETRAIN_ARGS),$(ARGS))
$(PRETRAIN_OUT): | $(SETUP_STAMP)
	$(call stage,stages.pretrain,pretrain,$(PRETRAIN_ARGS))

sft: $(PRETRAIN_OUT)
	$(call stage,stages.sft,sft,$(SFT_ARGS),$(ARGS))
$(SFT_OUT): $(PRETRAIN_OUT)
	$(call stage,stages.sft,sft,$(SFT_ARGS))

# collection reads these of RM_ARGS (and of ARGS of `make rm`) too: an RM given its own preference data (train_data.*)
# collects nothing, only leaving the record make waits for; the collection settings (K, sampling, ...) shape the
# rankings it trains on, and the seed their held-out split. RM training reads those of PREFS_ARGS in turn: it records
# what its rankings were collected with. (Rankings already collected are not collected again: RM training then
# refuses settings they were not collected with.)
COLLECTION_ARGS = train_data.% train_data=% eval_data.% eval_data=% policy=% prompts.% prompts=% max_prompts=% \
	responses_per_prompt=% sampling.% sampling=% max_prompt_tokens=% generation_batch_size=% mix_static=% \
	eval_fraction=% seed=% trust_remote_code=%
RM_DATA_ARGS = $(filter $(COLLECTION_ARGS),$(RM_ARGS) $(if $(filter rm,$(MAKECMDGOALS)),$(ARGS)))
RM_COLLECTED_ARGS = $(filter $(COLLECTION_ARGS),$(PREFS_ARGS))
prefs: $(SFT_OUT)
	$(call stage,reward_model.collect,rm,$(PREFS_ARGS) $(filter $(COLLECTION_ARGS),$(RM_ARGS)),$(ARGS))
$(PREFS_OUT): $(SFT_OUT)
	$(call stage,reward_model.collect,rm,$(PREFS_ARGS) $(RM_DATA_ARGS))

# the RM starts from SFT's final/ (and, by default, learns from rankings of its samples)
rm: $(PREFS_OUT) $(SFT_OUT)
	$(call stage,reward_model.train,rm,$(RM_COLLECTED_ARGS) $(RM_ARGS),$(ARGS))
$(RM_OUT): $(PREFS_OUT) $(SFT_OUT)
	$(call stage,reward_model.train,rm,$(RM_COLLECTED_ARGS) $(RM_ARGS))

ppo: $(RM_OUT) $(SFT_OUT)
	$(call stage,stages.ppo,ppo,$(PPO_ARGS),$(ARGS))
$(PPO_OUT): $(RM_OUT) $(SFT_OUT)
	$(call stage,stages.ppo,ppo,$(PPO_ARGS))

# ---- after training ---------------------------------------------------------------------------------
report: $(PPO_OUT)
	$(PY) -m pipeline.report --config configs/$(RECIPE)/ppo.yaml run_name=$(RUN) $(ARGS)
# `make all` writes the report once per chain; `make report` evaluates again
$(REPORT_OUT): $(PPO_OUT)
	$(PY) -m pipeline.report --config configs/$(RECIPE)/ppo.yaml run_name=$(RUN)

STAGE ?= ppo
eval: | $(SETUP_STAMP)
	$(PY) -m pipeline.evaluate --config configs/$(RECIPE)/ppo.yaml run_name=$(RUN) --stage $(STAGE) $(ARGS)

eval-rm: | $(SETUP_STAMP)
	$(PY) -m reward_model.evaluate --config configs/$(RECIPE)/rm.yaml run_name=$(RUN) $(ARGS)

chat: | $(SETUP_STAMP)
	@$(PY) -m pipeline.chat --config configs/$(RECIPE)/ppo.yaml run_name=$(RUN) --stage $(STAGE) $(ARGS)

# ---- checks -----------------------------------------------------------------------------------------
# pytest exits 5 when it collects no tests. With a selection in ARGS (-k or -m that matches nothing, a test path)
# say so and pass; without one (`make test`, `make test ARGS=-v`) the suite itself is missing, and a run that
# tested nothing fails (CI runs plain `make test`)
# (W&B: the suite keeps it off unless a test opts in, tests/conftest.py; ARGS may name test files, testpaths
# in pyproject.toml is the whole suite)
test: | $(SETUP_STAMP)
	$(PY) -m pytest -q $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ] && [ -n "$(filter -k% -m% tests% %.py %::%,$(ARGS))" ]; then \
	  echo "pytest collected no tests for the given ARGS"; exit 0; fi; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite in tests/ is missing or empty"; fi; exit $$rc

bench: | $(SETUP_STAMP)
	WANDB_MODE=disabled $(PY) -m pipeline.bench $(ARGS)

clean:
	rm -rf runs wandb .pytest_cache
