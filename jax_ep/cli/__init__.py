"""The jax-ep command line (`jax-ep`, `python -m jax_ep`): main.py dispatches to one module a
command; flags.py defines every flag. The only place that reads absl flags."""
