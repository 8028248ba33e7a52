.PHONY: test test-gpu gpu-check bench lint compile-check env

test:
	python -m pytest

test-gpu:
	python -m pytest -m gpu

# everything a GPU machine should prove, in one command: build, GPU tests, benchmark (results appended
# to benchmarks/results/)
gpu-check:
	SSLTM_CUDA=on pip install -e . --no-build-isolation
	python -m ssltm_kernels.env
	python -m pytest -m gpu -q
	python benchmarks/stt_window_attn.py

bench:
	python benchmarks/stt_window_attn.py

lint:
	ruff check .

# every Triton configuration for sm_90, sm_80 and sm_86 (the tests compile a representative set:
# python -m ssltm_kernels.compile_check --set representative --arch 90 80 86)
compile-check:
	TRITON_INTERPRET=0 python -m ssltm_kernels.compile_check --set full --arch 90 80 86

env:
	python -m ssltm_kernels.env
