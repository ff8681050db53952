"""Presets: one model per file (get_config() -> ModelConfig); deployments in deployments.py."""

from __future__ import annotations

import importlib
import pkgutil

from jax_ep.config import ConfigError, ModelConfig, did_you_mean


def model_names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "deployments")


def load_model(name: str) -> ModelConfig:
  if name not in model_names():
    raise ConfigError(f"--config={name!r} is not a preset; choose one of {model_names()}."
                      + did_you_mean(name, model_names()))
  return importlib.import_module(f"{__name__}.{name}").get_config()
