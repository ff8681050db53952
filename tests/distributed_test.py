"""jax_ep/distributed.py's decisions from flags and environments (no processes are started)."""

import dataclasses
import os

import numpy as np
import pytest
from jax._src.clusters import ompi_cluster, slurm_cluster

from configs import deployments
from jax_ep import distributed
from jax_ep.config import ConfigError

SLURM_16_ON_2_NODES = {  # srun --nodes=2 --ntasks-per-node=8: task 9 is node 2's second
    "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_NTASKS": "16",
    "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2"}
OMPI4 = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
         "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
         "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}


def test_nothing_set_is_one_process():
  launch = distributed.resolve(env={})
  assert not launch.multi_process and launch.num_processes == 1 and launch.process_id == 0
  assert "not initialised" in launch.describe()


def test_flags():
  launch = distributed.resolve("node0:1234", 2, 1, env={})
  assert (launch.num_processes, launch.process_id, launch.coordinator_address) == (2, 1,
                                                                                   "node0:1234")
  assert launch.local_device_ids is None
  assert launch.sources == ("--num_processes", "--process_id", "--coordinator_address")


def test_explicit_variables_and_flags_over_them():
  env = {"JAX_EP_COORDINATOR": "h:9", "JAX_EP_NUM_PROCESSES": "4", "JAX_EP_PROCESS_ID": "3"}
  assert distributed.resolve(env=env) == distributed.Launch(
      4, 3, "h:9", None, ("JAX_EP_NUM_PROCESSES", "JAX_EP_PROCESS_ID", "JAX_EP_COORDINATOR"))
  launch = distributed.resolve(None, 8, 5, env=env)
  assert (launch.num_processes, launch.process_id, launch.coordinator_address) == (8, 5, "h:9")
  # JAX's own variable for the address is honoured after ours.
  env2 = {"JAX_COORDINATOR_ADDRESS": "j:7", "JAX_EP_NUM_PROCESSES": "2", "JAX_EP_PROCESS_ID": "0"}
  assert distributed.resolve(env=env2).coordinator_address == "j:7"


def test_slurm_matches_jax_and_gives_one_gpu_per_task(monkeypatch):
  launch = distributed.resolve(env=SLURM_16_ON_2_NODES)
  assert (launch.num_processes, launch.process_id, launch.local_device_ids) == (16, 9, (1,))
  for k, v in SLURM_16_ON_2_NODES.items():
    monkeypatch.setenv(k, v)
  assert slurm_cluster.SlurmCluster.is_env_present()
  assert launch.coordinator_address == slurm_cluster.SlurmCluster.get_coordinator_address(
      None, None) == "gpu007:62016"
  assert "SLURM SLURM_NTASKS" in launch.sources
  # The port can be set; a flag beats SLURM.
  env = dict(SLURM_16_ON_2_NODES, JAX_COORDINATOR_PORT="5000")
  assert distributed.resolve(env=env).coordinator_address == "gpu007:5000"
  assert distributed.resolve(num_processes=16, process_id=0, env=env).process_id == 0


def test_slurm_one_task_per_node_keeps_every_gpu():
  env = dict(SLURM_16_ON_2_NODES, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0")
  launch = distributed.resolve(env=env)
  assert (launch.num_processes, launch.process_id, launch.local_device_ids) == (2, 1, None)
  # A launcher that already bound one GPU per task (CUDA_VISIBLE_DEVICES) is left alone;
  # JAX_LOCAL_DEVICE_IDS overrides.
  env = dict(SLURM_16_ON_2_NODES, CUDA_VISIBLE_DEVICES="3")
  assert distributed.resolve(env=env).local_device_ids is None
  env = dict(SLURM_16_ON_2_NODES, JAX_LOCAL_DEVICE_IDS="2,3")
  assert distributed.resolve(env=env).local_device_ids == (2, 3)


def test_slurm_batch_step_outside_srun_is_one_process():
  env = {k: v for k, v in SLURM_16_ON_2_NODES.items() if k != "SLURM_STEP_NODELIST"}
  assert not distributed.resolve(env=env).multi_process


@pytest.mark.parametrize("node_list", ["node001", "node001,host2", "node[001-0015],host2",
                                       "node[001,007-015],host2", "a-b[5-6]"])
def test_first_slurm_host_as_jax_reads_it(monkeypatch, node_list):
  monkeypatch.setenv("SLURM_STEP_NODELIST", node_list)
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  want = slurm_cluster.SlurmCluster.get_coordinator_address(None, None).rsplit(":", 1)[0]
  assert distributed._first_host(node_list) == want


def test_first_slurm_host_of_one_bracketed_node():
  assert distributed._first_host("gpu[5]") == "gpu5"  # JAX 0.10.2 reads "gpu5]"


def test_open_mpi_4_matches_jax(monkeypatch):
  launch = distributed.resolve(env=OMPI4)
  for k, v in OMPI4.items():
    monkeypatch.setenv(k, v)
  assert launch.coordinator_address == ompi_cluster.OmpiCluster.get_coordinator_address(
      None, None) == "10.96.0.1:62624"
  assert (launch.num_processes, launch.process_id, launch.local_device_ids) == (4, 2, None)


def test_open_mpi_5_needs_a_coordinator():
  env = {k: v for k, v in OMPI4.items() if k != "OMPI_MCA_orte_hnp_uri"}
  with pytest.raises(ConfigError, match="Open MPI 5 does not export.*JAX_EP_COORDINATOR"):
    distributed.resolve(env=env)
  launch = distributed.resolve(env=dict(env, JAX_EP_COORDINATOR="head:1234"))
  assert (launch.coordinator_address, launch.num_processes, launch.process_id) == ("head:1234",
                                                                                   4, 2)


@pytest.mark.parametrize("args,env,message", [
    (("h:1", 2, 2), {}, r"--process_id=2 must be in 0..1 for 2 processes"),
    ((None, 1, 1), {}, r"--process_id=1 must be in 0..0"),
    ((None, 2, 0), {}, r"2 processes \(--num_processes\) need a coordinator"),
    (("nohost", 2, 0), {}, r"--coordinator_address='nohost' must be HOST:PORT"),
    ((None, 0, None), {}, r"--num_processes=0 must be at least 1"),
    ((), {"JAX_EP_NUM_PROCESSES": "two"}, r"JAX_EP_NUM_PROCESSES='two' must be an integer"),
    ((), {"JAX_EP_NUM_PROCESSES": "2", "JAX_EP_PROCESS_ID": "5", "JAX_EP_COORDINATOR": "h:1"},
     r"JAX_EP_PROCESS_ID=5 must be in 0..1"),
])
def test_errors_name_what_to_change(args, env, message):
  with pytest.raises(ConfigError, match=message):
    distributed.resolve(*args, env=env)


def test_initialize_on_one_process_is_a_no_op(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("SLURM_", "OMPI_", "JAX_EP_")) or k == "JAX_COORDINATOR_ADDRESS":
      monkeypatch.delenv(k)
  import jax

  assert not distributed.initialize().multi_process and not jax.distributed.is_initialized()
  distributed.check_same("anything", {"a": 1})  # nothing to compare with


def test_differences_name_the_field_and_the_processes():
  same = {0: {"--batch": 8, "--seed": 0}, 1: {"--batch": 8, "--seed": 0}}
  assert distributed.differences(same, "flags") == ""
  other = {0: {"--batch": 8, "--seed": 0}, 1: {"--batch": 8, "--seed": 1},
           2: {"--batch": 8, "--seed": 1, "--new": True}}
  msg = distributed.differences(other, "flags")
  assert "--seed: 0 on process 0; 1 on processes 1,2" in msg
  assert '--new: "<unset>" on processes 0,1; true on process 2' in msg
  assert "--batch" not in msg and "only --process_id may differ" in msg


def test_fields_flatten_configs_and_digest_arrays():
  dep = deployments.PRESETS["seed_proposed"]
  prompts = np.random.RandomState(0).randint(0, 256, (8, 4))
  a = distributed.fields(deployment=dep, prompts=prompts)
  assert a["deployment.expert"] == 16 and a["prompts"].startswith("int")
  b = distributed.fields(deployment=dataclasses.replace(dep, expert=8), prompts=prompts + 1)
  assert {k for k in a if a[k] != b[k]} == {"deployment.expert", "prompts"}
  assert distributed.fields(prompts=prompts.copy()) == {"prompts": a["prompts"]}


class _Store:
  """The coordinator's key-value store as check_same's waits use it."""

  def __init__(self, **values):
    self.values, self.gets = values, 0

  def blocking_key_value_get(self, key, timeout_ms):
    self.gets += 1
    if key in self.values:
      return self.values[key]
    raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")

  def key_value_try_get(self, key):
    if key in self.values:
      return self.values[key]
    raise RuntimeError(f"NOT_FOUND: {key}")


def test_a_wait_ends_at_a_failure_report_or_after_its_timeout_without_jax_text(monkeypatch):
  monkeypatch.setattr(distributed, "POLL_MS", 10)
  assert distributed._wait_for(_Store(k="v"), "k", 1, "flags", 5) == "v"
  failed = _Store(**{distributed.FAILED.format(1): "batch=7 is not divisible"})
  with pytest.raises(ConfigError, match="^process 1 stopped before it reported its flags: "
                     "batch=7 is not divisible$"):
    distributed._wait_for(failed, "k", 1, "flags", 300)
  assert failed.gets == 1  # at the first poll, not after 300 s
  with pytest.raises(ConfigError) as e:
    distributed._wait_for(_Store(), "k", 1, "flags", 1)
  assert str(e.value) == ("process 1 did not report its flags within 1 s (it may have failed "
                          "or not started: see its log).")
