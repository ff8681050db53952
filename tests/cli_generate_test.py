"""Tests for jax_ep/cli/generate.py: `jax-ep generate` run as users run it (cli_runner.py),
on simulated CPU devices: the same tokens on every deployment, and bad input refused before
anything compiles."""

import collections
import glob
import gzip
import json
import os
import re
import stat

import pytest
from cli_runner import run_cases


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_generate_on_each_deployment_writes_the_same_tokens_and_repeats_them(tmp_path):
  runs = [("single", "single"), ("proposed", "proposed"), ("baseline", "baseline"),
          ("mesh:2x2x1", "mesh"), ("single", "sampled"), ("proposed", "sampled_again")]
  sample = ["--temperature=0.8", "--seed=5"]
  profile = tmp_path / "profile"
  results = run_cases([["generate", f"--deployment={dep}", "--simulate_devices=8", "--batch=8",
                        "--prompt_len=4", "--max_new_tokens=4",
                        f"--output={tmp_path / name}.json", *(sample if "sampled" in name else []),
                        *([f"--profile_dir={profile}"] if name == "single" else [])]
                       for dep, name in runs])
  meshes = {"proposed": "stage 4 x expert 2 x tp 1 (8 devices)",
            "baseline": "stage 2 x expert 1 x tp 4 (8 devices)",
            "mesh:2x2x1": "stage 2 x expert 2 x tp 1 (4 devices)"}
  tokens = {}
  for (dep, name), r in zip(runs, results, strict=True):
    assert r["rc"] == 0, r["stderr"][-2000:]
    assert "TPOT" in r["stdout"] and "TPS" in r["stdout"] and meshes.get(dep, "") in r["stdout"]
    # Dropless: no (token, expert) pick is dropped, and the report counts picks.
    assert re.search(r"expert picks dropped +0 \(token x expert, all layers", r["stdout"])
    path = tmp_path / f"{name}.json"
    # The usual file mode (0666 less the umask), not a temporary file's 0600.
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    result = json.loads(path.read_text())
    assert result["deployment"]["kind"] == dep.replace("mesh:2x2x1", "proposed")
    assert result["tpot_ms"] > 0
    rows = result["tokens"]
    assert len(rows) == 8 and all(len(row) == 4 for row in rows)
    assert all(0 <= t < result["config"]["vocab_size"] for row in rows for t in row)
    tokens[name] = rows
  assert tokens["proposed"] == tokens["single"] and tokens["baseline"] == tokens["single"]
  assert tokens["mesh"] == tokens["single"]
  # The same seed, another process on another deployment: bitwise the same sampled tokens.
  assert tokens["sampled_again"] == tokens["sampled"] != tokens["proposed"]
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
  # --profile_dir traces the decode calls timed back to back, not the compiles before them.
  events = _trace_events(profile)
  assert events["PjitFunction(jit(decode_))"] >= 1, events.most_common(20)
  assert not [name for name in events if "compile" in name.lower() or "prefill" in name], events


def _trace_events(directory) -> collections.Counter:
  """How often each complete event's name occurs in the jax.profiler trace in `directory`."""
  files = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
  assert len(files) == 1, files
  with gzip.open(files[0]) as f:
    return collections.Counter(e.get("name") for e in json.load(f)["traceEvents"]
                               if e.get("ph") == "X")


BAD = [
    (["--batch=0"], "--batch=0 must be a positive integer"),
    (["--batch=-3"], "--batch=-3 must be a positive integer"),
    (["--max_new_tokens=0"], "--max_new_tokens=0 must be a positive integer"),
    (["--temperature=-1"], "--temperature=-1.0 must be >= 0"),
    (["--batch=6"], "--batch=6 is not divisible"),
    (["--prompt_len=60", "--max_new_tokens=10"], "--prompt_len=60 + --max_new_tokens=10 - 1 "
     "exceeds the KV cache length 64 (the model's max_seq_len): use --max_new_tokens=5 or "
     "--prompt_len=55 (or less), or raise max_seq_len in the model's ModelConfig (a preset's in "
     "configs/)."),
    (["--prompt_len=5000", "--max_new_tokens=100"], "lower both so that prompt_len + "
     "max_new_tokens <= 65"),
    (["--tokens_per_call=0"], "--tokens_per_call=0 must be a positive integer"),
    (["--expert_blocks=block_m=16,tail_m=16"], "--expert_blocks='block_m=16,tail_m=16': the up "
     "product's tail_m=16 must be 0 or a power of two below block_m=16"),
    (["--profile_dir=/proc/version"], "--profile_dir=/proc/version is a file, not a directory"),
    (["--config=nope"], "--config='nope' is not a preset"),
    (["--config=tinny"], "Did you mean 'tiny'?"),
    (["--deployment=propsed"], "--deployment='propsed' is unknown; use baseline, proposed (sized "
     "to the devices), mesh:SxExT (any shape) or a preset: ['baseline_1', 'baseline_2', "
     "'baseline_4'"),
    (["--deployment=propsed"], "Did you mean 'proposed'?"),
    (["--deployment=seed_proposed"], "deployment seed_proposed (pipeline x expert parallel): "
     "stage 4 x expert 16 x tp 1 (64 devices), placement=ep, microbatches=4, decode groups 4 "
     "needs 64 devices but 8 are available"),
    (["--deployment=proposed", "--tp=3"], "num_heads=8 is not divisible by --tp=3"),  # tp's own
    (["--deployment=proposed", "--expert_axis=3", "--tp=2"], "num_experts=16 is not divisible "
     "by the expert x tp"),
    (["--deployment=proposed", "--tp=3", "--placement=tp"], "num_heads=8 is not divisible by "
     "--tp=3"),
    (["--expert_axis=0"], "--expert_axis=0 must be a positive integer"),
    (["--deployment=mesh:3x2x1"], "use --stages=1, 2 or 4. (--deployment=mesh:3x2x1: its S, E "
     "and T are --stages, --expert_axis and --tp.)"),
    (["--deployment=proposed", "--stages=3"], "each pipeline stage must hold the same number "
     "of layers: use --stages=1, 2 or 4."),
    (["--decode_groups=-1"], "--decode_groups=-1 must be 0"),
    (["--simulate_devices=-5"], "--simulate_devices=-5: use -1 (auto), 0"),
    (["--simulate_devices=100000"], "fake CPU devices from 1 to 4096"),  # else looks hung
    (["--output="], "--output= is empty"),
    # `--checkpoint=$CKPT` with CKPT unset: refused, not random weights that look trained.
    (["--checkpoint="], "--checkpoint= is empty: give a directory"),
    (["--output={tmp}"], "is a directory"),
    (["--output={tmp}/missing/out.json"], "does not exist; create it first"),
    (["--output=/proc/jax_ep_out.json"], "cannot create a file in /proc"),
    # Weights alone exceed this host (a batch of 2**20 any host): refused before allocating.
    (["--config=seed", "--deployment=single", f"--batch={2**20}"],
     "does not fit: single"),
    # Refused from the sizes alone: its prompts (2**32 x 16 tokens, 512 GiB) are never built.
    (["--deployment=single", f"--batch={2**32}"], "does not fit: single"),
]


def test_bad_input_fails_before_compiling_and_writes_nothing(tmp_path):
  out = tmp_path / "out.json"
  cases = []
  for args, _ in BAD:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    has_output = any(a.startswith("--output") for a in args)
    sim = [] if any(a.startswith("--simulate_devices") for a in args) else [
        "--simulate_devices=8"]
    cases.append(["generate", *sim, *([] if has_output else [f"--output={out}"]), *args])
  results = run_cases(cases)
  for r, (_, message) in zip(results, BAD, strict=True):
    assert r["rc"] == 2, (r["args"], r["stdout"][-1000:], r["stderr"][-2000:])
    assert message in r["stderr"], (r["args"], r["stderr"][-2000:])
    assert "compiling" not in r["stdout"] and "probe:" not in r["stdout"], r["args"]
    assert "DeploymentConfig" not in r["stderr"] and "Traceback" not in r["stderr"]
  assert not list(tmp_path.iterdir())


def test_dry_run_of_a_model_this_host_cannot_hold_prints_the_layout(tmp_path):
  # The seed model (69 GB of fp16 experts) does not fit this host: a dry run allocates
  # nothing, so it prints the layout and says that the run itself would be refused.
  plan = ["plan", "--config=seed", "--deployment=single", "--devices=8", "--batch=8",
          "--prompt_len=16", "--max_new_tokens=16", "--device_kind=cpu"]
  # On 16 devices with overrides: the plan named resolves the same deployment, buffers too.
  ep = ["--config=seed", "--deployment=proposed", "--capacity_factor=2.0", "--nodropless",
        "--batch=16"]
  plan_ep = ["plan", *ep[:-1], "--devices=16", "--batch=16", "--prompt_len=16",
             "--max_new_tokens=16", "--device_kind=cpu"]
  dry, real, planned, rounded, untimed, huge = run_cases([
      ["generate", "--config=seed", "--deployment=single", "--dry_run",
       f"--output={tmp_path / 'dry.json'}", f"--profile_dir={tmp_path / 'profile'}"],
      ["generate", "--config=seed", "--deployment=single"], plan,
      ["generate", "--simulate_devices=8", "--deployment=proposed", "--decode_groups=3",
       "--dry_run"],
      ["generate", "--simulate_devices=8", "--deployment=single", "--batch=8",
       "--max_new_tokens=2", f"--output={tmp_path / 'two.json'}"],
      ["generate", "--simulate_devices=8", "--deployment=single", f"--batch={2**32}",
       "--dry_run"]])
  # (16 devices: an interpreter of its own, whose first case sets its device count.)
  real_ep, planned_ep = run_cases([["generate", "--simulate_devices=16", *ep], plan_ep])
  # Two new tokens are the prefill's and the ring's fill: no step to time, said so (not
  # nan), and null in the JSON (json.loads refuses a bare NaN only with parse_constant).
  assert untimed["rc"] == 0 and "give 3 or more to time a decode step" in untimed["stdout"]
  two = json.loads((tmp_path / "two.json").read_text(),
                   parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
  assert two["tpot_ms"] is None and two["tps"] is None and len(two["tokens"][0]) == 2
  # No --batch: the least batch of at least 8 that 4 micro-batches and 3 groups over an
  # expert axis of 2 split, said where it is not 8.
  assert rounded["rc"] == 0 and "--batch not given: 24, the least batch" in rounded["stderr"]
  # A dry run that fits says what it was checked against.
  assert re.search(r"memory: .* available on this host .*: fits\.", rounded["stdout"])
  assert "--batch not given" not in dry["stderr"]
  # A dry run builds no prompts, so a batch no host holds gets its layout and verdict too.
  assert huge["rc"] == 1, huge["stderr"][-2000:]  # refused: plan's status
  assert f"with batch {2**32} needs" in huge["stdout"] and "would be refused here" in huge["stdout"]
  assert dry["rc"] == 1, dry["stderr"][-2000:]
  assert ("--output and --profile_dir are without effect with --dry_run: it runs no step, so "
          "it writes nothing.") in dry["stderr"]
  assert not (tmp_path / "dry.json").exists() and not (tmp_path / "profile").exists()
  assert "layers/4  experts/16" in dry["stdout"] and "compiling" not in dry["stdout"]
  # It says that the run itself would be refused, and why.
  assert "memory: the run itself would be refused here: " in dry["stdout"]
  assert "does not fit" in dry["stdout"]
  assert real["rc"] == 2 and "does not fit" in real["stderr"]
  # The refusal names the plan of this same run, and that plan finds the same bytes.
  assert f"`jax-ep {' '.join(plan)}` prints the table" in real["stderr"], real["stderr"]
  need = real["stderr"].split(" needs ")[1].split(" GiB")[0]
  assert planned["rc"] == 1 and f"needs {need} GiB" in planned["stdout"], planned["stdout"]
  assert real_ep["rc"] == 2 and f"`jax-ep {' '.join(plan_ep)}` prints the table" in real_ep[
      "stderr"], real_ep["stderr"]
  need = real_ep["stderr"].split(" needs ")[1].split(" GiB")[0]
  assert planned_ep["rc"] == 1 and f"needs {need} GiB" in planned_ep["stdout"], planned_ep[
      "stdout"]



@pytest.mark.parametrize("mine,others,raised", [
    (None, ["fits"], None),  # all fit: go on
    ("process 0 needs 9 GiB", ["does not fit"], "process 0 needs 9 GiB"),  # all refuse: own
    ("process 0 needs 9 GiB", ["fits"], "process 0 needs 9 GiB"),  # only me: my reason
    (None, ["does not fit"], '"does not fit" on process 1'),  # another: who, what to do
])
def test_processes_agree_on_the_memory_verdict_before_any_waits_for_another(
    monkeypatch, mine, others, raised):
  """Each process checks its own devices' free memory; a refusal on one must not leave the
  others waiting out the timeout for it at the next exchange."""
  from jax_ep import distributed
  from jax_ep.cli import generate
  from jax_ep.config import ConfigError

  def check_same(what, values, timeout_s, hint):
    everyone = {0: values, **{p: {"memory": v} for p, v in enumerate(others, 1)}}
    problem = distributed.differences(everyone, what, hint)
    if problem:
      raise ConfigError(problem)

  monkeypatch.setattr(distributed, "check_same", check_same)
  refusal = ConfigError(mine) if mine else None
  if raised is None:
    generate.agree_on_memory(refusal, 5)
    return
  with pytest.raises(ConfigError) as e:
    generate.agree_on_memory(refusal, 5)
  assert raised in str(e.value)
  if mine is None:
    assert "free memory on the devices of the processes that refused" in str(e.value)
    assert "same flags" not in str(e.value)
