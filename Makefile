# The two commands of the README: `make serve` and `make test`. Each installs what is missing first.
# `make help` lists every target; CONTRIBUTING.md has the dev loop.
.PHONY: help serve test test-fast lint bootstrap

# Tests that need no server (PostgreSQL, Redis, S3, `loraplex serve`) and no slow engine-vs-HF run.
FAST_PATHS = tests/unit tests/engine tests/kernels tests/benchmarks tests/parallel
FAST_MARKERS = not slow and not reliability and not gpu

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

bootstrap: ## install what is missing into ./.venv (nothing when all is there)
	@scripts/bootstrap

serve: bootstrap ## run `loraplex serve` on the embedded defaults (SQLite, local objects, demo model)
	.venv/bin/loraplex serve

lint: bootstrap ## ruff check, ruff format --check, mypy
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: lint ## lint, the docker checks and every test (needs PostgreSQL and Redis; CI runs this)
	scripts/check-docker
	.venv/bin/python -m pytest

test-fast: bootstrap ## the quick loop: unit, engine and kernel tests without servers or slow runs
	.venv/bin/python -m pytest $(FAST_PATHS) -m "$(FAST_MARKERS)" -q -n auto

.PHONY: test-ray
test-ray: bootstrap ## the Ray Serve scale-out tests alone (a local Ray cluster on loopback, ~2 min)
	.venv/bin/python -m pytest tests/ray -m ray -q
