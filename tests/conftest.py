"""Test setup: 64 fake CPU devices (every mesh of the seed fits) before jax is imported."""

import os
import sys

# The suite compiles some 60 small programs and runs each a few times: on CPU, LLVM's
# optimisation costs more than it saves (the suite runs ~1.6x faster without it).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=64").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the command lines they start) compile the same programs: jax's persistent
# cache, shared by the workers and subprocesses, compiles each once per run.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(_ROOT, ".pytest_cache", "jax_compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
