.PHONY: test test-gpu gpu-check gpu-wheels bench lint compile-check env

PYTHON ?= python3

# every op's and the model's benchmark (benchmarks/harness.py and benchmarks/train_steps.py are shared helpers)
BENCHMARKS := $(filter-out benchmarks/__init__.py benchmarks/harness.py benchmarks/train_steps.py,$(sort $(wildcard benchmarks/*.py)))

test:
	python -m pytest

test-gpu:
	python -m pytest -m gpu

# everything a lent GPU machine should prove, in one run of at most 9.5 minutes: offline install, environment,
# the gpu_quick tests, every benchmark quick, wmsa_decide quick, the model, the CUDA extension built in the
# background (scripts/gpu_check.sh; results and summary.md under $OUT, else benchmarks/results/)
gpu-check:
	bash scripts/gpu_check.sh

# what the GPU machine lacks for `pip install -e .` (it has torch, triton, numpy, einops, pyyaml, pillow,
# opencv-python-headless, tqdm, torchvision, not omegaconf; omegaconf 2.4 carries its own antlr4 runtime), as
# wheels for its Python 3.12 on x86-64 Linux, into .whl/ (carry it to that machine; pure-Python wheels, so
# scripts/gpu_check.sh --rehearse installs them here too)
GPU_WHEELS := omegaconf==2.4.0
GPU_WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_WHEEL_PLATFORMS)) -d .whl $(GPU_WHEELS)

bench:
	for benchmark in $(BENCHMARKS); do python $$benchmark || exit 1; done

lint:
	ruff check .
	ruff format --check .

# every Triton configuration for sm_90, sm_80 and sm_86 (the tests compile a representative set:
# python -m ssltm_kernels.compile_check --set representative --arch 90 80 86)
compile-check:
	TRITON_INTERPRET=0 python -m ssltm_kernels.compile_check --set full --arch 90 80 86

env:
	python -m ssltm_kernels.env
