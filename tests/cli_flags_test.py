"""Tests for jax_ep/cli/flags.py: library messages name the flags that set the fields."""

from absl import flags

from jax_ep.cli.flags import FLAG_OF_FIELD, flag_message


def test_config_fields_are_written_as_the_flags_that_set_them():
  assert flag_message("DeploymentConfig.expert=0 must be a positive integer.") == (
      "--expert_axis=0 must be a positive integer.")
  assert flag_message("mlp_dim=24 is not divisible by tp=5.") == (
      "mlp_dim=24 is not divisible by --tp=5.")
  assert flag_message("batch=6 is not divisible by 4 (expert x groups)") == (
      "--batch=6 is not divisible by 4 (expert x groups)")
  # Fields a deployment's description names, and other configs' fields, are kept.
  kept = ["stage 2 x expert 2 (placement=tp, microbatches=2)",
          "ModelConfig.head_dim=3 must be even"]
  assert [flag_message(m) for m in kept] == kept
  assert all(name in flags.FLAGS for name in FLAG_OF_FIELD.values())  # each one a real flag


def test_expert_blocks_that_no_kernel_reads_get_a_note(capsys):
  from jax_ep.cli import flags as cli_flags
  from jax_ep.config import DeploymentConfig

  flags.FLAGS.unparse_flags()
  flags.FLAGS(["jax-ep", "--expert_blocks=up.tail_m=16"])
  try:
    cli_flags.note_unread_expert_blocks(DeploymentConfig(), "cpu")
    assert "--expert_blocks=up.tail_m=16 is without effect" in capsys.readouterr().err
    for dep, backend in ((DeploymentConfig(), "gpu"), (DeploymentConfig(kernels="interpret"),
                                                        "cpu")):
      cli_flags.note_unread_expert_blocks(dep, backend)
      assert capsys.readouterr().err == ""
  finally:
    flags.FLAGS.unparse_flags()
