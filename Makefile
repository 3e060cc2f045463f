# sd-lambda — the single entry point. `make help` lists every target.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
INSTALL_STAMP := $(VENV)/.stamp-install
OPS_STAMP := $(VENV)/.stamp-ops
# torch (pinned in pyproject's [runtime] extra) comes from PyTorch's CPU wheel index when it answers within
# a few seconds: the default index's Linux build pulls gigabytes of CUDA libraries. Otherwise it comes from
# the default index, and the install fails if that build is a CUDA one.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_SPEC := $(firstword $(shell sed -n 's/^ *"\(torch==[^"]*\)",*$$/\1/p' pyproject.toml))
# $(call install_cpu_torch,<venv python>,<target>): torch alone and first, from the CPU index when it answers, so
# the extras installed next find it and never ask for another build.
define install_cpu_torch
if $(1) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)' \
		'$(TORCH_INDEX_URL)' 2>/dev/null; then \
	$(1) -m pip install --quiet --index-url '$(TORCH_INDEX_URL)' '$(TORCH_SPEC)'; \
else \
	echo "make $(2): $(TORCH_INDEX_URL) did not answer; torch comes from the default index" >&2; \
	$(1) -m pip install --quiet '$(TORCH_SPEC)'; \
fi
endef
# $(call refuse_cuda_torch,<venv python>,<venv>,<target>)
define refuse_cuda_torch
$(1) -c 'import sys, torch; sys.exit(torch.version.cuda and f"make $(3): torch {torch.__version__} is a CUDA build (GPU libraries this CPU-only project never uses): rm -rf $(2), then make $(3) where $(TORCH_INDEX_URL) is reachable or with TORCH_INDEX_URL=<an index with the CPU build>")'
endef
# The OpenVINO export tools (optimum-intel, NNCF) cap transformers below [runtime]'s: their own venv.
EXPORT_VENV ?= .venv-export
EXPORT_STAMP := $(EXPORT_VENV)/.stamp-export
EXPORT_PY := $(EXPORT_VENV)/bin/python
# checkov pins an old boto3: it lives in its own venv.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.stamp-checkov
CHECKOV_SPEC := checkov>=3.3.30,<4
# INFRA: the Terraform root (--infra) every stack target uses; the offline checks also take each example
# under it (sd_lambda.devtools.tfcheck).
INFRA ?= infra
TF_EXAMPLES = $(patsubst %/,%,$(wildcard $(INFRA)/examples/*/))
# Example variables for planning the root stack, and per example (tests/infra/examples/<example>.tfvars).
TF_PLAN_VARS ?= $(wildcard tests/infra/offline.tfvars)
TF_EXAMPLE_VARS_DIR ?= tests/infra/examples

# Each make variable is passed one-to-one to its sd-lambda flag (INFRA= --infra, OUT= --output,
# PROMPT= --prompt, JSON=1 --json, ...; the table is sd_lambda.cli.MAKE_VARIABLES). SD_LAMBDA_FROM_MAKE=1
# makes an error name the variable to set (PROMPT="...") instead of the flag.
SD_LAMBDA = SD_LAMBDA_FROM_MAKE=1 $(BIN)/sd-lambda
# A value as one single-quoted shell word, whatever quotes or spaces it holds: $(call q,$(NAME)); a
# prompt is taken as typed, a $ in it included: $(call q,$(value PROMPT))
q = '$(subst ','\'',$(1))'
JSON_FLAG = $(if $(filter 1,$(JSON)),--json)

.PHONY: help install test lint format docs clean

help: ## List every target with a one-line description
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(INSTALL_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24,<27"
	@# torch first and alone, so the extras below find it installed and never ask for another build.
	$(call install_cpu_torch,$(PY),install)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(call refuse_cuda_torch,$(PY),$(VENV),install)
	touch $@ $(OPS_STAMP)

$(OPS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24,<27"
	$(PY) -m pip install --quiet -e ".[ops]"
	touch $@

$(EXPORT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_PY) -m pip install --quiet --upgrade "pip>=24,<27"
	$(call install_cpu_torch,$(EXPORT_PY),install-export)
	$(EXPORT_PY) -m pip install --quiet -e ".[export]"
	@# optimum-intel requires torchvision, which exporting a Stable Diffusion pipeline never uses; a build
	@# that does not match the installed torch (the default index's, next to a CPU torch) breaks
	@# transformers' import, so such a build is removed.
	$(EXPORT_PY) -c 'import torchvision' 2>/dev/null || $(EXPORT_PY) -m pip uninstall --quiet --yes torchvision
	$(call refuse_cuda_torch,$(EXPORT_PY),$(EXPORT_VENV),install-export)
	$(EXPORT_PY) -c 'import optimum.intel, nncf, openvino_tokenizers'
	touch $@

# The playground's browser test drives Debian's Chromium through Debian's chromedriver, never a downloaded
# driver. The two binaries are their own stamps: when one is missing, apt-get installs both (sudo when not root).
BROWSER_BINARIES := /usr/bin/chromium /usr/bin/chromedriver
BROWSER_PACKAGES := chromium chromium-driver
$(BROWSER_BINARIES):
	@for binary in $(BROWSER_BINARIES); do [ -x "$$binary" ] || missing=$$binary; done; \
	[ -n "$${missing:-}" ] || exit 0; \
	if ! command -v apt-get >/dev/null; then \
		echo "make install-browser: no apt-get here: install Chromium and its chromedriver as $(BROWSER_BINARIES) (Debian: $(BROWSER_PACKAGES))" >&2; exit 1; \
	elif [ "$$(id -u)" -eq 0 ]; then apt=(env DEBIAN_FRONTEND=noninteractive apt-get); \
	elif command -v sudo >/dev/null; then apt=(sudo env DEBIAN_FRONTEND=noninteractive apt-get); \
	else echo "make install-browser: installing $(BROWSER_PACKAGES) needs root or sudo: run apt-get install $(BROWSER_PACKAGES) as root" >&2; exit 1; fi; \
	echo "make install-browser: apt-get install $(BROWSER_PACKAGES) (about 110 MB to download, 420 MB installed)"; \
	"$${apt[@]}" update -qq && "$${apt[@]}" install -y -qq --no-install-recommends $(BROWSER_PACKAGES) >/dev/null

.PHONY: install-ops install-export install-browser

install: $(INSTALL_STAMP) ## Create .venv with everything: runtime (CPU torch) + ops + dev tools (idempotent)

install-export: $(EXPORT_STAMP) ## .venv-export: the OpenVINO export tools (optimum-intel, NNCF) that seed-models EXPORT=openvino runs

install-ops: $(OPS_STAMP) ## Operator machine: .venv with the [ops] extra only, no torch (.venv/bin/sd-lambda seed/deploy/generate/rollback)

install-browser: $(BROWSER_BINARIES) ## Chromium + chromedriver from Debian's packages, for the playground's browser test (apt-get; sudo when not root)

test: $(INSTALL_STAMP) $(CHECKOV_STAMP) $(EXPORT_STAMP) $(BROWSER_BINARIES) ## Run the whole test suite (THE test command; CI runs exactly this)
	$(BIN)/pytest

lint: $(INSTALL_STAMP) ## ruff check + ruff format --check + terraform fmt -check (infra/)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/sd-lambda tfcheck fmt $(INFRA)

format: $(INSTALL_STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: $(INSTALL_STAMP) ## Regenerate every generated table (make targets in README.md, request fields + environment in docs/api.md, each Terraform module's inputs/outputs in its README)
	$(PY) -m sd_lambda.devtools.docs

clean: ## Remove caches and build outputs (never anything tracked)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

# ---- running the real handler locally (sd_lambda.devtools.local) ------------------------------------------------
# MODEL_DIR: a diffusers folder or an EFS-layout model folder; empty = the tiny test model under .cache/.
# PROMPT, OUT: the demo's prompt and image (defaults: the CLI's, demo.png). An empty variable passes no flag.
MODEL_DIR ?=
PORT ?= 8080
PROMPT ?=
OUT ?=
MODEL_DIR_FLAG = $(if $(MODEL_DIR),--model-dir $(call q,$(MODEL_DIR)))
OUT_FLAG = $(if $(OUT),--output $(call q,$(OUT)))

.PHONY: demo serve

demo: $(INSTALL_STAMP) ## Tiny random-weight model (or MODEL_DIR) -> one request through the real Lambda entrypoint -> demo.png + timings (PROMPT= OUT=)
	$(SD_LAMBDA) demo $(MODEL_DIR_FLAG) $(if $(PROMPT),--prompt $(call q,$(value PROMPT))) $(OUT_FLAG)

serve: $(INSTALL_STAMP) ## The real handler behind a local function URL on 127.0.0.1:PORT (MODEL_DIR=..., PORT=8080)
	$(SD_LAMBDA) serve $(MODEL_DIR_FLAG) --port $(call q,$(PORT))

.PHONY: validate plan-offline security

validate: $(INSTALL_STAMP) ## terraform fmt -check, then init + validate infra/ and infra/examples/* offline
	$(BIN)/sd-lambda tfcheck fmt $(INFRA)
	$(BIN)/sd-lambda tfcheck validate $(INFRA) $(TF_EXAMPLES)

plan-offline: $(INSTALL_STAMP) ## terraform plan infra/ and infra/examples/* offline; print addresses + actions
	$(BIN)/sd-lambda tfcheck plan $(addprefix --var-file ,$(TF_PLAN_VARS)) $(INFRA)
	$(if $(TF_EXAMPLES),,@echo "$(INFRA)/examples: no examples to plan")
	$(foreach example,$(TF_EXAMPLES),$(BIN)/sd-lambda tfcheck plan \
		$(addprefix --var-file ,$(wildcard $(TF_EXAMPLE_VARS_DIR)/$(notdir $(example)).tfvars)) $(example) &&) true

$(CHECKOV_STAMP):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24,<27"
	$(CHECKOV_VENV)/bin/python -m pip install --quiet "$(CHECKOV_SPEC)"
	touch $@

security: $(CHECKOV_STAMP) ## checkov over infra/ and image/ offline (--skip-download); fails on any failed check
	$(CHECKOV_VENV)/bin/checkov --directory infra --directory image --skip-download --compact --quiet

# ---- container image and calling the function --------------------------------------------------------
# Build for PLATFORM (Lambda runs linux/amd64 or linux/arm64: match the function's architecture).
PLATFORM ?= linux/amd64
# ENGINE: the image variant, torch (diffusers releases) or openvino (OpenVINO releases, no torch); the
# openvino image's tags end in -openvino (IMAGE=sd-lambda:local builds sd-lambda:local-openvino).
ENGINE ?= torch
IMAGE ?= sd-lambda:local
DOCKER ?= docker
# Extra NAME=VALUE build args, e.g. BUILD_ARGS="BASE_DIGEST=sha256:..."
BUILD_ARGS ?=
# make invoke: PROMPT (required), URL (default: the stack's function_url output), OUT (default out.png),
# REGION (signing region, default: from the URL), JSON=1, JOB=1 (run it as a job: POST /jobs, poll,
# download), JOB_TIMEOUT (seconds to wait for a job), ARGS (more flags, e.g. "--steps 20").

.PHONY: requirements build-image push-image invoke

# FIND_LINKS: a folder holding the CPU torch wheel, for machines where TORCH_INDEX_URL does not answer.
FIND_LINKS ?=

requirements: $(INSTALL_STAMP) ## Regenerate the images' hash-pinned locks (image/requirements*.txt) from pyproject's base + [runtime] / [openvino] (FIND_LINKS=)
	$(SD_LAMBDA) requirements $(if $(FIND_LINKS),$(addprefix --find-links ,$(FIND_LINKS)),--torch-index-url $(call q,$(TORCH_INDEX_URL)))

build-image: $(OPS_STAMP) ## docker build (buildx when present) image/Dockerfile for PLATFORM (linux/amd64; linux/arm64) and ENGINE (torch; openvino) as IMAGE, one manifest Lambda runs; MODEL_DIR= or MODEL= bakes that model in (NAME=)
	$(SD_LAMBDA) build-image --platform $(call q,$(PLATFORM)) --engine $(call q,$(ENGINE)) --tag $(call q,$(IMAGE)) \
		--docker $(call q,$(DOCKER)) $(addprefix --build-arg ,$(BUILD_ARGS)) \
		$(MODEL_DIR_FLAG) $(if $(MODEL),--model $(call q,$(MODEL))) $(if $(NAME),--name $(call q,$(NAME)))

push-image: $(OPS_STAMP) ## Push IMAGE (ENGINE's variant) to the stack's ECR repo (tag git-<sha>[-openvino]), write its digest to .image-digest
	$(SD_LAMBDA) push-image --image $(call q,$(IMAGE)) --engine $(call q,$(ENGINE)) --docker $(call q,$(DOCKER)) \
		$(if $(REPOSITORY_URL),--repository-url $(call q,$(REPOSITORY_URL)),--infra $(call q,$(INFRA)))

invoke: $(OPS_STAMP) ## Generate one image through the function URL (SigV4): make invoke PROMPT="a red fox"
	$(SD_LAMBDA) generate $(if $(URL),--url $(call q,$(URL)),--infra $(call q,$(INFRA))) \
		--prompt $(call q,$(value PROMPT)) $(OUT_FLAG) $(REGION_FLAG) $(JSON_FLAG) \
		$(if $(filter 1,$(JOB)),--job) $(if $(JOB_TIMEOUT),--job-timeout $(call q,$(JOB_TIMEOUT))) $(ARGS)

# ---- deploying the stack (real AWS; needs `terraform` >= 1.6 on PATH) -----------------------------------
# REGION (also AWS_REGION for terraform), TFVARS (var files), IMAGE_URI (<repo>@sha256:..., skips the
# build+push), BACKEND_CONFIG (S3 backend settings file; local state without it), MIGRATE_STATE=1 (copy
# existing local state into that backend), CONFIRM=1 (destroy), ALLOW_FUNCTION_DELETE=1 (let plan/apply
# delete or replace the live function), ALLOW_DATA_LOSS=1 (let plan/apply delete or replace EFS, its access
# point, the weights bucket, the KMS key or the ECR repository), SWITCH_WEIGHTS_SOURCE=1 (let apply change a
# running stack's weights_source), INFRA (the Terraform root), JSON=1 (one JSON
# document on stdout). See docs/deploy.md.
# Run by `apply` once the repository exists (not $(MAKE): `make -n apply` must not deploy anything).
# With weights_source = "image" the model to bake goes along: MODEL_DIR= or MODEL= (NAME=).
BAKED_MODEL = $(or $(MODEL_DIR),$(MODEL))
PUSH_COMMAND ?= make --no-print-directory build-image push-image$(if $(MODEL_DIR), MODEL_DIR=$(call q,$(MODEL_DIR)))$(if $(MODEL), MODEL=$(call q,$(MODEL)))$(if $(NAME), NAME=$(call q,$(NAME)))
REGION_FLAG = $(if $(REGION),--region $(call q,$(REGION)))
IMAGE_URI_FLAG = $(if $(IMAGE_URI),--image-uri $(call q,$(IMAGE_URI)))
STACK_FLAGS = --infra $(call q,$(INFRA)) $(REGION_FLAG) $(addprefix --var-file ,$(TFVARS)) $(JSON_FLAG)
DEPLOY_ARGS = $(STACK_FLAGS) $(if $(BACKEND_CONFIG),--backend-config $(call q,$(BACKEND_CONFIG)))
STATE_ARGS = $(if $(filter 1,$(MIGRATE_STATE)),--migrate-state)
PROTECTION_ARGS = $(if $(filter 1,$(ALLOW_FUNCTION_DELETE)),--allow-function-delete) \
	$(if $(filter 1,$(ALLOW_DATA_LOSS)),--allow-data-loss)

.PHONY: preflight plan apply destroy

preflight: $(OPS_STAMP) ## Check credentials, terraform, docker and the account's Lambda limits before apply (REGION= TFVARS= IMAGE_URI=)
	$(SD_LAMBDA) deploy preflight $(STACK_FLAGS) $(or $(IMAGE_URI_FLAG),--docker $(call q,$(DOCKER)))

plan: $(OPS_STAMP) ## terraform plan infra/ with the image apply would deploy (REGION= TFVARS= IMAGE_URI= BACKEND_CONFIG=)
	$(SD_LAMBDA) deploy plan $(DEPLOY_ARGS) $(STATE_ARGS) $(IMAGE_URI_FLAG) $(PROTECTION_ARGS)

apply: $(OPS_STAMP) ## Deploy: preflight, ECR repo first, build+push the image (or IMAGE_URI=), full apply, wait until Active; weights_source = "image": MODEL_DIR= or MODEL= bakes the model in
	$(SD_LAMBDA) deploy apply $(DEPLOY_ARGS) $(STATE_ARGS) \
		$(or $(IMAGE_URI_FLAG),--push-command $(call q,$(PUSH_COMMAND)) --docker $(call q,$(DOCKER))) \
		$(if $(and $(BAKED_MODEL),$(if $(IMAGE_URI),,1)),--baked-model $(call q,$(BAKED_MODEL))) $(PROTECTION_ARGS) \
		$(if $(filter 1,$(SWITCH_WEIGHTS_SOURCE)),--switch-weights-source)

destroy: $(OPS_STAMP) ## terraform destroy infra/ (asks for confirmation; CONFIRM=1 skips the question)
	$(SD_LAMBDA) deploy destroy $(DEPLOY_ARGS) $(STATE_ARGS) $(if $(filter 1,$(CONFIRM)),--yes)

# ---- seeding models onto EFS (real AWS: the stack's bucket + seeder instance, driven through SSM) ----------
# MODEL (hub id[@rev]), NAME (EFS folder; default: the model the stack serves, its model_name), REVISION
# (release name), FROM_DIR (local diffusers folder), FROM_S3 (s3://bucket/models/<name>/<rev>/), BF16_COPY=1,
# EXPORT=openvino (convert to OpenVINO IR here, in $(EXPORT_VENV): the target then needs make install-export),
# WEIGHT_FORMAT=fp16|fp32 (with EXPORT: how the float weights are stored; fp16 by default),
# QUANTIZE=int8 (with EXPORT: hybrid int8 quantisation),
# NOT_SERVED=1 (a --name the function does not serve), REGION, INFRA, JSON=1, SEED_ARGS (more flags:
# --variant fp16, --tiny-decoder madebyollin/taesd, --keep-running, --bucket/--instance-id when the module
# lives in another stack, ...). With FROM_DIR/FROM_S3, MODEL= still names the folder when NAME= is not given.
SEED_STACK_ARGS = --infra $(call q,$(INFRA)) $(REGION_FLAG) $(JSON_FLAG) $(SEED_ARGS)
SEED_NAME = $(or $(NAME),$(if $(or $(FROM_DIR),$(FROM_S3)),$(MODEL)))
NOT_SERVED_FLAG = $(if $(filter 1,$(NOT_SERVED)),--not-served)

.PHONY: seed-models seed-lora rollback

seed-models: $(OPS_STAMP) $(if $(EXPORT),$(EXPORT_STAMP)) ## Put a model on EFS as a new revision of the served model: MODEL=owner/name[@rev] [NAME=] [REVISION=] [BF16_COPY=1] [EXPORT=openvino [WEIGHT_FORMAT=fp32|QUANTIZE=int8]] (or FROM_DIR=/FROM_S3=)
	@test -n "$(MODEL)$(FROM_DIR)$(FROM_S3)" || { echo 'make seed-models: set MODEL=owner/name[@rev] (or FROM_DIR=path / FROM_S3=s3://...)' >&2; exit 2; }
	$(SD_LAMBDA) seed \
		$(if $(FROM_DIR),--from-dir $(call q,$(FROM_DIR)),$(if $(FROM_S3),--from-s3 $(call q,$(FROM_S3)),--model $(call q,$(MODEL)))) \
		$(if $(SEED_NAME),--name $(call q,$(SEED_NAME))) $(if $(filter 1,$(BF16_COPY)),--bf16-copy) \
		$(if $(EXPORT),--export $(call q,$(EXPORT)) --export-python $(call q,$(EXPORT_PY))) \
		$(if $(QUANTIZE),--quantize $(call q,$(QUANTIZE))) \
		$(if $(WEIGHT_FORMAT),--weight-format $(call q,$(WEIGHT_FORMAT))) \
		$(if $(REVISION),--revision $(call q,$(REVISION))) $(NOT_SERVED_FLAG) $(SEED_STACK_ARGS)

# LORA (hub id[@rev] or a folder with the adapter's .safetensors), MODEL or NAME (the model it adapts, its EFS
# folder; default: the served model), LORA_NAME (the name requests use; default: the repo's or folder's name).
seed-lora: $(OPS_STAMP) ## Put a LoRA adapter for a seeded model on EFS (<model>/loras/<name>): LORA=owner/name[@rev]|dir [MODEL=] [LORA_NAME=] [REVISION=]
	@test -n "$(LORA)" || { echo 'make seed-lora: set LORA=owner/name[@rev] (or LORA=path/to/folder)' >&2; exit 2; }
	$(SD_LAMBDA) seed-lora --lora $(call q,$(LORA)) \
		$(if $(or $(NAME),$(MODEL)),--name $(call q,$(or $(NAME),$(MODEL)))) \
		$(if $(LORA_NAME),--lora-name $(call q,$(LORA_NAME))) \
		$(if $(REVISION),--revision $(call q,$(REVISION))) $(NOT_SERVED_FLAG) $(SEED_STACK_ARGS)

# An image stack (weights_source = "image") redeploys the previously deployed image instead (REVISION=sha256:...
# picks one; TFVARS= as for apply); an EFS stack's arguments follow the --.
rollback: $(OPS_STAMP) ## Switch a model's current back to an older release on EFS: REVISION=... [NAME=] (default: the served model) [LORA_NAME=] (one of its LoRA adapters); weights in the image: redeploy the previous image
	$(SD_LAMBDA) deploy rollback $(DEPLOY_ARGS) --revision $(call q,$(REVISION)) $(PROTECTION_ARGS) -- \
		$(if $(or $(NAME),$(MODEL)),--name $(call q,$(or $(NAME),$(MODEL)))) \
		$(NOT_SERVED_FLAG) $(if $(LORA_NAME),--lora-name $(call q,$(LORA_NAME))) \
		$(SEED_STACK_ARGS)

# ---- performance -----------------------------------------------------------------------------------
.PHONY: bench

BENCH_ARGS ?=
bench: $(INSTALL_STAMP) $(EXPORT_STAMP) ## Time naive diffusers vs the torch and OpenVINO engines on the sd15 test model (BENCH_ARGS=--quick) -> bench.json + bench.png
	$(BIN)/sd-lambda bench $(BENCH_ARGS)
