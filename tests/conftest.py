"""Shared test setup: 4 emulated CPU devices (the most any cross-device test uses; every emulated device costs
compile and run time in every engine test) and a float64 switch."""

import os

# Must happen before jax is imported anywhere (a flag the caller set wins):
# - 4 emulated devices: harmless for single-device tests;
# - XLA's backend optimisation (LLVM) off: it is most of the tests' tiny programs' compile time and buys them
#   nothing (measured: a quarter less CPU for the engine's tests, every one passing either way). Inherited by
#   every command a test runs (helpers.cli_env keeps it); the experiments themselves keep XLA's default.
for _flag, _value in (("xla_force_host_platform_device_count", "4"), ("xla_backend_optimization_level", "0")):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One compilation cache (and an empty MNIST cache) for the whole session, in a temporary folder: every command a
# test runs shares it, so a program that several commands compile is compiled once (xdist's workers inherit this
# environment from the process that starts them). Never the user's own cache.
if "BNJAX_TEST_SESSION_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _session_dir = tempfile.mkdtemp(prefix="bnjax-tests-")
    os.environ["BNJAX_TEST_SESSION_DIR"] = _session_dir
    os.environ["XDG_CACHE_HOME"] = _session_dir
    atexit.register(shutil.rmtree, _session_dir, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

# The oracles are float64 NumPy: compare against true float32 matmuls, not TF32 (the GPU default).
jax.config.update("jax_default_matmul_precision", "highest")


def x64():
    """Context manager enabling float64 (jax.enable_x64 in new JAX, jax.experimental.enable_x64 in old)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


@pytest.fixture
def float64():
    with x64():
        yield
