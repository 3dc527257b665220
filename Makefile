# Two commands work on a fresh machine with Python 3.11+ and make: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test check bench clean netns-tools slurm-tools browser-tools

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench,nn]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m evo.cli.demo

# Two-machine tests run in network namespaces (iproute2's `ip netns`): installed when missing
# and root can (CI is root); elsewhere those tests skip and say why.
netns-tools:
	@command -v ip >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& (apt-get update -qq && apt-get install -y -qq iproute2) >/dev/null 2>&1; } || true

# Slurm pilot tests run against a real single-node Slurm (scripts/slurm-local): Debian's
# slurmctld, slurmd, slurm-client and munge, installed when missing and root can; elsewhere
# those tests skip and say why.
slurm-tools:
	@command -v sbatch >/dev/null 2>&1 && [ -x /usr/sbin/slurmd ] || { [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq slurmctld slurmd slurm-client munge) >/dev/null 2>&1; } || true

# The web page's tests drive a headless chromium through chromedriver: installed likewise.
browser-tools:
	@{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || { [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1; } || true

test: $(STAMP) netns-tools slurm-tools browser-tools
	$(BIN)/python -m pytest -q

# the type checker over the whole package (configured in pyproject.toml): zero errors
check: $(STAMP)
	$(BIN)/python -m mypy

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .evo .pytest_cache
