"""Without its native extension, `import tensorlink` must fail loudly and say how to build it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_missing_extension_fails_with_build_instructions() -> None:
    # Block tensorlink._C in a fresh interpreter (a meta path finder that refuses it), then import.
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "tensorlink._C":
                    raise ImportError("blocked for the test")
                return None
        sys.meta_path.insert(0, Block())
        import tensorlink
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "tensorlink._C is not built" in proc.stderr
    assert "make install" in proc.stderr


def test_extension_loads_and_reports_its_build() -> None:
    from tensorlink import _C

    assert _C.crc32c(b"123456789") == 0xE3069283
    assert isinstance(_C.cuda_compiled(), bool)


def test_cuda_sources_are_built_when_a_toolkit_is_found() -> None:
    """CMake's AUTO mode: with nvcc on the build machine the CUDA path must be compiled in."""
    import os
    import shutil

    from tensorlink import _C

    if os.environ.get("TENSORLINK_NO_CUDA"):
        assert not _C.cuda_compiled()
    else:
        assert _C.cuda_compiled() == bool(shutil.which("nvcc"))


def test_channels_and_cuda_staging_import_without_libp2p() -> None:
    """GPU machines may have a Python for which libp2p's pins have no wheels (fastecdsa 2.3.2 has none
    for 3.12): the channels, the sealed socket, the CUDA staging and the wire formats must load without
    it (benchmarks/gpu_overlap.py and tests/gpu run there); only the ChannelService needs libp2p."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["libp2p"] = None  # any import of it raises ImportError
        import tensorlink.transport.direct, tensorlink.transport.staging, tensorlink.wire.frame
        from tensorlink.transport import Channel, ChannelError
        try:
            from tensorlink.transport import ChannelService
        except ImportError:
            print("service needs libp2p")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "service needs libp2p"


# What the chain extra installs (and what it pulls in); coincurve is not here: libp2p needs it too.
CHAIN_MODULES = ("web3", "eth_account", "eth_tester", "eth", "py_ecc", "eth_abi", "eth_utils", "eth_keys", "hexbytes")


def test_offload_and_the_node_need_no_chain_libraries() -> None:
    """`pip install tensorlink-p2p` without `[chain]`: offload(), LocalSwarm and a node without a chain
    load; tensorlink.chain says how to install what it needs."""
    code = f"import sys\nfor name in {CHAIN_MODULES!r}:\n    sys.modules[name] = None\n" + textwrap.dedent(
        """
        import tensorlink
        tensorlink.offload, tensorlink.LocalSwarm, tensorlink.OffloadedModel
        import tensorlink.node.cli, tensorlink.node.node, tensorlink.validator.trust, tensorlink.worker.stage_host
        try:
            import tensorlink.chain
        except ModuleNotFoundError as exc:
            print(exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # py-evm's `eth` is the first one tensorlink.chain imports
    hint = "tensorlink.chain needs the chain extra (eth is not installed): pip install 'tensorlink-p2p[chain]'"
    assert proc.stdout.strip() == hint


def test_the_demo_says_how_to_install_transformers() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None
        from tensorlink.demo import build_model
        build_model(0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("pip install 'tensorlink-p2p[hf]'"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
