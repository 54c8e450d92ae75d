# The README's two commands. Each installs what it needs into a local venv (.venv) first.
#   make demo   - python dar.py: build the toy model and its pi_0, train with DAR, print the result
#   make test   - the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
TEST_DEPS := pytest==9.2.0

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check $(TEST_DEPS)
	touch $@

demo: $(VENV)/.installed
	$(PY) dar.py

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
