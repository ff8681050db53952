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


def test_a_model_the_deployment_cannot_lay_out_names_the_presets_it_can():
  import pytest

  from jax_ep.cli import flags as cli_flags
  from jax_ep.config import ConfigError
  from jax_ep.presets import deployments, load_model

  e64 = deployments.PRESETS["seed_proposed_e64"]
  with pytest.raises(ConfigError) as err:
    cli_flags.check_model(load_model("tiny"), e64)  # 16 experts over an expert axis of 64
  assert str(err.value).endswith(
      "divides 16 (1, 2, 4, 8 or 16). Model presets this deployment takes: "
      "--config=seed_e64, tiny_e64.")
  cli_flags.check_model(load_model("tiny_e64"), e64)  # one it takes: no error
  with pytest.raises(ConfigError) as err:  # a checkpoint's model: no --config changes it
    cli_flags.check_model(load_model("tiny"), e64, checkpoint=True)
  assert "The checkpoint fixes the model: use a deployment that divides it" in str(err.value)
  assert "--config=" not in str(err.value)
  with pytest.raises(ConfigError) as err:  # 4 layers over 3 stages: no preset has 3k
    cli_flags.check_model(load_model("tiny"), deployments.mesh("mesh:3x1x1"))
  assert str(err.value).endswith("use stages=1, 2 or 4.")
