.PHONY: test test-gpu gpu-check bench lint compile-check env

test:
	python -m pytest

test-gpu:
	SSLTM_TEST_GPU=1 python -m pytest -m gpu

# everything a GPU machine should prove, in one command: build, GPU tests, benchmark (results appended
# to benchmarks/results/)
gpu-check:
	SSLTM_CUDA=on pip install -e . --no-build-isolation
	python -m ssltm_kernels.env
	SSLTM_TEST_GPU=1 python -m pytest -m gpu -q
	python benchmarks/stt_window_attn.py

bench:
	python benchmarks/stt_window_attn.py

lint:
	ruff check .

compile-check:
	for arch in 90 80 86; do TRITON_INTERPRET=0 python -m ssltm_kernels.compile_check --arch $$arch || exit 1; done

env:
	python -m ssltm_kernels.env
