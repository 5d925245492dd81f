"""Every registered architecture and export back-end has a fixture and tests."""

from pathlib import Path

from tiny_models import BACKEND_TESTS, TINY_CONFIGS

from converters import BACKENDS, get_converter
from shortgpt_export.architectures import ARCHITECTURES


def test_every_architecture_has_a_tiny_model_fixture():
    assert set(TINY_CONFIGS) == set(ARCHITECTURES)


def test_every_backend_has_a_test_module():
    assert set(BACKEND_TESTS) == set(BACKENDS)
    here = Path(__file__).parent
    for name, module in BACKEND_TESTS.items():
        assert (here / module).is_file(), f"back-end {name} has no {module}"
        assert get_converter(name).name == name
