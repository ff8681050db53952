"""Runs jax-ep command lines as users run them: fresh interpreters on simulated CPU devices
(for the cli_*_test.py files).

  run_cases(cases)  several command lines in one interpreter (one jax start-up for all): this
                    file, run as `python tests/cli_runner.py '[["generate", "--batch=0"],
                    ["--help"]]'`, prints one JSON line: each case's exit code, stdout, stderr
  run(*args)        one `python -m jax_ep` process
"""

import contextlib
import io
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# LLVM unoptimised, as conftest.py runs the in-process tests: these programs are small and
# run a few times, so their compiles dominate (about 5 s less for each model initialised).
FAST_XLA = "--xla_backend_optimization_level=0"


def _env(xla_flags=FAST_XLA) -> dict:
  """This environment without the test session's device flags (the command line sets its
  own), with the repository on the path and `xla_flags` as XLA_FLAGS."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return env


def run_cases(cases, timeout=600) -> list[dict]:
  """{"args", "rc", "stdout", "stderr"} of each command line in `cases`, run in one process."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(cases)],
                        capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run(*args, timeout=300, xla_flags=FAST_XLA) -> subprocess.CompletedProcess:
  """`python -m jax_ep *args` in a process of its own."""
  return subprocess.run([sys.executable, "-m", "jax_ep", *args], capture_output=True, text=True,
                        timeout=timeout, env=_env(xla_flags), cwd=ROOT)


def _run_case(args: list[str]) -> dict:
  """One command line in this process, as the console script runs it."""
  from absl import flags

  from jax_ep.cli import main

  flags.FLAGS.unparse_flags()
  sys.argv = ["jax-ep", *args]
  out, err = io.StringIO(), io.StringIO()
  rc = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      main.run()
    except SystemExit as e:
      rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return {"args": args, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  print(json.dumps([_run_case(args) for args in json.loads(sys.argv[1])]))
