"""The job file: strict validation with every bad field named by its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import config_from_yaml, json_schema, load_config, parse_config
from supervisor.errors import ConfigError

MINIMAL = {"output_dir": "runs/x", "train": {}}


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_minimal_config_gets_documented_defaults() -> None:
    """output_dir + train: {} is a complete job with the documented defaults."""
    config = parse_config(MINIMAL)
    assert config.train is not None
    assert config.train.model == "builtin:tiny-gpt2"
    assert config.restart.max_restarts == 20
    assert config.restart.window == 3600
    assert config.retention.keep_last == 3
    assert config.preemption.grace == 120
    assert config.policy().require_record is True


def test_unknown_keys_are_named_with_their_path() -> None:
    """Typos anywhere are errors naming the full field path, all at once."""
    found = problems(
        {
            "output_dir": "x",
            "train": {"lora": {"rank": 8}, "modle": "gpt2"},
            "restart": {"max_restart": 3},
        }
    )
    assert "train.lora.rank: unknown key (check the spelling)" in found
    assert "train.modle: unknown key (check the spelling)" in found
    assert "restart.max_restart: unknown key (check the spelling)" in found


def test_wrong_types_are_named() -> None:
    """A wrong type names the field and what was expected."""
    found = problems({"output_dir": "x", "train": {}, "retention": {"keep_last": "many"}})
    assert any(p.startswith("retention.keep_last:") for p in found)


def test_durations_and_sizes_parse() -> None:
    """Durations take s/m/h, sizes take MB/GiB; auto stays auto."""
    config = parse_config(
        {
            **MINIMAL,
            "restart": {"window": "2h", "backoff_initial": "90s", "backoff_max": "5m"},
            "disk": {"reserve": "20GiB"},
            "hang": {"timeout": "auto", "startup_timeout": "30m"},
        }
    )
    assert config.restart.window == 7200
    assert config.restart.backoff_initial == 90
    assert config.restart.backoff_max == 300
    assert config.disk.reserve == 20 * 2**30
    assert config.policy().hang_timeout is None
    assert config.policy().startup_timeout == 1800


def test_bad_duration_says_how_to_write_one() -> None:
    """An unparsable duration explains the accepted forms."""
    found = problems({**MINIMAL, "restart": {"window": "an hour"}})
    assert any("restart.window" in p and "90s" in p for p in found)


def test_train_and_command_are_exclusive() -> None:
    """Exactly one of train: and command: must be given."""
    assert any("exactly one" in p for p in problems({"output_dir": "x"}))
    both = {"output_dir": "x", "train": {}, "command": ["python", "t.py"]}
    assert any("exactly one" in p for p in problems(both))


def test_save_total_limit_becomes_keep_last() -> None:
    """A user's sft.save_total_limit is honoured as retention.keep_last."""
    config = parse_config({"output_dir": "x", "train": {"sft": {"save_total_limit": 5}}})
    assert config.retention.keep_last == 5


def test_micro_batch_comes_from_sft_or_batch_section() -> None:
    """The OOM remediation knows the starting micro-batch for both job kinds."""
    built_in = parse_config(
        {"output_dir": "x", "train": {"sft": {"per_device_train_batch_size": 4}}}
    )
    assert built_in.policy().micro_batch == 4
    command = parse_config(
        {
            "output_dir": "x",
            "command": ["python", "train.py"],
            "batch": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2},
        }
    )
    assert command.policy().micro_batch == 16
    assert command.policy().grad_accum == 2
    assert command.policy().require_record is False


def test_bad_yaml_names_the_line() -> None:
    """Broken YAML is reported with its line and column."""
    with pytest.raises(ConfigError) as info:
        config_from_yaml("output_dir: x\ntrain: {model: [\n", source="job.yaml")
    assert "line" in info.value.problems[0]
    assert info.value.source == "job.yaml"


def test_missing_file_is_a_config_error() -> None:
    """A missing file is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(Path("/nonexistent/trainwarden-unit/nope.yaml"))


def test_schema_lists_the_sections() -> None:
    """The JSON Schema names every top-level section."""
    props = json_schema()["properties"]
    for key in ("output_dir", "train", "command", "restart", "retention", "disk", "hang"):
        assert key in props


def test_sizes_are_pydantic_byte_sizes() -> None:
    """disk.reserve takes bytes, decimal and binary units; nonsense names the field."""
    for text, expected in (("500MB", 500_000_000), ("1.5 KiB", 1536), (4096, 4096)):
        config = parse_config({**MINIMAL, "disk": {"reserve": text}})
        assert config.disk.reserve == expected
        assert config.policy().disk_reserve == expected
    assert any(
        p.startswith("disk.reserve:") for p in problems({**MINIMAL, "disk": {"reserve": "lots"}})
    )


def _readme_defaults() -> dict[str, str]:
    """``key -> default`` from the README's configuration table, ``a / b`` rows split."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    found: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        keys = [k.strip().strip("`") for k in cells[0].split(" / ")]
        defaults = [d.strip().strip("`") for d in cells[1].split(" / ")]
        parent = keys[0].rpartition(".")[0]
        for index, key in enumerate(keys):
            full = key if "." in key or not parent else f"{parent}.{key}"
            found[full] = defaults[index] if len(defaults) == len(keys) else cells[1]
    return found


def _documented(text: str) -> object:
    """Turn a README default into the value the config would hold."""
    from supervisor.config import parse_duration

    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    if text == "{}":
        return {}
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text != "auto" and text[:1].isdigit():
        return parse_duration(text)
    return text


def test_readme_configuration_table_states_the_real_defaults() -> None:
    """Every default in the README's table is the one config.py (their one home) applies."""
    from supervisor.config import MirrorConfig
    from trainer_child.protocol import TrainSpec

    config = parse_config({"output_dir": "x", "train": {}})
    sections: dict[str, object] = {
        "train": TrainSpec(),
        "batch": config.batch,
        "mirror": MirrorConfig(url="file:///nonexistent/mirror"),
    }
    checked = 0
    for key, text in _readme_defaults().items():
        if text in ("required", "\u2013", "-"):  # an en dash: no default
            continue
        head, *rest = key.split(".")
        value: object = sections.get(head, config)
        for part in ([] if head in sections else [head]) + rest:
            value = getattr(value, part)
        assert value == _documented(text), f"README says {key} defaults to {text!r}"
        checked += 1
    assert checked >= 20
