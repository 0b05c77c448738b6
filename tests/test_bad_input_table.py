"""Malformed values for every config field, every method hyper-parameter and every `ntkcl train` option.

Each case must exit 2 with one line on stderr (no traceback), leave no run folder, and fail before anything
runs: `start_run` and the process launcher are replaced by a tripwire for the whole table.

The cases are generated from the pydantic models' JSON schemas (the `RunConfig` sections and the `Params` of
every registered method) and from the train command's options, so a field, method or option added later is
covered without a line here: wrong types, values beyond each declared bound, NaN and infinity, integers
beyond 2**32 - 1, unknown choices and empty paths. Options that set no config field get hand-written cases
(a new one fails `test_every_train_option_has_cases` until it has some), and so does every case reported in
the issue that asked for this table.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest

from ntkcl._entry_points import METHODS_GROUP, entry_point_names
from ntkcl.cli import register_commands
from ntkcl.cli import train as train_cli
from ntkcl.config import RunConfig
from ntkcl.methods.registry import get_method
from tests.test_cli_bad_input import assert_one_line_error

HUGE = 2**64
# Probes of a wrong type, each with the JSON-schema types that would accept it in pydantic's lax mode.
WRONG_TYPE_PROBES = ("not-a-number", 1.5, [1], {"no_such_key": 1})
# A hang is a failure too: no case may take longer than this to be refused.
HANG_LIMIT_S = 30


def _resolve(schema: dict, definitions: dict) -> dict:
    reference = schema.get("$ref")
    return definitions[reference.rsplit("/", 1)[1]] if reference else schema


def _variants(schema: dict, definitions: dict) -> list[dict]:
    return [_resolve(variant, definitions) for variant in schema.get("anyOf", [schema])]


def _accepts(variant: dict, probe: object) -> bool:
    """Whether a schema variant would take `probe` (enough of pydantic's lax mode for the probes above)."""
    if "enum" in variant:
        return probe in variant["enum"]
    kind = variant.get("type")
    if kind is None:
        return True
    if isinstance(probe, str):
        return kind == "string"
    if isinstance(probe, float):
        return kind == "number"
    if isinstance(probe, list):
        return kind == "array"
    return kind == "object" and variant.get("additionalProperties", True) is not False


def _bound_violations(variant: dict) -> list[object]:
    """Values beyond the bounds a numeric variant declares, plus NaN, infinity and an oversize integer."""
    values: list[object] = []
    if variant.get("type") == "integer":
        values.append(HUGE)
    if variant.get("type") == "number":
        values += [math.nan, math.inf]
    if variant.get("type") in ("integer", "number"):
        if "minimum" in variant:
            values.append(variant["minimum"] - 1)
        if "exclusiveMinimum" in variant:
            values.append(variant["exclusiveMinimum"])
        if "maximum" in variant:
            values.append(variant["maximum"] + 1)
        if "exclusiveMaximum" in variant:
            values.append(variant["exclusiveMaximum"])
    return values


def malformed_values(schema: dict, definitions: dict) -> list[object]:
    """Values the field described by `schema` must refuse (empty for a field that takes anything)."""
    variants = _variants(schema, definitions)
    # One value of a wrong type is enough: pydantic checks types the same way for every field.
    values = [probe for probe in WRONG_TYPE_PROBES if not any(_accepts(v, probe) for v in variants)][:1]
    for variant in variants:
        values += _bound_violations(variant)
        if variant.get("type") == "string" and "enum" in variant:
            values.append("no-such-choice")
        if variant.get("format") == "path":
            values.append("")
        if "items" in variant:
            values += [[item] for item in malformed_values(variant["items"], definitions)[:3]]
        if "prefixItems" in variant:
            width = len(variant["prefixItems"])
            values += [[item] * width for item in malformed_values(variant["prefixItems"][0], definitions)[:3]]
    unique = []
    for value in values:
        if not any(json.dumps(value) == json.dumps(seen) for seen in unique):
            unique.append(value)
    return unique


def toml_literal(value: object) -> str:
    """`value` as `--set key=VALUE` writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    return "{" + ", ".join(f"{key} = {toml_literal(item)}" for key, item in value.items()) + "}"


def config_field_cases() -> list[tuple[str, str, str]]:
    """(key path, `--set` value, method) for every RunConfig field, section and method hyper-parameter."""
    schema = RunConfig.model_json_schema()
    definitions = schema.get("$defs", {})
    cases = []
    for section, section_schema in schema["properties"].items():
        cases += [(section, toml_literal(v), "ntk-cl") for v in malformed_values(section_schema, definitions)]
        for field, field_schema in _resolve(section_schema, definitions)["properties"].items():
            path = f"{section}.{field}"
            cases += [(path, toml_literal(v), "ntk-cl") for v in malformed_values(field_schema, definitions)]
    for method in entry_point_names(METHODS_GROUP):
        params = get_method(method).Params.model_json_schema()
        for field, field_schema in params.get("properties", {}).items():
            path = f"method.params.{field}"
            cases += [(path, toml_literal(v), method) for v in malformed_values(field_schema, params.get("$defs", {}))]
    return cases


def _train_options() -> dict[str, list[str]]:
    """Each value-taking option of `ntkcl train` by parameter name, with its spellings."""
    command = register_commands().commands["train"]
    return {param.name: param.opts for param in command.params if not param.is_flag}


def _field_schema(section: str, field: str) -> tuple[dict, dict]:
    schema = RunConfig.model_json_schema()
    definitions = schema["$defs"]
    return _resolve(schema["properties"][section], definitions)["properties"][field], definitions


def flag_cases() -> list[tuple[str, str]]:
    """(option, value) for the options that set a config field, from that field's schema.

    A field that takes text takes any probe as text, so only the probes of its own kind (an unknown choice,
    an empty path) apply; those fields get hand-written cases below.
    """
    cases = []
    options = _train_options()
    for name, (section, field) in train_cli.FLAG_FIELDS.items():
        if name not in options:  # an on/off switch such as --pretrained/--no-pretrained
            continue
        option = options[name][0]
        schema, definitions = _field_schema(section, field)
        takes_text = any(v.get("type") == "string" for v in _variants(schema, definitions))
        for value in malformed_values(schema, definitions):
            if isinstance(value, (list, dict)) or (takes_text and not isinstance(value, str)):
                continue
            cases.append((option, value if isinstance(value, str) else toml_literal(value)))
    return cases


# Options that set no config field, or set one that takes free text.
HAND_CASES = {
    "stream": [["--stream", "no-such-dataset"], ["--stream", "x" * 300]],
    "method": [["--method", "no-such-method"], ["--method", "x" * 300]],
    "backbone": [["--backbone", "no_such_model"], ["--backbone", "resnet18"]],
    "weights": [["--weights", "/etc/passwd"], ["--weights", "/no/such/weights.safetensors"]],
    "device": [["--device", d] for d in ("cuda", "cuda:0", "cuda:7", "cudax", "cuda:-1", "cuda:abc", "tpu", "")],
    "data_root": [["--data-root", d] for d in ("/etc/passwd", "/dev/null", "/proc/forbidden", "")],
    "config_file": [["--config", p] for p in ("/no/such/file.toml", "/etc/passwd", "/dev/null", "")],
    "assignments": [
        ["--set", s]
        for s in ("no-equals-sign", "=1", "a..b=1", "optim.no_such_field=1", "no_such_section.x=1", "optim.lr")
    ],
    "gpus": [["--gpus", g] for g in ("²", "x", "-1", "0,0", "", "99999999999999999999", "all")],
    "nproc": [["--nproc", n] for n in ("0", "-2", "x", "99999999999999999999")],
    "unset": [["--unset", key] for key in ("", "a..b", "optim.no_such_field", "optim.lr.x")],
    "out": [["--out", o] for o in ("/etc/passwd", "/etc/passwd/runs", "")],
    "resume": [["--resume", r] for r in ("/no/such/run", "/etc/passwd", "/tmp", "")],
    "seeds": [["--seeds", s] for s in ("x", "", "3-1", "0,,1", "-1", "99999999999999999999", "0-5000")],
    "group": [["--group", g] for g in ("a/b", "", "..")],
}

# Every case of the issue that asked for this table, as it was reported.
ISSUE_CASES = [
    ["--class-order-seed", "-1"],
    ["--class-order-seed", "4294967296"],
    ["--set", "stream.class_order_seed=-5"],
    ["--seed", "-1"],
    ["--batch-size", "99999999999999999999"],
    ["--set", "optim.batch_size=99999999999999999999"],
    ["--device", "cuda"],
    ["--device", "cuda:0"],
    ["--device", "cuda:7"],
    ["--device", "cudax"],
    ["--device", "cuda:-1"],
    ["--device", "cuda:abc"],
    ["--data-root", "/etc/passwd"],
    ["--data-root", "/dev/null"],
    ["--data-root", "/proc/forbidden"],
    ["--set", "stream.data_root=/proc/x"],
    ["--weights", "/etc/passwd"],
    ["--backbone", "resnet18"],
    ["--gpus", "²"],
    ["--method", "m" * 300],
    ["--set", "stream=5"],
    ["--set", "stream=[]"],
    ["--set", "method=ntk-cl"],
    ["--set", "method.name=5"],
    ["--set", 'stream.dataset=["digits"]'],
    ["--set", "optim.min_lr=inf"],
    ["--seed", str(2**64)],
    ["--seed", str(2**70)],
    ["--epochs", "99999999999999999999999"],
    ["--data-root", ""],
    ["--set", "method.params.alpha=nan"],
    ["--set", "method.params.gamma=nan"],
    ["--batch-size", "5000"],  # larger than any digits task: no step could be filled
]


# The cases reported after that: degenerate architectures, sizes no machine holds, dataset options, lax
# numbers and paths. (arguments, whether `--stream digits --method ntk-cl` is added, a fragment of the line)
SYNTHETIC = ["--stream", "synthetic", "--method", "simplecil", "--set"]
LATER_CASES = [
    (["--set", "backbone.model_kwargs.patch_size=0"], True, "backbone.model_kwargs.patch_size"),
    (["--set", "backbone.model_kwargs.num_heads=0"], True, "backbone.model_kwargs.num_heads"),
    (["--set", "backbone.model_kwargs={img_size=32, patch_size=7}"], True, "does not divide img_size 32"),
    (["--set", "backbone.model_kwargs.depth=1000000"], True, "backbone.model_kwargs.depth"),
    (["--set", "backbone.model_kwargs={embed_dim=65536, num_heads=1}"], True, "GiB of parameters"),
    (["--set", "backbone.model_kwargs.embed_dim=65"], True, "num_heads 3 does not divide embed_dim 65"),
    (["--set", "method.params.bottleneck=100000000"], True, "method.params.bottleneck=100000000"),
    (["--set", "method.params.num_prompts=1000000000"], True, "method.params.num_prompts=1000000000"),
    ([*SYNTHETIC, 'stream.dataset_options.classes="x"'], False, "stream.dataset_options.classes"),
    ([*SYNTHETIC, "stream.dataset_options.classes=1e9"], False, "stream.dataset_options.classes"),
    ([*SYNTHETIC, "stream.dataset_options.classes=1000000000"], False, "stream.dataset_options.classes"),
    ([*SYNTHETIC, "stream.dataset_options.seed=-1"], False, "stream.dataset_options.seed"),
    ([*SYNTHETIC, "stream.dataset_options.size=100000"], False, "stream.dataset_options.size"),
    ([*SYNTHETIC, "stream.dataset_options.classes=true"], False, "stream.dataset_options.classes"),
    (["--set", "optim.epochs=true"], True, "optim.epochs"),
    (["--set", 'optim.epochs="2"'], True, "optim.epochs"),
    (["--set", 'optim.lr="0.1"'], True, "optim.lr"),
    (["--weights", "/proc/self/mem"], True, "cannot be read"),
    (["--out", "~nonexistentuser/x"], True, "~nonexistentuser"),
    (["--data-root", "~nonexistentuser/x"], True, "~nonexistentuser"),
]


class ReachedTheRun(BaseException):
    """Raised by the tripwire: a case got past validation (a BaseException, so the CLI cannot map it)."""


@pytest.fixture
def refuse(cli, data_root, tmp_path, monkeypatch):
    """Run `ntkcl train -s digits ARGS --out DIR`; assert it was refused as bad input before anything ran."""
    import ntkcl.engine.launch
    import ntkcl.engine.loop

    def tripwire(*args, **kwargs):
        raise ReachedTheRun("validation passed and the run started")

    monkeypatch.setattr(ntkcl.engine.loop, "start_run", tripwire)
    monkeypatch.setattr(ntkcl.engine.launch, "_spawn", tripwire)
    out = tmp_path / "runs"

    def hang(signum, frame):
        raise ReachedTheRun(f"not refused within {HANG_LIMIT_S} s")

    def run(*args: str, method: str = "ntk-cl", new_run: bool = True) -> str:
        """`new_run` adds `--stream digits --method METHOD`; `--out DIR` is added unless ARGS give one."""
        command = ["train", *(["--stream", "digits", "--method", method] if new_run else []), *args]
        if "--out" not in args:
            command += ["--out", out]
        previous = signal.signal(signal.SIGALRM, hang)
        signal.alarm(HANG_LIMIT_S)
        try:
            result = cli(*command)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        assert_one_line_error(result)
        assert not out.exists(), f"a run folder was created: {list(out.iterdir())}"
        return result.err.strip()

    return run


@pytest.mark.parametrize(("path", "value", "method"), config_field_cases())
def test_malformed_config_values(refuse, path, value, method):
    line = refuse("--set", f"{path}={value}", method=method)
    if path.startswith("method.params."):  # NaN and huge numbers are caught on the raw params table already
        assert "method.params" in line and path.rsplit(".", 1)[1] in line, line
    else:
        assert path in line, line


@pytest.mark.parametrize(("option", "value"), flag_cases())
def test_malformed_option_values(refuse, option, value):
    refuse(option, value)


@pytest.mark.parametrize(("name", "args"), [(name, case) for name, cases in HAND_CASES.items() for case in cases])
def test_malformed_other_options(refuse, name, args):
    refuse(*args, new_run=name != "resume")


@pytest.mark.parametrize("args", ISSUE_CASES)
def test_reported_cases(refuse, args):
    refuse(*args)


@pytest.mark.parametrize(("args", "new_run", "fragment"), LATER_CASES)
def test_later_reported_cases(refuse, args, new_run, fragment):
    assert fragment in refuse(*args, new_run=new_run)


def test_yaml_yes_is_not_a_number(refuse, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  epochs: yes\n")
    assert "optim.epochs" in refuse("--config", config)


@pytest.mark.parametrize(
    "command",
    [
        ("prepare", "digits", "--data-root", "/proc/forbidden"),
        ("prepare", "digits", "--data-root", "/etc/passwd"),
        ("eval", "~nonexistentuser/x"),
        ("export", "~nonexistentuser/x"),
    ],
)
def test_paths_of_other_commands(cli, command):
    assert_one_line_error(cli(*command))


def test_every_train_option_has_cases():
    flagged = {option for option, _ in flag_cases()}
    for name, spellings in _train_options().items():
        assert spellings[0] in flagged or HAND_CASES.get(name), f"ntkcl train {spellings[0]} has no bad-input case"


def test_every_field_and_parameter_has_cases():
    covered = {path for path, _, _ in config_field_cases()}
    schema = RunConfig.model_json_schema()
    for section, section_schema in schema["properties"].items():
        fields = _resolve(section_schema, schema["$defs"])["properties"]
        for field, field_schema in fields.items():
            takes_anything = not malformed_values(field_schema, schema["$defs"])
            assert f"{section}.{field}" in covered or takes_anything, f"{section}.{field} has no case"
    assert any(path.startswith("method.params.") for path in covered)


def test_as_a_process_with_json(tmp_path):
    """The real entry point: exit status 2, the JSON error on stdout, one line on stderr, no traceback."""
    command = [sys.executable, "-m", "ntkcl", "train", "--json", "--set", "optim.min_lr=inf", "--out", tmp_path]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert json.loads(result.stdout) == {"ok": False, "error": result.stderr.strip()[7:], "exit_code": 2}
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "cudax", "tpu"])
def test_eval_of_an_export_checks_its_device_like_train(device, monkeypatch):
    import torch

    from ntkcl.errors import BadInputError
    from ntkcl.export.pretrained import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BadInputError, match="--device"):
        resolve_device(device)


def test_warnings_show_once_the_input_passes_and_never_beside_a_refusal(capsys):
    """A refused command prints its one error line only, even where resolving the config warned."""
    import logging

    from ntkcl.cli import _common
    from ntkcl.errors import BadInputError

    _common.route_warnings()
    logger = logging.getLogger("ntkcl.presets")
    with _common.warnings_after_checks():
        logger.warning("kept for later")
        assert "kept for later" not in capsys.readouterr().err
    assert capsys.readouterr().err.strip() == "warning: kept for later"
    with pytest.raises(BadInputError), _common.warnings_after_checks():
        logger.warning("about a refused command")
        raise BadInputError("refused")
    assert capsys.readouterr().err == ""
