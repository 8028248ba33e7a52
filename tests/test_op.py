"""The op scaffold: block sizes, the dtype rule, the backend predicates made from an op's checks, the dispatch
and where the reference runs, the compile sets."""

import inspect

import pytest
import torch

from ssltm_kernels import _op
from ssltm_kernels._backend import BackendCheck, BackendUnavailableError
from ssltm_kernels.ops import dwconv3x3, gcc_assign, soft_region_pool


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, 1), (1, 1), (2, 2), (3, 4), (5, 8), (16, 16), (17, 32), (1023, 1024), (1024, 1024), (1025, 2048)],
)
def test_next_pow2(n, expected):
    assert _op.next_pow2(n) == expected


@pytest.mark.parametrize(("n", "expected"), [(0, 16), (1, 16), (13, 16), (16, 16), (17, 32), (196, 256)])
def test_dot_block_is_at_least_16(n, expected):
    assert _op.dot_block(n) == expected


def test_dtype_rule():
    assert _op.dtype_reason(torch.bfloat16) is None and _op.dtype_reason(torch.float32) is None
    assert _op.dtype_reason(torch.float64) == f"dtype torch.float64 is not one of {_op.KERNEL_DTYPES}"
    x, y = torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=torch.float64)
    assert not _op.autocasting(x) and _op.autocast_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _op.autocasting(x) and _op.autocast_dtype(x) == torch.bfloat16
        assert not _op.autocasting(x, y) and _op.autocast_dtype(y, x) == torch.float64


def _checks(a, b=2, *, refuse=None):
    """A toy op: ``a`` must be positive; ``refuse`` names a backend that cannot run."""
    if a <= 0:
        raise ValueError(f"a must be positive, got {a}")
    return {name: BackendCheck(name, "refused" if name == refuse else None) for name in ("cuda", "triton", "reference")}


def test_backend_predicates_from_an_ops_checks():
    can_run_cuda, can_run_triton, can_run_reference = _op.backend_predicates("toy", _checks)
    assert [f.__name__ for f in (can_run_cuda, can_run_triton, can_run_reference)] == [
        "can_run_cuda",
        "can_run_triton",
        "can_run_reference",
    ]
    signature = inspect.signature(can_run_triton)
    assert str(signature).startswith("(a, b=2, *, refuse=None, raise_error=False) -> ")
    assert signature.return_annotation is BackendCheck
    assert can_run_triton(1) and can_run_cuda(1, refuse="triton")
    check = can_run_triton(1, refuse="triton")
    assert not check and check.backend == "triton" and check.reason == "refused"
    with pytest.raises(BackendUnavailableError, match=r"^toy: backend 'cuda' cannot run: refused$"):
        can_run_cuda(1, refuse="cuda", raise_error=True)
    with pytest.raises(ValueError, match="a must be positive, got 0"):
        can_run_reference(0)


def test_the_ops_predicates_keep_their_signatures():
    for op, params in (
        (dwconv3x3, ["x", "weight", "bias", "activation"]),
        (gcc_assign, ["feats", "centers", "valid"]),
        (soft_region_pool, ["logits", "feats", "scale"]),
    ):
        for name in ("can_run_cuda", "can_run_triton", "can_run_reference"):
            assert list(inspect.signature(getattr(op, name)).parameters) == params + ["raise_error"], (op, name)


def test_dispatch_runs_the_reference_eagerly_unless_the_op_has_none():
    checks = _checks(1, refuse="cuda")
    ran = []
    fused, reference = (lambda backend: ran.append(backend) or "fused"), (lambda: ran.append("eager") or "eager")
    assert _op.dispatch("toy", checks, None, fused=fused, reference=reference) == "fused" and ran == ["triton"]
    assert _op.dispatch("toy", checks, "reference", fused=fused, reference=reference) == "eager"
    assert _op.dispatch("toy", checks, "reference", fused=fused, reference=None) == "fused"
    assert ran == ["triton", "eager", "reference"]
    passed_over = {"triton": lambda: "slower here"}
    assert _op.dispatch("toy", checks, None, fused=fused, reference=reference, passed_over=passed_over) == "eager"
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run: refused"):
        _op.dispatch("toy", checks, "cuda", fused=fused, reference=reference)


def test_compile_cases():
    assert _op.compile_cases("representative", representative=[1], full=[1, 2]) == [1]
    assert _op.compile_cases("full", representative=[1], full=[1, 2]) == [1, 2]
    assert _op.compile_cases("sweep", representative=[1], full=[1, 2]) == []
    with pytest.raises(ValueError, match=r"config_set must be one of \('full', 'representative', 'sweep'\), got 'x'"):
        _op.compile_cases("x", representative=[], full=[])
