"""The C++ sources are files in hexcore/kernels/csrc/: each extension finds its own, an edited source gets
a build of its own, and a missing one leaves the caller its torch path."""

import logging
import shutil

import pytest

from hexcore.kernels import build, elementwise, fused_layer, paged_attention, panel_linear
from hexcore.kernels.build import CppExtension

EXTENSIONS = [panel_linear._EXTENSION, paged_attention._EXTENSION, elementwise._EXTENSION, fused_layer._EXTENSION]


@pytest.mark.parametrize("extension", EXTENSIONS, ids=lambda extension: extension.source_file)
def test_each_extension_reads_its_source_file(extension):
    assert extension.source_path.parent == build.SOURCE_DIR
    assert extension.source_path.is_file()
    for function in extension.functions:  # the file defines what load_inline binds
        assert f" {function}(" in extension.source


def test_an_edited_source_gets_a_build_of_its_own(tmp_path, monkeypatch):
    shutil.copy(build.SOURCE_DIR / "elementwise.cpp", tmp_path / "elementwise.cpp")
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    extension = CppExtension("hexgen_test", "elementwise.cpp", ["rms_norm"], "test loop")
    before = extension.build_name
    assert before == extension.build_name  # the same text: the same build
    with open(tmp_path / "elementwise.cpp", "a") as source:
        source.write("// edited\n")
    assert extension.build_name != before


def test_an_edited_include_gets_a_build_of_its_own(tmp_path, monkeypatch):
    for name in ("elementwise.cpp", "fused_layer.cpp"):
        shutil.copy(build.SOURCE_DIR / name, tmp_path / name)
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    extension = CppExtension("hexgen_test", "fused_layer.cpp", ["mlp_block"], "test loop", includes=("elementwise.cpp",))
    before = extension.build_name
    assert extension.source.index(" rms_norm(") < extension.source.index(" mlp_block(")  # includes come first
    with open(tmp_path / "elementwise.cpp", "a") as source:
        source.write("// edited\n")
    assert extension.build_name != before


def test_a_missing_source_leaves_the_torch_path(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    extension = CppExtension("hexgen_test", "absent.cpp", ["f"], "test loop")
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert extension.module() is None
    assert "test loop unavailable" in caplog.text and "absent.cpp" in caplog.text
