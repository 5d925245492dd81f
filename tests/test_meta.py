"""Every registered architecture and export back-end has a fixture and tests."""

from pathlib import Path

from tiny_models import BACKEND_TESTS, TINY_CONFIGS, TINY_TEXT_MODELS

from shortgpt_export.architectures import ARCHITECTURES, TEXT_MODELS
from shortgpt_export.converters import BACKENDS, get_converter


def test_every_architecture_has_a_tiny_model_fixture():
    assert set(TINY_CONFIGS) == set(ARCHITECTURES)
    assert set(TINY_TEXT_MODELS) == set(TEXT_MODELS)  # multimodal wrappers' text models


def test_every_backend_has_a_test_module():
    assert set(BACKEND_TESTS) == set(BACKENDS)
    here = Path(__file__).parent
    for name, module in BACKEND_TESTS.items():
        assert (here / module).is_file(), f"back-end {name} has no {module}"
        assert get_converter(name).name == name


ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed_under_our_namespace():
    """pyproject lists every package folder, converters/ as shortgpt_export.converters."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    config = tool["setuptools"]
    assert config["package-dir"] == {"shortgpt_export.converters": "converters"}
    found = set()
    for top, name in (
        ("shortgpt_export", "shortgpt_export"),
        ("converters", "shortgpt_export.converters"),
    ):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *parts)))
    found |= set(tool["setuptools"]["package-data"])  # data folders, listed as packages
    assert set(config["packages"]) == found
    assert not any(p == "converters" or p.startswith("converters.") for p in config["packages"])


def test_a_users_converters_folder_does_not_shadow_ours(tmp_path):
    import subprocess
    import sys

    (tmp_path / "converters").mkdir()
    (tmp_path / "converters" / "__init__.py").write_text("raise ImportError('the user one')")
    code = (
        "from shortgpt_export.converters import get_converter, supported_formats; "
        "print(get_converter('gguf').name, supported_formats())"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "gguf"


def test_the_core_reaches_back_ends_only_through_the_registry():
    """Outside the CLI and the back-ends themselves, nothing imports a back-end module."""
    import re

    deep = re.compile(r"^\s*(from|import)\s+(shortgpt_export)?\.*converters\.", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "shortgpt_export").rglob("*.py")
        if "cli" not in path.parts and deep.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_readme_families_table_matches_the_architecture_table():
    """The README's family rows name every registered family with its examples."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {
        line.split("|")[2].strip(" `"): line
        for line in readme.splitlines()
        if line.startswith("| ") and line.count("|") >= 7 and "`" in line.split("|")[2]
    }
    assert set(ARCHITECTURES) | set(TEXT_MODELS) <= set(rows)
    for name, spec in ARCHITECTURES.items():
        for example in spec.examples:
            assert example in rows[name], (name, example)
