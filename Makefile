# The two commands of the README:  `make up`  and  `make test`.
VENV := .venv
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: up test install bench
$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh

$(TEST_STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh --test

install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/s2s up $(ARGS)

test: $(TEST_STAMP)
	$(VENV)/bin/python -m pytest -q -rs $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/s2s bench $(ARGS)
