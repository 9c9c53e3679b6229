"""Each environment loads its own build, and a library built against another torch is refused.

scripts/test.sh builds the CUDA venv (.venv) from the tree and the CPU-only venv
(.venv-cpu) from a separate copy, so neither overwrites the other's library;
LORA_EXT_EXPECT_CUDA=1 says this interpreter's build must carry the CUDA kernels.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import lora_ext
from lora_ext.ops import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not lora_ext.extension_loaded(), reason="compiled extension not loaded (fallback mode)")
def test_loaded_library_is_this_environments_build():
    info = lora_ext.build_info()
    package_dir = os.path.dirname(os.path.abspath(lora_ext.__file__))
    assert os.path.dirname(os.path.abspath(info["library_path"])) == package_dir, info["library_path"]
    assert info["built_against_torch"] == torch.__version__, info
    assert info["torch_version"] == torch.__version__.split("+")[0], info
    if os.environ.get("LORA_EXT_EXPECT_CUDA") == "1":
        assert info["cuda"], f"this environment's build has no CUDA kernels: {info}"
    if torch.version.cuda is None:
        assert not info["cuda"], "a CPU-only torch loaded a library with CUDA kernels"


@pytest.mark.skipif(not lora_ext.extension_loaded(), reason="compiled extension not loaded (fallback mode)")
def test_marker_reader_reads_the_real_library():
    assert _loader.built_against_torch(lora_ext.build_info()["library_path"]) == torch.__version__


def _import_copy(tmp_path, library: bytes | None) -> subprocess.CompletedProcess:
    """Import a copy of the package whose _C file holds ``library`` (None: no _C file at all).

    The subprocess checks that exactly one lora_ext warning is raised, prints it,
    and checks that the fallback computes lora_linear.
    """
    shutil.copytree(
        os.path.join(ROOT, "lora_ext"), tmp_path / "lora_ext", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    if library is not None:
        (tmp_path / "lora_ext" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(library)
    script = textwrap.dedent(
        """
        import importlib.util, os, sys, warnings, torch
        # load the copy; an editable install's finder would map lora_ext.* back to the tree
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        pkg = os.path.join(os.getcwd(), "lora_ext")
        spec = importlib.util.spec_from_file_location(
            "lora_ext", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg]
        )
        lora_ext = importlib.util.module_from_spec(spec)
        sys.modules["lora_ext"] = lora_ext
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spec.loader.exec_module(lora_ext)
        assert lora_ext.__file__.startswith(pkg), lora_ext.__file__
        msgs = [str(w.message) for w in caught if "lora_ext" in str(w.message)]
        assert len(msgs) == 1, msgs
        print(msgs[0])
        assert not lora_ext.extension_loaded()
        x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
        torch.testing.assert_close(lora_ext.lora_linear(x, w, a, b, 2.0), x @ w.t() + 2.0 * (x @ a.t()) @ b.t())
        print("fallback ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_EXT_DISABLE_EXTENSION", "LORA_EXT_REQUIRE_EXTENSION")}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


# Not loadable libraries at all: had the loader tried to import one, the import would fail differently.
def _fake_library(marker: bytes) -> bytes:
    return b"\x7fELF not really a library " + marker + b"\x00 tail"


def test_import_without_compiled_library_warns_once_and_falls_back(tmp_path):
    out = _import_copy(tmp_path, None)
    assert out.returncode == 0, out.stderr
    assert "could not be loaded" in out.stdout.splitlines()[0], out.stdout
    assert out.stdout.strip().endswith("fallback ok")


def test_library_built_against_other_torch_is_refused(tmp_path):
    out = _import_copy(tmp_path, _fake_library(b"LORA_EXT_BUILT_AGAINST_TORCH=1.99.0+other;"))
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert "built against torch 1.99.0+other" in first and f"torch {torch.__version__} is running" in first, first
    assert out.stdout.strip().endswith("fallback ok")


def test_library_without_version_marker_is_refused(tmp_path):
    out = _import_copy(tmp_path, _fake_library(b""))
    assert out.returncode == 0, out.stderr
    assert "no version marker" in out.stdout, out.stdout
