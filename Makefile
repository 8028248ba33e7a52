.PHONY: test test-gpu gpu-check bench lint compile-check env

# every op's and the model's benchmark (benchmarks/harness.py is their shared harness)
BENCHMARKS := $(filter-out benchmarks/harness.py,$(sort $(wildcard benchmarks/*.py)))

test:
	python -m pytest

test-gpu:
	python -m pytest -m gpu

# everything a GPU machine should prove, in one command: build, GPU tests, every benchmark (results
# appended to benchmarks/results/)
gpu-check:
	SSLTM_CUDA=on pip install -e . --no-build-isolation
	python -m ssltm_kernels.env
	python -m pytest -m gpu -q
	for benchmark in $(BENCHMARKS); do python $$benchmark || exit 1; done

bench:
	for benchmark in $(BENCHMARKS); do python $$benchmark || exit 1; done

lint:
	ruff check .

# every Triton configuration for sm_90, sm_80 and sm_86 (the tests compile a representative set:
# python -m ssltm_kernels.compile_check --set representative --arch 90 80 86)
compile-check:
	TRITON_INTERPRET=0 python -m ssltm_kernels.compile_check --set full --arch 90 80 86

env:
	python -m ssltm_kernels.env
