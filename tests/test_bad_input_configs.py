"""The bad-config corpus (`tests/bad_inputs/configs/`): every mistake stops the CLI before it
writes anything, with exit code 2 and one error line naming the file, the line and the field (or, for a
model reference that cannot be used, the field and the reference)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from almost_ray.cli import main
from almost_ray.config import Config, load_config
from almost_ray.config_base import ConfigError

CORPUS_DIR = Path(__file__).resolve().parent / "bad_inputs" / "configs"
CORPUS = sorted(CORPUS_DIR.glob("*.yaml"))
CONFIG_ERROR = re.compile(r"^\d+: ")  # `<line>: <field>: ...`: found when the config is read


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <error>'"
    return first.removeprefix("# expect: ")


def test_the_corpus_is_there():
    assert len(CORPUS) >= 25


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_config_exits_2_with_one_error_naming_file_line_and_field(path, tmp_path, monkeypatch, capsys):
    """Config mistakes name `<file>:<line>: <field>`; a bad model reference (found when the stage starts,
    relative paths resolved from `files/`) names the field and the reference. Either way: exit 2, one
    error line, and not one byte written."""
    cwd = tmp_path / "cwd"
    shutil.copytree(CORPUS_DIR / "files", cwd)
    monkeypatch.chdir(cwd)  # a stage that ran anyway would write runs/ here
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n")
    before = snapshot(tmp_path)
    output = tmp_path / "out" / "responses.jsonl"
    code = main(["generate", "-c", str(path), "--input", str(prompts), "--output", str(output)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    want = expected(path)
    if CONFIG_ERROR.match(want):
        assert err[0] == "almost-ray: config error:"
        assert len(err) == 2 and err[1].startswith(f"{path}:{want}"), err
    else:
        assert len(err) == 1 and err[0].startswith(f"almost-ray: error: {want}"), err
    assert snapshot(tmp_path) == before  # nothing written


@pytest.mark.parametrize("text", ["", "\n", "# nothing set yet\n"])
def test_an_empty_config_is_refused_and_no_config_is_the_defaults(tmp_path, text):
    """A config file that sets nothing would run every stage on the defaults unnoticed (a truncated copy, a
    wrong file): it is an error naming the file; running with no --config at all is the defaults."""
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: empty config \(no sections\)"):
        load_config(path)
    assert load_config(None) == Config()


def test_a_config_that_is_a_folder_unreadable_or_not_utf8_names_the_file(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: a folder, not a config file$"):
        load_config(tmp_path)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("run_name: demo\nreport:\n  seed_queries: caf\xe9.txt\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{latin}:3: not valid UTF-8"):
        load_config(latin)
    locked = tmp_path / "locked.yaml"
    locked.write_text("run_name: demo\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads any file: a refused read, as a user meets it
    with pytest.raises(ConfigError, match=rf"^{locked}: cannot read the config file \(Permission denied\)$"):
        load_config(locked)


def test_duplicate_keys_are_found_at_any_depth_and_anchors_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "compare:\n  ladder:\n    - {name: a, model: &m {ref: tiny:llama}}\n"
        "    - {name: b, model: *m, shots: 1, shots: 2}\n"
    )
    with pytest.raises(ConfigError, match=rf"{path}:4: compare\.ladder\.1\.shots: duplicate key \(first at line 4\)"):
        load_config(path)
    path.write_text("compare:\n  ladder:\n    - {name: a, model: &m {ref: tiny:llama}}\n    - {name: b, model: *m}\n")
    cfg = load_config(path)
    assert cfg.compare.ladder[1].model.ref == "tiny:llama"
