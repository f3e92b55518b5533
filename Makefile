# make book   the main job: build the Jupyter Book, executing every lesson on the offline
#             default (CPU); any warning fails the build. HTML in _build/html/index.html
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
	PATH="$(abspath $(VENV))/bin:$$PATH" SOCRATIC_LORA_BOOK=1 $(VENV)/bin/jupyter-book build . -W -n --keep-going

.PHONY: install test demo book
