# `make check` is exactly what CI runs after installing (see .ci/run).
.PHONY: check lint test format

check: lint test

lint:
	ruff check .
	ruff format --check .

test:
	python -m pytest

format:
	ruff format .
	ruff check --fix .
