"""Builds the pure-Python package from src/ and the native extension tensorlink._C with CMake.

The CMake build tree lives in build/cmake-<python tag> and is reused, so a second `pip install -e .`
only recompiles what changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources are built by CMakeLists.txt, not by setuptools."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _cmake_binary() -> str:
    """System cmake first (fast, no download); the `cmake` wheel from build requirements otherwise."""
    found = shutil.which("cmake")
    if found:
        return found
    try:
        import cmake  # type: ignore[import-not-found]

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError as exc:  # pragma: no cover - only without any cmake at all
        raise RuntimeError("CMake >= 3.24 is needed to build tensorlink._C: install cmake") from exc


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-{sysconfig.get_config_var('SOABI') or sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake_binary()
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        config = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), *generator,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTENSORLINK_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            # TENSORLINK_NO_CUDA=1 forces the host-only build even where a CUDA toolkit is installed.
            f"-DTENSORLINK_CUDA={'OFF' if os.environ.get('TENSORLINK_NO_CUDA') else 'AUTO'}",
        ]
        subprocess.run(config, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("tensorlink._C")], cmdclass={"build_ext": CMakeBuild})
