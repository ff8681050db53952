#!/usr/bin/env python3
"""Starts a multi-process jax-ep run on this machine, as a cluster would start one per host.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- generate --dry_run

Each process gets JAX_EP_COORDINATOR (a free local port), JAX_EP_NUM_PROCESSES and
JAX_EP_PROCESS_ID (jax_ep/distributed.py). On the CPU (the default without a GPU
plugin) each simulates --devices_per_process devices and the processes exchange
through gloo; with --platform=gpu process i sees GPUs i*D .. i*D+D-1 through
CUDA_VISIBLE_DEVICES. Output is streamed with a "[i] " prefix. When one process fails
the others are stopped. The exit status is process 0's, or the first failure's when
process 0 was stopped because another failed (124 if --timeout_s ran out).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def has_gpu_plugin() -> bool:
  sys.path.insert(0, ROOT)
  from jax_ep import runtime

  return runtime.has_gpu_plugin()


def commands(num_processes: int, devices_per_process: int, platform: str, args: list[str],
             port: int, env: dict[str, str]) -> list[tuple[list[str], dict[str, str]]]:
  """(argv, environment) of each process."""
  base = dict(env)
  base["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, base.get("PYTHONPATH")) if p)
  base["PYTHONUNBUFFERED"] = "1"
  if platform == "cpu":
    # The device count comes from --simulate_devices; a forced host count would fight it.
    xla = [f for f in base.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    base["XLA_FLAGS"] = " ".join(xla)
    base.pop("JAX_PLATFORMS", None)
  given = {a.split("=")[0] for a in args}
  extra = [] if "--simulate_devices" in given else [
      f"--simulate_devices={devices_per_process if platform == 'cpu' else 0}"]
  out = []
  for i in range(num_processes):
    e = dict(base, JAX_EP_COORDINATOR=f"127.0.0.1:{port}",
             JAX_EP_NUM_PROCESSES=str(num_processes), JAX_EP_PROCESS_ID=str(i))
    if platform == "gpu":
      e["CUDA_VISIBLE_DEVICES"] = ",".join(
          str(g) for g in range(i * devices_per_process, (i + 1) * devices_per_process))
    out.append(([sys.executable, "-m", "jax_ep", *args, *extra], e))
  return out


def _stream(i: int, proc: subprocess.Popen, lock: threading.Lock):
  for line in proc.stdout:
    with lock:
      sys.stdout.write(f"[{i}] {line}")
      sys.stdout.flush()


def run(num_processes: int, devices_per_process: int, platform: str, args: list[str],
        timeout_s: float | None = None) -> int:
  port = free_port()
  lock = threading.Lock()
  procs, readers = [], []
  for i, (argv, env) in enumerate(commands(num_processes, devices_per_process, platform, args,
                                           port, dict(os.environ))):
    procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
    readers.append(threading.Thread(target=_stream, args=(i, procs[-1], lock), daemon=True))
    readers[-1].start()
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  status = None
  try:
    while status is None:
      codes = [p.poll() for p in procs]
      failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
      if failed is not None:
        if failed != 0:
          print(f"[launch] process {failed} exited with {codes[failed]}; stopping the others",
                file=sys.stderr, flush=True)
        status = codes[0] if codes[0] not in (None, 0) else codes[failed]
        status = status if status >= 0 else 128 - status  # killed by a signal, as a shell says
      elif all(c == 0 for c in codes):
        status = 0
      elif deadline is not None and time.monotonic() > deadline:
        print(f"[launch] timed out after {timeout_s} s; stopping every process",
              file=sys.stderr, flush=True)
        status = 124
      else:
        time.sleep(0.1)
  except KeyboardInterrupt:
    status = 130
  finally:
    _stop(procs)
    for r in readers:
      r.join(timeout=5)
  return status


def _stop(procs: list[subprocess.Popen]):
  for p in procs:
    if p.poll() is None:
      p.terminate()
  for p in procs:
    try:
      p.wait(timeout=10)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    ours, theirs = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  else:
    ours, theirs = argv, []
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="launch/local.py --num_processes=P [--devices_per_process=D] [--platform=cpu|gpu] "
            "-- <jax-ep arguments>")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="simulated CPU devices, or GPUs, per process (default: 4 on the "
                           "CPU, 1 GPU)")
  parser.add_argument("--platform", choices=("cpu", "gpu"), default=None,
                      help="default: gpu when a jax CUDA plugin is installed")
  parser.add_argument("--timeout_s", type=float, default=None,
                      help="stop every process after this long (exit status 124)")
  opts = parser.parse_args(ours)
  if not theirs:
    parser.error("give the jax-ep arguments after --, e.g. -- generate --deployment=proposed")
  if opts.num_processes < 1:
    parser.error(f"--num_processes={opts.num_processes} must be at least 1")
  platform = opts.platform or ("gpu" if has_gpu_plugin() else "cpu")
  per = opts.devices_per_process or (4 if platform == "cpu" else 1)
  if per < 1:
    parser.error(f"--devices_per_process={per} must be at least 1")
  return run(opts.num_processes, per, platform, theirs, opts.timeout_s)


if __name__ == "__main__":
  sys.exit(main())
