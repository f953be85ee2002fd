# The two commands of the README: `make quickstart` and `make test`.
# Both create .venv with the pinned requirements on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install quickstart test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-compat.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# open_clip_torch only supplies the CLIP BPE vocabulary file; its dependencies would pull a CUDA torch.
	$(PY) -m pip install --quiet --no-deps open_clip_torch==3.3.0
	$(PY) -m pip install --quiet --no-deps -e .
	# transformers 4.x on the side, only for the cross-version test (tests/test_transformers4_compat.py).
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/compat-transformers4 -r requirements-compat.txt
	touch $@

quickstart: install
	$(PY) tools/quickstart.py

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) quickstart_output .pytest_cache
