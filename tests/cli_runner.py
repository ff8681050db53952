"""Runs several jax-ep command lines in one process, as `jax-ep` would run each (used by
main_test.py: one interpreter and one jax start-up for many cases).

  python tests/cli_runner.py '[["generate", "--batch=0"], ["--help"]]'

prints one JSON line: for each case its exit code, stdout and stderr.
"""

import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from jax_ep.cli import main as cli  # noqa: E402


def run_case(args: list[str]) -> dict:
  flags.FLAGS.unparse_flags()
  sys.argv = ["jax-ep", *args]
  out, err = io.StringIO(), io.StringIO()
  rc = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      cli.run()
    except SystemExit as e:
      rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return {"args": args, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
  print(json.dumps([run_case(args) for args in json.loads(sys.argv[1])]))
