"""Multi-process runs through launch/local.py, as users start them: 2 processes x 4 CPU devices.

Each process compiles, so these are few: the tokens of both deployments (against one process
of 8 devices, run in-process through cli_runner.py), a missing peer, processes that
disagree, and the dry run's table.
"""

import json
import os
import socket
import subprocess
import sys

from cli_runner import run_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "launch", "local.py")
GENERATE = ["generate", "--batch=8", "--prompt_len=4", "--max_new_tokens=3"]


def _env():
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and not k.startswith(("JAX_EP_", "SLURM_",
                                                                            "OMPI_"))}
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # as conftest.py: compiles faster
  env["PYTHONPATH"] = ROOT
  return env


def _launch(processes, devices, args):
  return subprocess.Popen([sys.executable, LOCAL, f"--num_processes={processes}",
                           f"--devices_per_process={devices}", "--platform=cpu",
                           "--timeout_s=500", "--", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_env(), cwd=ROOT)


def _jax_ep(*args):
  return subprocess.Popen([sys.executable, "-m", "jax_ep", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


def _port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)  # a hang fails here instead of blocking CI
  return proc.returncode, out, err or ""


def test_two_processes_of_4_devices_generate_the_tokens_of_one_of_8(tmp_path):
  runs, ones = {}, []
  for name, extra in (("proposed", ["--temperature=0.8"]), ("baseline", [])):
    args = [*GENERATE, f"--deployment={name}", *extra]
    out = tmp_path / f"{name}_2.json"
    runs[name, 2] = (out, _launch(2, 4, [*args, f"--output={out}"]))
    out = tmp_path / f"{name}_1.json"
    runs[name, 1] = (out, None)
    ones.append([*args, "--simulate_devices=8", f"--output={out}"])
  # One process of 8 devices, the same flags: both deployments in one interpreter
  # (cli_runner.py) while the two-process runs go on.
  for r in run_cases(ones):
    assert r["rc"] == 0, r["stderr"][-3000:]
  for (name, _), (out, proc) in runs.items():
    if proc is not None:
      code, log, _ = _wait(proc)
      assert code == 0, log[-3000:]
      assert "[0]   wrote" in log and "8 devices" in log
      # Process 1 joins, computes and stays quiet: no progress, results or files.
      assert not [line for line in log.splitlines()
                  if line.startswith("[1]") and ("TPOT" in line or "wrote" in line
                                                 or "compiling" in line)]
    result = json.loads(out.read_text())
    assert result["deployment"]["kind"] == name and len(result["tokens"]) == 8
  for name in ("proposed", "baseline"):
    two = json.loads(runs[name, 2][0].read_text())["tokens"]
    one = json.loads(runs[name, 1][0].read_text())["tokens"]
    assert two == one, name
  assert list(tmp_path.iterdir()) and not list(tmp_path.glob("*.tmp"))


def test_a_missing_peer_is_a_timeout_error_not_a_hang():
  procs = {pid: _jax_ep(*GENERATE, "--num_processes=2", f"--process_id={pid}",
                        f"--coordinator_address=127.0.0.1:{_port()}",
                        "--distributed_timeout_s=5", "--simulate_devices=4")
           for pid in (0, 1)}  # separate ports: each waits for a peer that never comes
  for pid, proc in procs.items():
    code, out, err = _wait(proc, timeout=120)
    assert code == 3, (code, err[-2000:])
    assert f"distributed set-up timed out after 5 s: process {pid} of 2" in err, err[-2000:]
    assert ("did not see all of them join" if pid == 0 else "could not join the coordinator") in err
    assert "compiling" not in out


def test_processes_that_disagree_stop_before_compiling():
  port = _port()
  procs = [_jax_ep(*GENERATE, "--num_processes=2", f"--process_id={pid}", f"--seed={pid}",
                   f"--coordinator_address=127.0.0.1:{port}", "--distributed_timeout_s=60",
                   "--simulate_devices=4") for pid in (0, 1)]
  for proc in procs:
    code, out, err = _wait(proc, timeout=180)
    assert code == 2, err[-2000:]
    assert "jax-ep: error: the processes do not run the same flags (--seed: 0 on process 0; " \
           "1 on process 1)" in err, err[-2000:]
    assert "compiling" not in out


def test_a_process_that_stops_is_named_by_the_others_at_once():
  # Process 1 asks for 3 processes in a job of 2: it stops at start-up, and process 0,
  # waiting for its flags, says why at once (within the 120 s here, not after its 300).
  import time

  port = _port()
  start = time.monotonic()
  procs = [_jax_ep(*GENERATE, f"--num_processes={n}", f"--process_id={pid}",
                   f"--coordinator_address=127.0.0.1:{port}", "--distributed_timeout_s=300",
                   "--simulate_devices=4") for pid, n in ((0, 2), (1, 3))]
  (code0, out0, err0), (code1, _, err1) = (_wait(p, timeout=120) for p in procs)
  assert time.monotonic() - start < 120
  assert code1 == 2 and "3 processes were asked for but the coordinator" in err1, err1[-2000:]
  assert code0 == 2, err0[-2000:]
  assert ("process 1 stopped before it reported its flags: 3 processes were asked for but the "
          "coordinator") in err0, err0[-2000:]
  assert "DEADLINE_EXCEEDED" not in err0 and "compiling" not in out0


def test_dry_run_prints_which_process_holds_what():
  code, log, _ = _wait(_launch(2, 4, ["generate", "--deployment=proposed", "--decode_groups=8",
                                      "--dry_run"]), 300)
  assert code == 0, log[-3000:]
  # The rounded default batch is said once, by process 0 (as every notice).
  assert "[0] jax-ep: --batch not given: 16" in log and "[1] jax-ep: --batch" not in log, log
  rows = [line.split()[1:] for line in log.splitlines()
          if line.startswith("[0] ") and line[4:5].isdigit() and "devices on" not in line]
  # process, device, stage: process 0 holds stages 0-1, process 1 stages 2-3.
  assert [(r[0], r[2]) for r in rows] == [(str(s // 2), str(s)) for s in range(4) for _ in "ab"]
  assert "8 devices on 2 processes" in log and "compiling" not in log
  assert not [line for line in log.splitlines() if line.startswith("[1] ") and "stage" in line]


def test_a_bench_over_two_processes_runs_what_spans_them(tmp_path):
  code, log, _ = _wait(_launch(2, 4, [
      "bench", "--kinds=single,proposed", "--skip_unfit", "--steps=1", "--synced=1",
      "--warmup=0", "--batch=16", "--prompt_len=4", "--probe_mib=1",
      f"--out_dir={tmp_path}"]))
  assert code == 0, log[-3000:]
  assert "[0] skip single: single uses 1 device, of 1 of the 2 processes" in log
  assert "[0]   proposed: TPOT" in log and "[1]   proposed: TPOT" in log
  runs = json.loads((tmp_path / "seed_table.json").read_text())["runs"]
  assert [r["name"] for r in runs] == ["proposed"]
