"""The README stays true: CI runs its test command, and its table names every setting."""

from __future__ import annotations

import re
from pathlib import Path

import pydantic
import pytest

from sparrow.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "torch==2.13.0" in ci
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    assert ci in blocks, "the README's test command and .ci/run differ"


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        variable = str(field.validation_alias or f"SPARROW_{name.upper()}")
        assert re.search(rf"`{variable}[`=]", readme), f"{variable} is not documented in the README"


def test_mock_alias_selects_the_mock_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CF_MUSICGEN_MOCK", "1")
    assert Settings().engine == "mock"
    monkeypatch.delenv("CF_MUSICGEN_MOCK")
    monkeypatch.setenv("SPARROW_ENGINE", "mock")
    assert Settings().engine == "mock"
    monkeypatch.setenv("SPARROW_ENGINE", "tensorflow")
    with pytest.raises(pydantic.ValidationError):
        Settings()


def test_a_wildcard_mixed_into_a_cors_list_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings(cors_origins="*, https://editor.example")
    assert Settings(cors_origins="*").cors_origin_list == ["*"]
