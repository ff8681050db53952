"""Result files: the checks on an output path made before any work, and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets

from jax_ep.config import ConfigError


def check_output_path(path: str | None, flag: str = "--output") -> None:
  """Raises ConfigError unless `path` can be written as a new or replaced file.

  None means no output was asked for; an empty string is a mistake (`--output=`). The
  directory must exist and take a new file (_try_create), and `path` must not be a
  directory.
  """
  if path is None:
    return
  if not path.strip():
    raise ConfigError(f"{flag}= is empty: give a file name (e.g. {flag}=out.json), or leave "
                      "the flag out to write nothing.")
  if os.path.isdir(path):
    raise ConfigError(f"{flag}={path} is a directory; give a file name inside it, e.g. "
                      f"{flag}={os.path.join(path, 'out.json')}.")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    what = "is not a directory" if os.path.exists(directory) else "does not exist"
    raise ConfigError(f"{flag}={path}: {directory} {what}; create it first or choose another "
                      "path.")
  _try_create(directory, path, flag)


def check_output_dir(path: str | None, flag: str) -> None:
  """Raises ConfigError unless `path` is, or can be made, a directory to write files in
  (its nearest existing ancestor must be a writable directory). None: not asked for."""
  if path is None:
    return
  if not path.strip():
    raise ConfigError(f"{flag}= is empty: give a directory, or leave the flag out.")
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{flag}={path} is a file, not a directory; give a directory (it is "
                      "created if missing).")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"{flag}={path}: {existing} is a file, so the directory cannot be "
                      "created there; choose another path.")
  _try_create(existing, path, flag)


def _try_create(directory: str, path: str, flag: str) -> None:
  """A file can be created in `directory` (tried: permission bits say nothing for root,
  nor for read-only file systems), or ConfigError."""
  probe = os.path.join(directory, f".jax_ep_probe_{secrets.token_hex(4)}")
  try:
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
  except OSError as e:
    raise ConfigError(f"{flag}={path}: cannot create a file in {directory} ({e.strerror}); "
                      "choose a writable directory.") from None
  os.close(fd)
  os.unlink(probe)


@contextlib.contextmanager
def replacing(path: str):
  """A new file beside `path` to write, renamed over `path` when the block ends (removed
  if it raises), so that no reader sees a half-written file. It gets the usual mode
  (0666 less the umask, 0644 mostly), as open(path, "w") would give it (mkstemp would
  make it 0600)."""
  directory = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
  os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, payload, **dump_kwargs) -> None:
  """Writes `payload` as JSON to `path` atomically (replacing)."""
  with replacing(path) as tmp, open(tmp, "w") as f:
    json.dump(payload, f, **{"indent": 1, **dump_kwargs})


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (replacing)."""
  with replacing(path) as tmp, open(tmp, "w") as f:
    f.write(text)
