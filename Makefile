# `make check` is exactly what CI runs after installing (see .ci/run).
.PHONY: check lint test format gpu-stage gpu-tiny gpu

check: lint test

lint:
	ruff check .
	ruff format --check .

test:
	python -m pytest

format:
	ruff format .
	ruff check --fix .

# GPU sessions (docs/gpu-runbook.md). gpu-stage: what the device lacks, into .gpu-stage/ (CPU, ~3 min);
# gpu-tiny: every stage of the GPU suite at toy shapes here; gpu: the suite itself, on the GPU machine.
gpu-stage:
	python benchmarks/gpu_stage.py

gpu-tiny:
	python benchmarks/gpu_stage.py --tiny --out runs/gpu-stage-tiny
	python benchmarks/gpu_suite.py --tiny --stage runs/gpu-stage-tiny --out runs/gpu-suite-tiny

gpu:
	python benchmarks/gpu_suite.py --out runs/gpu-suite
