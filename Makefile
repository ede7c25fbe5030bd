# gemma-edge: two commands set up and run the main job (`make export`), one runs the tests
# (`make test`; `make test-fast` leaves out the tests that convert graphs, for the edit
# loop). Every target creates the virtualenv and installs what is missing first.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# A bare `torch` pulls a multi-GB CUDA build; pin the CPU wheel (override on other machines).
TORCH_SPEC  ?= torch==2.13.0
CHECKPOINT  ?= google/embeddinggemma-300m
OUT         ?= build/artifacts
MODEL       ?= $(OUT)
STAMP       := $(VENV)/.gemma-edge-installed

.PHONY: setup export test test-fast demo calibration eval compile compile-docker bench latency-check lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[export,search,serve,dev]"
	touch $(STAMP)

setup: $(STAMP)

export: $(STAMP)  ## checkpoint -> verified float + int8 TFLite artifacts in $(OUT)
	$(BIN)/gemma-edge export --checkpoint "$(CHECKPOINT)" --out "$(OUT)"

test: $(STAMP)  ## every test (what CI runs)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## the edit loop: every test but those that convert TFLite graphs (marked slow)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)  ## whole pipeline offline on a tiny random Gemma3 built in code
	$(BIN)/gemma-edge demo --workdir build/demo

calibration: $(STAMP)  ## corpus -> calibration tensors per bucket (needs an export in $(OUT))
	$(BIN)/gemma-edge calibration --artifacts "$(OUT)" --out build/calibration

eval: $(STAMP)
	$(BIN)/gemma-edge eval --artifacts "$(OUT)" --checkpoint "$(CHECKPOINT)"

compile: $(STAMP)
	$(BIN)/gemma-edge compile "$(MODEL)"

compile-docker:
	scripts/compile-docker.sh "$(MODEL)"

bench: $(STAMP)
	$(BIN)/gemma-edge bench --artifacts "$(OUT)" --json build/bench.json --plot build/bench.png

latency-check: $(STAMP)
	$(BIN)/gemma-edge bench --artifacts "$(OUT)" --check

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf build

# The device side on an emulated arm64 Debian userland (qemu-user, no binfmt_misc needed):
# docs/board-check.md. Installs qemu-user-static and mmdebstrap from apt when missing.
# CI runs BOARD_CHECK_ARGS=--quick; the userland is cached in ~/.cache/gemma-edge-board.
BOARD_CHECK_ARGS ?=
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: board-check
board-check: $(STAMP)
	@command -v qemu-aarch64-static >/dev/null && command -v mmdebstrap >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static mmdebstrap; }
	$(BIN)/python scripts/board_check.py $(BOARD_CHECK_ARGS)
