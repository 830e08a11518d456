"""``ortq export NAME ... --format F``: offered only by backends that declare ``Backend.output_formats`` (the esp32
targets: ``cpp`` for ESP-DL v1.1, ``espdl`` for ESP-DL v3), passed to the backend as its ``format`` option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ortq
from ortq.api.cli import build_cli


def _export(*args: str):
    return CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)), ["export", *args])


def test_format_option_only_where_the_backend_declares_formats() -> None:
    cpu = _export("cpu", "--help")
    assert cpu.exit_code == 0 and "--format" not in cpu.stdout
    s3 = _export("esp32s3", "--help")
    assert s3.exit_code == 0 and "--format [cpp|espdl]" in s3.stdout
    p4 = _export("esp32p4", "--help")
    assert p4.exit_code == 0 and "--format [espdl]" in p4.stdout  # ESP32-P4 has no ESP-DL v1.1 release


@pytest.mark.parametrize(("target", "args"), [("esp32s3", ["--format", "espdl"]), ("esp32p4", [])])
def test_export_writes_an_espdl_file_the_reader_reads_back(digits: Path, tmp_path: Path, target: str, args: list[str]) -> None:
    from ortq.plugins.backends.esp32.espdl import check_test_values, read_espdl

    out = tmp_path / "out"
    result = _export(target, str(digits / "model.onnx"), "-o", str(out), "-d", str(digits / "calibration.npz"), *args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.espdl", f"model.{target}.onnx"])
    assert f"wrote {out / 'model.espdl'}" in result.stdout
    model = read_espdl(out / "model.espdl")
    assert [vi.name for vi in model.graph.inputs] and [vi.name for vi in model.graph.outputs]
    ops = {n.op_type for n in model.graph.nodes}
    assert "Conv" in ops, ops
    checked = check_test_values(model, target)
    assert checked
    for name, (expected, got) in checked.items():
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_export_format_cpp_writes_the_v1_1_files(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _export("esp32s3", str(digits / "model.onnx"), "-o", str(out), "-d", str(digits / "calibration.npz"),
                     "--format", "cpp")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "model.esp32s3.onnx", "model_coefficient.cpp", "model_coefficient.hpp", "model_coefficient_report.md",
        "model_model.hpp",
    ]


@pytest.mark.parametrize(("target", "args", "message"), [
    ("esp32p4", ["--format", "cpp"], "Invalid value for '--format': 'cpp' is not 'espdl'"),
    ("esp32s3", ["--format", "espdl", "--backend-option", "format=cpp"],
     "--format espdl and --backend-option format=cpp disagree"),
])
def test_bad_format_is_a_usage_error_before_any_work(tmp_path: Path, target: str, args: list[str], message: str) -> None:
    model, data = tmp_path / "missing.onnx", tmp_path / "missing.npz"  # never read: the usage error comes first
    result = _export(target, str(model), "-o", str(tmp_path / "out"), "-d", str(data), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "out").exists()
