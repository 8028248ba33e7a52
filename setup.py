"""Build script for the compiled extension ``ssltm_kernels._C`` (package metadata: pyproject.toml).

Install with ``pip install -e . --no-build-isolation`` once torch is installed (build isolation would
build against a second torch with a different ABI). Environment:

- ``SSLTM_CUDA=auto|on|off`` (default auto). ``auto`` builds the CUDA kernels when torch is a CUDA build
  and nvcc is found, else only their CPU emulation (or nothing without torch), and prints one line
  saying why; a failing build is reported in one line and the package installs without ``_C``.
  ``on`` fails loudly if the CUDA kernels cannot be built. ``off`` builds no extension.
- ``TORCH_CUDA_ARCH_LIST`` (default ``9.0``: H100/H200), ``MAX_JOBS`` (ninja parallelism),
  ``CUDA_HOME`` (default ``/usr/local/cuda`` when it exists).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# every op's host code (<op>_bindings.cpp, <op>_cpu.cpp) and CUDA kernels (<op>.cu), and module.cpp
SOURCES_CPU = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "csrc").glob("*.cpp"))
SOURCES_CUDA = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "csrc").glob("*.cu"))
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}

MODE = os.environ.get("SSLTM_CUDA", "auto").strip().lower() or "auto"
if MODE not in ("auto", "on", "off"):
    raise SystemExit(f"SSLTM_CUDA must be auto, on or off, got {MODE!r}")

# torch reads CUDA_HOME when torch.utils.cpp_extension is imported, and guesses it wrongly from an nvcc
# wrapper on PATH: point it at the toolkit root first.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")


def _say(message: str) -> None:
    if BUILD_COMMANDS.intersection(sys.argv[1:]):
        print(f"ssltm: {message}", file=sys.stderr, flush=True)


def _extra_include_dirs() -> list[str]:
    """``<site-packages>/nvidia/cu13/include`` (CUDA library headers shipped with the torch wheel)."""
    dirs = [str(ROOT / "csrc")]
    try:
        import nvidia  # namespace package installed by the CUDA torch wheels
    except ImportError:
        return dirs
    for base in getattr(nvidia, "__path__", []):
        candidate = Path(base) / "cu13" / "include"
        if candidate.is_dir():
            dirs.append(str(candidate))
            break
    return dirs


def _extensions():
    """Returns (ext_modules, cmdclass) for the chosen mode."""
    if MODE == "off":
        _say("installing without the compiled extension ssltm_kernels._C (SSLTM_CUDA=off)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        if MODE == "on":
            raise SystemExit(
                f"SSLTM_CUDA=on but torch cannot be imported ({error}); install torch first and "
                "use pip install --no-build-isolation"
            ) from error
        _say(f"installing without the compiled extension ssltm_kernels._C: torch is not importable ({error})")
        return [], {}

    why_no_cuda = None
    if torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is a CPU build"
    elif cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        why_no_cuda = f"nvcc not found (CUDA_HOME={cpp_extension.CUDA_HOME!r}); set CUDA_HOME to the toolkit root"
    if why_no_cuda and MODE == "on":
        raise SystemExit(f"SSLTM_CUDA=on but the CUDA kernels cannot be built: {why_no_cuda}")

    cxx_flags = ["-O3", "-std=c++20"]
    # Exact expf/logf are part of the numerical contract: never --use_fast_math.
    nvcc_flags = ["-O3", "-std=c++20", "-lineinfo"]
    if why_no_cuda:
        _say(
            f"installing without the CUDA extension ({why_no_cuda}); ssltm_kernels._C holds only the CPU "
            "emulation of the CUDA kernels"
        )
        ext = cpp_extension.CppExtension(
            "ssltm_kernels._C",
            SOURCES_CPU,
            include_dirs=_extra_include_dirs(),
            extra_compile_args={"cxx": cxx_flags},
        )
    else:
        ext = cpp_extension.CUDAExtension(
            "ssltm_kernels._C",
            SOURCES_CPU + SOURCES_CUDA,
            include_dirs=_extra_include_dirs(),
            define_macros=[("SSLTM_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )

    class BuildExt(cpp_extension.BuildExtension):
        """ninja build; in auto mode a failing build leaves the package installable without ``_C``."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:
                if MODE == "on":
                    raise
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                print(
                    f"ssltm: installing without the compiled extension ssltm_kernels._C: its build failed "
                    f"({type(error).__name__}: {first_line}); set SSLTM_CUDA=on to make this an error",
                    file=sys.stderr,
                    flush=True,
                )
                self.extensions = []  # nothing to copy in place or to package

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
