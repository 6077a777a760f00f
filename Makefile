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
	$(VENV)/bin/python -m pytest -q -rs --durations=30 $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/s2s bench $(ARGS)

# Role images (deploy/Dockerfile) on a base made from Debian packages; no registry needed.
#   make images                 all of them;  make images ROLES="gateway stt"
# Needs a Docker engine: as root on Debian, scripts/docker_engine.sh installs docker.io and
# debootstrap when missing and starts `dockerd --iptables=false` when none answers.
# Prints a size table. Also installs the Compose v2 CLI as .venv/bin/docker-compose.
.PHONY: images
images: $(STAMP)
	bash scripts/images.sh $(ROLES)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e ".[compose]"
	@echo "==> compose: S2S_API_KEYS=<key> S2S_REDIS_IMAGE=s2s-redis S2S_PROMETHEUS_IMAGE=s2s-prometheus $(VENV)/bin/docker-compose -f docker-compose.yml -f deploy/compose.hostnet.yml up -d --scale stt=2"
