"""`python -m jax_ep`: the jax-ep command line (jax_ep/cli/; `--help` lists its commands and
flags)."""

from jax_ep.cli.main import run

if __name__ == "__main__":
  run()
