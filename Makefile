# The two commands of the README: `make train` (quickstart) and `make test`.
# Both create .venv and install what they need first (scripts/setup.sh).
.PHONY: setup train test bench
ARGS ?=

setup:
	@bash scripts/setup.sh

train: setup
	.venv/bin/python train.py $(ARGS)

test: setup
	.venv/bin/python -m pytest $(ARGS)

bench: setup
	.venv/bin/python -m scripts.bench $(ARGS)
