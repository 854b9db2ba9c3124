# The two commands of the README: `make serve` and `make test`. Each installs what is missing first.
.PHONY: serve test lint bootstrap

bootstrap:
	@scripts/bootstrap

serve: bootstrap
	.venv/bin/loraplex serve

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: lint
	scripts/check-docker
	.venv/bin/python -m pytest
