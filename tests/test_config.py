import pytest

from automl_compress.config import (
    Config,
    dump_config,
    load_config,
    parse_pattern,
)
from automl_compress.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("env:\n  budget_bits: 3\nmenu:\n  bits: [0, 4, 8]\n")
    cfg = load_config(f, ["solver.quant=gptq", "capture.exclude=[fc]"])
    assert cfg.env.budget_bits == 3.0
    assert cfg.menu.bits == (0, 4, 8)
    assert cfg.solver.quant == "gptq"
    assert cfg.capture.exclude == ("fc",)
    assert cfg.task == Config().task


def test_budget_draw_is_gap_unless_set():
    assert Config().env.budget_draw == "gap"
    assert load_config(None, ["env.budget_draw=uniform"]).env.budget_draw == "uniform"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["env.budget_bits=2.5", "seed=7"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("env.budgt_bits=3", "did you mean 'budget_bits'"),
        ("solver.quant=foo", "solver.quant"),
        ("menu.bits=[1, 4]", "0 or 2..8"),
        ("env.budget_bits=abc", "must be a number"),
        ("device=tpu", "device"),
        ("menu.patterns=[dense, 3:2]", "N:M"),
        ("eval.bn_reestimate=sometimes", "eval.bn_reestimate must be one of"),
        ("eval.bn_reestimate=sometimes", "or on/off"),
        ("eval.bias_correction=maybe", "must be true or false"),
        ("solver.quant=off", "found 'off'"),
        ("solver.fast_carry=-1", "solver.fast_carry must be an int >= 0"),
        ("env.budget_draw=worst", "env.budget_draw must be one of"),
        ("env.budget_draw=worst", "found 'worst'"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "word, mode",
    [("off", "off"), ("no", "off"), ("false", "off"), ("Off", "off"), ("'off'", "off"),
     ("on", "relative"), ("yes", "relative"), ("true", "relative"), ("reset", "reset")],
)
def test_yaml_switch_words_are_accepted_where_a_string_choice_is_expected(tmp_path, word, mode):
    # YAML reads off/on/yes/no/true/false as booleans: both from --set and from a file
    assert load_config(None, [f"eval.bn_reestimate={word}"]).eval.bn_reestimate == mode
    f = tmp_path / "c.yaml"
    f.write_text(f"eval:\n  bn_reestimate: {word}\n")
    assert load_config(f).eval.bn_reestimate == mode


@pytest.mark.parametrize("word, value", [("off", False), ("'no'", False), ("'on'", True),
                                         ("true", True), ("'YES'", True)])
def test_boolean_fields_accept_the_same_words_quoted(word, value):
    assert load_config(None, [f"eval.bias_correction={word}"]).eval.bias_correction is value


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("env: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


def test_parse_pattern():
    assert parse_pattern("dense") == ("dense", None)
    assert parse_pattern("2:4") == ("nm", (2, 4))
    assert parse_pattern("75%") == ("unstructured", 0.75)
    for bad in ("4:2", "0%", "100%", "sparse"):
        with pytest.raises(ConfigError):
            parse_pattern(bad)
