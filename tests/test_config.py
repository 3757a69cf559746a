"""Config: errors name the file, line and field; overrides; every shipped config loads."""

from pathlib import Path

import pytest

from almost_ray.cli import main
from almost_ray.config import Config, load_config
from almost_ray.config_base import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    assert load_config(None) == Config()


def test_unknown_key_names_file_line_and_field(tmp_path):
    path = write(tmp_path, "generate:\n  sampling:\n    temprature: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:3: generate.sampling.temprature: unknown key"


def test_wrong_type_names_the_field_and_value(tmp_path):
    path = write(tmp_path, "run_name: x\ngenerate:\n  resources:\n    concurrency: two\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4: generate.resources.concurrency:")
    assert "'two'" in message


def test_out_of_range_value_is_rejected(tmp_path):
    path = write(tmp_path, "generate:\n  sampling:\n    top_p: 1.5\n")
    with pytest.raises(ConfigError, match=r"generate\.sampling\.top_p: Input should be less than or equal to 1"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    path = write(tmp_path, "generate: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path)


def test_dotted_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "generate:\n  sampling:\n    temperature: 1.0\n")
    cfg = load_config(path, ["generate.sampling.temperature=0", 'generate.sampling.stop=["\\nHuman:"]'])
    assert cfg.generate.sampling.temperature == 0
    assert cfg.generate.sampling.stop == ["\nHuman:"]
    with pytest.raises(ConfigError, match=r"--set generate\.sampling\.nope=1: generate\.sampling\.nope: unknown key"):
        load_config(path, ["generate.sampling.nope=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(path, ["generate.sampling.temperature"])


def test_cli_prints_one_clear_error_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, "generate:\n  model:\n    backend: tensorrt\n")
    assert main(["generate", "--config", str(path), "--input", "x", "--output", "y"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: generate.model.backend:" in err
    assert "'tensorrt'" in err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)
