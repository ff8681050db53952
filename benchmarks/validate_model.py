"""Calibrates the performance model on the 1-GPU runs and checks it on the held-out 2-GPU runs.

    python benchmarks/validate_model.py [--fit=JSON] [--check=JSON] [--out=MD]
"""

from absl import app, flags

from jax_ep.perf.calibrate import calibrate, format_validation, validate

_FIT = flags.DEFINE_string("fit", "benchmarks/results/h200x1/seed_table.json",
                           "bench JSON whose runs calibrate the model")
_CHECK = flags.DEFINE_string("check", "benchmarks/results/h200x2/seed_table.json",
                             "bench JSON whose runs the calibrated model must predict")
_OUT = flags.DEFINE_string("out", "benchmarks/results/model_validation.md", "report (markdown)")


def main(argv):
  del argv
  eff = calibrate(_FIT.value)
  fit, check = validate(_FIT.value, eff), validate(_CHECK.value, eff)
  worst = max(abs(r["ratio"] - 1) for r in check)
  text = "\n".join([
      f"# Performance model: calibrated on {_FIT.value}, checked on {_CHECK.value}", "",
      f"Fitted efficiency: {eff.describe()}", "", "## Calibration runs", "",
      format_validation(fit), "", "## Held-out runs", "", format_validation(check), "",
      f"Worst held-out error: {100 * worst:.1f}% (target: within 15%).", ""])
  print(text)
  with open(_OUT.value, "w") as f:
    f.write(text)


if __name__ == "__main__":
  app.run(main)
