"""Flags declared beside the config fields (qjax.core.options) -> argparse (qjax.cli.options)."""
import dataclasses

import pytest

from qjax.cli import common, options
from qjax.cli import quantize as quantize_cli
from qjax.core.errors import InputError
from qjax.core.options import Flag, flags, option
from qjax.methods import registry
from qjax.methods.weights.gptq import GPTQConfig
from qjax.methods.weights.spqr import SpQRConfig


def _parse(argv):
  parser = quantize_cli.build_parser()
  args = parser.parse_args(argv)
  return args, common.given_flags(parser, argv, args)


@pytest.mark.parametrize("name", sorted(registry.methods()))
def test_no_flags_give_the_config_defaults(name):
  args, given = _parse(["--method", name])
  assert options.build(registry.methods()[name].config_type, args, given) == registry.methods()[name].config_type()


def test_every_declared_flag_is_parsed():
  parsed = vars(_parse([])[0])
  for m in [*registry.methods().values(), *registry.kv_methods().values()]:
    for field, fl in flags(m.config_type).items():
      assert fl.dest in parsed, (m.name, field)  # external ones too: another part of the CLI declares them


def test_given_flags_set_fields_and_others_keep_defaults():
  args, given = _parse(["--method", "spqr", "--wbits", "4", "--no-sym", "--outlier-threshold", "0.5"])
  assert options.build(SpQRConfig, args, given) == SpQRConfig(bits=4, sym=False, outlier_threshold=0.5)
  args, given = _parse(["--method", "gptq", "--groupsize", "32", "--no-act-order"])
  cfg = options.build(GPTQConfig, args, given)
  assert (cfg.act_order, cfg.static_groups, cfg.group_size) == (False, False, 32)
  args, given = _parse(["--kv-method", "kvquant", "--kv-uniform", "--kv-bits", "3"])
  cfg = options.build(registry.kv_methods()["kvquant"].config_type, args, given)
  assert (cfg.nuq, cfg.bits) == (False, 3)


def test_build_error_names_the_flags_given():
  args, given = _parse(["--method", "rtn", "--wbits", "9"])
  with pytest.raises(InputError, match=r"got 9 \(given: --wbits 9\)"):
    options.build(registry.methods()["rtn"].config_type, args, given)


def test_scopes_follow_the_declarations():
  configs = {n: m.config_type for n, m in registry.methods().items()}
  scopes = {d[0]: (applies, needs) for d, applies, needs in options.scopes(configs, "rtn", None, "--method")}
  assert scopes["wbits"][0] and not scopes["act_order"][0]
  assert scopes["act_order"][1] == "--method gptq or spqr"
  zq = registry.methods()["zeroquant"].config_type
  on = {d[0]: a for d, a, _ in options.scopes(configs, "zeroquant", zq(lkd=True), "--method")}
  off = {d[0]: a for d, a, _ in options.scopes(configs, "zeroquant", zq(), "--method")}
  assert on["lkd_steps"] and not off["lkd_steps"] and off["zq_lkd"]


def test_help_lists_each_methods_default():
  text = quantize_cli.build_parser().format_help()
  assert "spqr 3" in " ".join(text.split())  # --wbits: SpQR's own default differs
  assert "gptq on, spqr off" in " ".join(text.split())  # --act-order


def test_one_spelling_one_declaration():
  @dataclasses.dataclass(frozen=True)
  class A:
    x: int = option(1, Flag("--x", "one"))

  @dataclasses.dataclass(frozen=True)
  class B:
    y: int = option(2, Flag("--x", "another"))

  import argparse
  with pytest.raises(ValueError, match="declared twice"):
    options.add_flags(argparse.ArgumentParser(), {"a": A, "b": B}, "--m")


def test_gptq_static_groups_default_follows_act_order_and_groups():
  assert GPTQConfig(group_size=32).static_groups
  assert not GPTQConfig(group_size=32, act_order=False).static_groups
  assert not GPTQConfig().static_groups
  assert not GPTQConfig(group_size=32, static_groups=False).static_groups


def test_a_nested_train_config_takes_its_flags():
  from qjax.methods.qat.peqa import PEQAConfig
  args, given = _parse(["--method", "peqa", "--train-steps", "7", "--train-lr", "0.01", "--seed", "3"])
  cfg = options.build(PEQAConfig, args, given)
  assert cfg == PEQAConfig(train=dataclasses.replace(PEQAConfig().train, steps=7, lr=0.01, seed=3))
  args, given = _parse(["--method", "peqa", "--train-steps", "0"])
  with pytest.raises(InputError, match=r"steps must be a positive integer, got 0 \(given: --train-steps 0\)"):
    options.build(PEQAConfig, args, given)
