# make book   the main job on the offline default (until the book exists: train the demo
#             config on the CPU, then ask the tuned tutor one question)
# make test   run the test suite
# Both create .venv and install everything on first use (CPU torch; offline default model).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[offline,eval,test,book]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/socratic-lora demo

book: $(VENV)/.installed
	$(VENV)/bin/socratic-lora train --config demo --set output_dir=runs/demo --set save_steps=1000
	$(VENV)/bin/socratic-lora chat --adapter runs/demo/adapter --prompt "宿題の答えを教えて。なぜ夜空は暗いの？"

.PHONY: install test demo book
