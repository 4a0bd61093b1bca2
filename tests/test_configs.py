"""The shipped config files: each variant loads, validates, and fits the meshes it names."""

import re

import pytest

from configs import ip2p_magicbrush, shapes
from rl4pix_jax import config_validation as cv
from tests.helpers.paths import REPO_ROOT


@pytest.mark.parametrize("arg", ["", "lora", "full", "lora,512", "full,512", "full, 256"])
def test_ip2p_magicbrush_variants_validate(arg):
  config = ip2p_magicbrush.get_config(arg)
  cv.validate_run_config(config)
  trainable, resolution = ip2p_magicbrush.parse_arg(arg)
  assert config.ppo.trainable == trainable and config.resolution == resolution
  assert config.model.pretrained and config.reward.clip_model
  assert config.data.dataset == "magicbrush" and config.model.dtype == "bfloat16"
  assert config.sampler.capture_size == resolution // 16
  # v4-8 (4 chips), v5e-8 (8 chips) and a 4-host v4-32 (16 chips, 4 processes).
  for devices, processes in ((4, 1), (8, 1), (16, 4)):
    assert config.mesh.fsdp <= devices and devices % config.mesh.fsdp == 0
    cv.checked_batch_arithmetic(config, devices, processes)


def test_ip2p_magicbrush_overrides_shapes_and_declares_nothing_new():
  """Derived, not copied: the same keys as shapes.py, every one of its types kept."""
  base, real = shapes.get_config("rl"), ip2p_magicbrush.get_config("full")

  def flat(config, prefix=""):
    out = {}
    for key, value in config.items():
      if hasattr(value, "items") and not isinstance(value, dict):
        out.update(flat(value, f"{prefix}{key}."))
      else:
        out[prefix + key] = value
    return out

  assert flat(base).keys() == flat(real).keys()
  assert real.ppo.trainable == "full" and real.model.remat and real.mesh.fsdp == 4


@pytest.mark.parametrize("arg", ["half", "lora,384", "lora,512,x", "512"])
def test_ip2p_magicbrush_bad_arg_names_the_choices(arg):
  with pytest.raises(ValueError, match="expected one of lora, full"):
    ip2p_magicbrush.get_config(arg)


@pytest.mark.parametrize("script", ["launch/tpu/tpu_vm.sh", "launch/gpu/train_single_host.sh",
                                    "launch/gpu/train_slurm.sbatch"])
def test_launch_scripts_default_config_exists(script):
  with open(f"{REPO_ROOT}/{script}", encoding="utf-8") as f:
    default = re.search(r'CONFIG="\$\{CONFIG:-([^}]+)\}"', f.read()).group(1)
  assert default == "configs/ip2p_magicbrush.py"
  assert ip2p_magicbrush.__file__.endswith(default)


def test_shapes_long_is_the_rl_stage_with_the_long_recipe():
  long, base = shapes.get_config("long"), shapes.get_config()
  assert long.stage == base.stage == "rl"
  for path, value in shapes.LONG_RECIPE.items():
    section, field = path.split(".")
    got = long[section][field]
    assert (got.to_dict() if hasattr(got, "to_dict") else got) == value, path
  changed = {f"{s}.{f}" for s in base.keys() if hasattr(base[s], "keys")
             for f in base[s].keys() if long[s][f] != base[s][f]}
  assert changed == set(shapes.LONG_RECIPE)  # nothing else differs
  cv.validate_run_config(long)
  with pytest.raises(ValueError, match="expected one of"):
    shapes.get_config("lnog")
