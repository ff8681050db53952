"""The one place that sets up jax.distributed: from flags, SLURM, Open MPI or JAX_EP_* variables.

A run on several processes (one per host, or one per GPU) is JAX's multi-controller
model: every process runs the same program on the global devices. `initialize` must run
after the platform and device-count settings (runtime.py) and before anything starts a
jax backend. Each field is taken from the first source that sets it:

  coordinator: --coordinator_address, JAX_EP_COORDINATOR, JAX_COORDINATOR_ADDRESS, then
               SLURM's first node of the step or Open MPI 4's launcher;
  processes:   --num_processes, JAX_EP_NUM_PROCESSES, SLURM_NTASKS, OMPI_COMM_WORLD_SIZE;
  this one:    --process_id, JAX_EP_PROCESS_ID, SLURM_PROCID, OMPI_COMM_WORLD_RANK.

With none set it is one process and nothing is initialised. The cluster's port is
JAX_COORDINATOR_PORT, else derived from the SLURM job id / Open MPI job id as JAX does.
Local GPUs: all visible ones, unless several processes share a node without
CUDA_VISIBLE_DEVICES, when each takes the GPU of its local rank (JAX_LOCAL_DEVICE_IDS
overrides).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Mapping

from absl import logging

from jax_ep.config import ConfigError

# Exit status when the processes could not all join within the timeout.
TIMEOUT_EXIT = 3
DEFAULT_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Launch:
  """What initialize decided; `sources` names where each field came from."""

  num_processes: int = 1
  process_id: int = 0
  coordinator_address: str | None = None  # None on one process
  local_device_ids: tuple[int, ...] | None = None  # None: every visible device
  sources: tuple[str, ...] = ()

  @property
  def multi_process(self) -> bool:
    return self.num_processes > 1

  def describe(self) -> str:
    if not self.multi_process:
      return "one process (jax.distributed not initialised)"
    gpus = ("all visible devices" if self.local_device_ids is None
            else f"local devices {list(self.local_device_ids)}")
    return (f"process {self.process_id} of {self.num_processes}, coordinator "
            f"{self.coordinator_address}, {gpus} (from {', '.join(self.sources)})")


def _int(value: str, name: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={value!r} must be an integer.") from None


def _first_host(node_list: str) -> str:
  """The first host of a SLURM node list: 'gpu[003-010,12],cpu1' -> 'gpu003'."""
  m = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", node_list)
  if not m:
    raise ConfigError(f"SLURM_STEP_NODELIST={node_list!r}: cannot read its first host; set "
                      "JAX_EP_COORDINATOR=host:port.")
  return m.group(1) + (m.group(2) or "")


def _slurm(env: Mapping[str, str]) -> dict | None:
  """SLURM inside `srun` (the variables JAX's own SlurmCluster reads)."""
  need = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
          "SLURM_LOCALID")
  if not all(k in env for k in need):
    return None
  port = env.get("JAX_COORDINATOR_PORT") or str(
      _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 4096 + 61440)
  nodes = _int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")),
               "SLURM_STEP_NUM_NODES")
  ntasks = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
  return {"name": "SLURM", "coordinator": f"{_first_host(env['SLURM_STEP_NODELIST'])}:{port}",
          "coordinator_var": "SLURM_STEP_NODELIST",
          "num_processes": ntasks, "num_var": "SLURM_NTASKS",
          "process_id": _int(env["SLURM_PROCID"], "SLURM_PROCID"), "id_var": "SLURM_PROCID",
          "local_rank": _int(env["SLURM_LOCALID"], "SLURM_LOCALID"),
          "local_size": -(-ntasks // max(nodes, 1))}


def _ompi(env: Mapping[str, str]) -> dict | None:
  """Open MPI's mpirun. Open MPI 4 exports the launcher's address (OMPI_MCA_orte_hnp_uri);
  Open MPI 5 does not, so the coordinator must then come from a flag or variable."""
  if "OMPI_COMM_WORLD_SIZE" not in env or "OMPI_COMM_WORLD_RANK" not in env:
    return None
  coordinator = None
  uri = env.get("OMPI_MCA_orte_hnp_uri")
  if uri:
    ip = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
    port = env.get("JAX_COORDINATOR_PORT") or str(
        _int(uri.split(".", 1)[0], "OMPI_MCA_orte_hnp_uri job id") // 4096 % 4096 + 61440)
    if ip:
      coordinator = f"{next(g for g in ip.groups() if g)}:{port}"
  return {"name": "Open MPI", "coordinator": coordinator,
          "coordinator_var": "OMPI_MCA_orte_hnp_uri",
          "num_processes": _int(env["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE"),
          "num_var": "OMPI_COMM_WORLD_SIZE",
          "process_id": _int(env["OMPI_COMM_WORLD_RANK"], "OMPI_COMM_WORLD_RANK"),
          "id_var": "OMPI_COMM_WORLD_RANK",
          "local_rank": _int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                             "OMPI_COMM_WORLD_LOCAL_RANK"),
          "local_size": _int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"),
                             "OMPI_COMM_WORLD_LOCAL_SIZE")}


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None) -> Launch:
  """Decides the launch from flags (None: unset), then variables, then the cluster.

  Pure: reads `env` (default os.environ) and starts nothing. Raises ConfigError naming
  the flag or variable to change.
  """
  env = os.environ if env is None else env
  cluster = _slurm(env) or _ompi(env)
  sources = []

  def pick(flag_value, flag, variables, cluster_key, cluster_var):
    if flag_value is not None:
      sources.append(f"--{flag}")
      return flag_value, f"--{flag}"
    for var in variables:
      if env.get(var):
        sources.append(var)
        return env[var], var
    if cluster and cluster[cluster_key] is not None:
      sources.append(f"{cluster['name']} {cluster[cluster_var]}")
      return cluster[cluster_key], cluster[cluster_var]
    return None, None

  count, count_from = pick(num_processes, "num_processes", ("JAX_EP_NUM_PROCESSES",),
                           "num_processes", "num_var")
  pid, pid_from = pick(process_id, "process_id", ("JAX_EP_PROCESS_ID",), "process_id",
                       "id_var")
  address, address_from = pick(coordinator_address, "coordinator_address",
                               ("JAX_EP_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
                               "coordinator", "coordinator_var")
  count = 1 if count is None else _int(str(count), count_from)
  pid = 0 if pid is None else _int(str(pid), pid_from)
  if count < 1:
    raise ConfigError(f"{count_from}={count} must be at least 1.")
  if not 0 <= pid < count:
    raise ConfigError(f"{pid_from}={pid} must be in 0..{count - 1} for {count} process"
                      f"{'es' if count > 1 else ''} ({count_from or 'default'}={count}).")
  if count == 1:
    return Launch(sources=tuple(sources))
  if not address:
    hint = (" Open MPI 5 does not export the launcher's address:" if cluster and
            cluster["name"] == "Open MPI" else "")
    raise ConfigError(f"{count} processes ({count_from}) need a coordinator:{hint} pass "
                      "--coordinator_address=HOST:PORT (process 0's host) or set "
                      "JAX_EP_COORDINATOR.")
  if ":" not in address or not address.rsplit(":", 1)[1].isdigit():
    raise ConfigError(f"{address_from}={address!r} must be HOST:PORT, e.g. node001:61234.")
  local = None
  if env.get("JAX_LOCAL_DEVICE_IDS"):
    local = tuple(_int(v, "JAX_LOCAL_DEVICE_IDS") for v in env["JAX_LOCAL_DEVICE_IDS"].split(","))
  elif cluster and cluster["local_size"] > 1 and not env.get("CUDA_VISIBLE_DEVICES"):
    local = (cluster["local_rank"],)  # several processes on a node: one GPU each
  return Launch(count, pid, address, local, tuple(sources))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = DEFAULT_TIMEOUT_S) -> Launch:
  """Initialises jax.distributed as `resolve` decides (a no-op on one process).

  Call after runtime.simulate_devices and before any jax computation. On the CPU the
  processes exchange through gloo collectives. If the processes have not all joined
  within `timeout_s` (a wrong process count, an unreachable coordinator), prints why to
  stderr and exits with TIMEOUT_EXIT: jax itself aborts the process with an opaque
  DEADLINE_EXCEEDED, so a watchdog thread speaks first.
  """
  launch = resolve(coordinator_address, num_processes, process_id)
  if not launch.multi_process:
    logging.info("jax_ep.distributed: %s", launch.describe())
    return launch
  if not isinstance(timeout_s, int) or timeout_s < 1:
    raise ConfigError(f"--distributed_timeout_s={timeout_s!r} must be a positive integer.")
  import jax

  if jax.distributed.is_initialized():
    raise ConfigError("jax.distributed is already initialised in this process.")
  try:  # CPU devices of several processes exchange through gloo (GPUs use NCCL)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # a jax without the option, where gloo is the only one
    pass
  logging.info("jax_ep.distributed: %s; waiting up to %d s for all processes",
               launch.describe(), timeout_s)
  watchdog = threading.Timer(timeout_s, _give_up, (launch, timeout_s))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
        launch.coordinator_address, num_processes=launch.num_processes,
        process_id=launch.process_id,
        local_device_ids=None if launch.local_device_ids is None else list(launch.local_device_ids),
        # Everything is decided above; JAX's own detection would, for instance, give a
        # one-process-per-node SLURM job a single GPU per node.
        cluster_detection_method="deactivate",
        initialization_timeout=timeout_s + 30)  # the watchdog speaks first
  finally:
    watchdog.cancel()
  if jax.process_count() != launch.num_processes:
    raise ConfigError(f"{launch.num_processes} processes were asked for but the coordinator "
                      f"{launch.coordinator_address} formed a job of {jax.process_count()}; "
                      "give every process the same --num_processes.")
  logging.info("jax_ep.distributed: process %d of %d joined: %d local, %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return launch


def _give_up(launch: Launch, timeout_s: int) -> None:
  role = ("as the coordinator it did not see all of them join"
          if launch.process_id == 0 else
          f"it could not join the coordinator at {launch.coordinator_address} (unreachable, "
          "or not every process arrived)")
  print(f"jax-ep: error: distributed set-up timed out after {timeout_s} s: process "
        f"{launch.process_id} of {launch.num_processes} ({', '.join(launch.sources)}), and "
        f"{role}. Check that {launch.num_processes} processes were started, each with its own "
        f"process id in 0..{launch.num_processes - 1}, that {launch.coordinator_address} is "
        "process 0's host and reachable from every host, or raise --distributed_timeout_s "
        "if they start slowly.", file=sys.stderr, flush=True)
  os._exit(TIMEOUT_EXIT)


def is_primary() -> bool:
  """Whether this process writes files and prints results (process 0)."""
  import jax

  return jax.process_index() == 0


def _client():
  from jax._src import distributed as jax_distributed

  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed is not initialised")
  return client


_checks = iter(range(1 << 30))


SAME_FLAGS = ("Start every process with the same flags and the same code; only --process_id "
              "may differ.")


def check_same(what: str, values: Mapping, timeout_s: int = DEFAULT_TIMEOUT_S,
               hint: str = SAME_FLAGS) -> None:
  """Raises ConfigError on every process unless every process has the same `values`
  (the message ends with `hint`: what to change).

  `values` maps names (what the user typed: "--batch", "deployment.tp") to JSON-able
  values. Exchanged through the coordinator's key-value store, so nothing compiles and a
  process that never arrives is an error after `timeout_s`, not a hang.
  """
  import jax

  if jax.process_count() == 1:
    return
  client, me, n = _client(), jax.process_index(), jax.process_count()
  key = f"jax_ep/check/{next(_checks)}/{what}"
  mine = json.dumps(values, sort_keys=True, default=str)
  client.key_value_set(f"{key}/{me}", mine)
  everyone = {p: json.loads(_wait_for(client, f"{key}/{p}", p, what, timeout_s))
              for p in range(n)}
  problem = differences(everyone, what, hint)
  if problem:
    raise ConfigError(problem)


FAILED = "jax_ep/failed/{}"  # a process's last error, for the others waiting on it
POLL_MS = 1000


def _wait_for(client, key: str, p: int, what: str, timeout_s: int) -> str:
  """The value process `p` sets at `key`; ConfigError at once if `p` reported a failure
  (report_failure), or after `timeout_s` if it never sets it."""
  import time

  deadline = time.monotonic() + timeout_s
  while True:
    left_ms = int(1000 * (deadline - time.monotonic()))
    try:
      return client.blocking_key_value_get(key, max(1, min(POLL_MS, left_ms)))
    except Exception:  # jax raises its runtime error type on a timeout
      pass
    try:
      failure = client.key_value_try_get(FAILED.format(p))
    except Exception:  # not set: p has not failed (yet)
      failure = None
    if failure:
      raise ConfigError(f"process {p} stopped before it reported its {what}: {failure}")
    if left_ms <= POLL_MS:
      raise ConfigError(f"process {p} did not report its {what} within {timeout_s} s (it may "
                        "have failed or not started: see its log).")


def report_failure(message: str) -> None:
  """Tells the other processes why this one stops, so that a check_same waiting on it
  says so at once rather than after its timeout. A no-op on one process."""
  try:
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is not None:
      import jax

      client.key_value_set(FAILED.format(jax.process_index()), message)
  except Exception:  # the coordinator may be gone: the others time out as before
    pass


def fields(**named) -> dict:
  """Values for check_same: dataclasses by field ("deployment.tp"), arrays by digest."""
  import numpy as np

  out = {}
  for name, value in named.items():
    if dataclasses.is_dataclass(value):
      out.update({f"{name}.{k}": v for k, v in dataclasses.asdict(value).items()})
    elif isinstance(value, np.ndarray):
      out[name] = f"{value.dtype}{list(value.shape)} sha256 " + hashlib.sha256(
          np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
    else:
      out[name] = value
  return out


def versions() -> dict:
  """jax, jaxlib and a digest of jax_ep's and configs' sources: the code a process runs."""
  import importlib.metadata

  import jax

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  digest = hashlib.sha256()
  for package in ("jax_ep", "configs"):
    for folder, dirs, files in sorted(os.walk(os.path.join(root, package))):
      dirs.sort()
      for name in sorted(f for f in files if f.endswith(".py")):
        path = os.path.join(folder, name)
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
          digest.update(f.read())
  return {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
          "code (jax_ep/, configs/)": digest.hexdigest()[:16]}


def differences(by_process: Mapping[int, Mapping], what: str, hint: str = SAME_FLAGS) -> str:
  """'' if every process has the same values, else a message naming what differs."""
  names = sorted({k for v in by_process.values() for k in v})
  lines = []
  for name in names:
    seen = {}
    for p, values in sorted(by_process.items()):
      seen.setdefault(json.dumps(values.get(name, "<unset>"), sort_keys=True), []).append(p)
    if len(seen) > 1:
      lines.append(f"{name}: " + "; ".join(f"{v} on process{'es' if len(ps) > 1 else ''} "
                                          f"{','.join(map(str, ps))}" for v, ps in seen.items()))
  if not lines:
    return ""
  return f"the processes do not run the same {what} ({'; '.join(lines)}). {hint}"


def to_host(x):
  """A jax.Array's global value as numpy on every process (numpy passes through).

  An array sharded over devices of several processes cannot go through np.asarray;
  it is gathered (every process must call this in the same order).
  """
  import jax
  import numpy as np

  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
