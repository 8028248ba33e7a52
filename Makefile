.PHONY: test test-gpu bench lint compile-check env

test:
	python -m pytest

test-gpu:
	SSLTM_TEST_GPU=1 python -m pytest -m gpu

bench:
	python benchmarks/stt_window_attn.py

lint:
	ruff check .

compile-check:
	TRITON_INTERPRET=0 python -m ssltm_kernels.compile_check --arch 90

env:
	python -m ssltm_kernels.env
