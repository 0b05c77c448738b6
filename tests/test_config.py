"""Configuration layering (defaults < stream preset < method preset < file < flags) and validation."""

import pytest

from ntkcl.config import RunConfig, parse_assignment, read_config_file
from ntkcl.errors import BadInputError
from ntkcl.presets import resolve_config


def test_defaults_then_stream_and_method_presets():
    config = resolve_config(overrides={"stream": {"dataset": "digits"}, "method": {"name": "finetune"}})
    assert config.backbone.name == "ntkcl-tiny-fdsl" and config.backbone.pretrained  # streams.toml[digits]
    assert config.stream.augment == "resize"
    assert config.optim.lr == pytest.approx(0.05)  # finetune.toml[digits]
    assert config.optim.batch_size == 32


def test_method_default_table_applies_to_unlisted_streams():
    config = resolve_config(overrides={"stream": {"dataset": "synthetic"}, "method": {"name": "finetune"}})
    assert config.optim.lr == pytest.approx(0.01)


def test_file_overrides_presets_and_flags_override_file(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('[method]\nname = "finetune"\n[optim]\nlr = 0.2\nepochs = 3\n[stream]\ndataset = "digits"\n')
    config = resolve_config(file, {"optim": {"epochs": 7}})
    assert config.optim.lr == pytest.approx(0.2)
    assert config.optim.epochs == 7


def test_yaml_config_file(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("method:\n  name: simplecil\nruntime:\n  seed: 11\n")
    assert resolve_config(file).runtime.seed == 11


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"optim": {"epochs": -1}}, "optim.epochs"),
        ({"optim": {"lr": 0}}, "optim.lr"),
        ({"stream": {"augment": "fancy"}}, "stream.augment"),
        ({"runtime": {"device": "tpu"}}, "runtime.device"),
        ({"optim": {"learning_rate": 1}}, "optim.learning_rate"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(BadInputError, match=field.replace(".", r"\.")):
        resolve_config(overrides=overrides)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        read_config_file(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[optim\nlr = ")
    with pytest.raises(BadInputError, match="cannot be parsed"):
        read_config_file(broken)
    wrong_kind = tmp_path / "list.yaml"
    wrong_kind.write_text("- 1\n- 2\n")
    with pytest.raises(BadInputError, match="mapping"):
        read_config_file(wrong_kind)


def test_set_assignments_parse_values():
    assert parse_assignment("optim.lr=0.5") == {"optim": {"lr": 0.5}}
    assert parse_assignment("stream.class_order=[2, 0, 1]") == {"stream": {"class_order": [2, 0, 1]}}
    assert parse_assignment("backbone.pretrained=false") == {"backbone": {"pretrained": False}}
    assert parse_assignment("stream.dataset=digits") == {"stream": {"dataset": "digits"}}
    with pytest.raises(BadInputError):
        parse_assignment("no-equals-sign")


def test_round_trip_through_json():
    config = RunConfig()
    assert RunConfig.model_validate_json(config.model_dump_json()) == config
