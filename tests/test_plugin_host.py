"""The plugin host: built-ins as plugins, isolation between toolkits, duplicates, broken plugins."""

from __future__ import annotations

import importlib.metadata
import types

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_cnn, tiny_data

import ortq
from ortq.api.cli import build_cli
from ortq.host.plugin_host import BUILTIN_PLUGINS


class ReluAgain(ortq.OpQuantizer):
    op_types = ("Relu",)

    def plan(self, node, ctx):
        return ortq.LeaveFloat("replaced by a test plugin")


def test_builtins_register_like_any_plugin(toolkit: ortq.Toolkit) -> None:
    assert set(BUILTIN_PLUGINS) <= set(toolkit.plugin_info)
    assert all(toolkit.plugin_info[name].source == "builtin" for name in BUILTIN_PLUGINS)
    assert toolkit.op_quantizers.entry("Conv").plugin == "ortq.plugins.ops.conv"
    assert "minmax" in toolkit.calibrators and "cpu" in toolkit.backends


def test_toolkits_do_not_share_plugins() -> None:
    class Extra:
        @ortq.hookimpl
        def ortq_register_op_quantizers(self, register):
            class Erf(ortq.OpQuantizer):
                op_types = ("Erf",)

                def plan(self, node, ctx):
                    return ortq.NodePlan()

            register(Erf)

    with_extra = ortq.Toolkit([Extra()], autoload=False)
    without = ortq.Toolkit(autoload=False)
    assert with_extra.op_quantizer_for("Erf") is not None
    assert without.op_quantizer_for("Erf") is None


def test_empty_toolkit_has_nothing() -> None:
    bare = ortq.Toolkit(autoload=False, builtins=False)
    assert len(bare.op_quantizers) == len(bare.calibrators) == len(bare.backends) == 0


def test_duplicate_registration_is_an_error_naming_both_plugins() -> None:
    plugin = types.SimpleNamespace(ortq_register_op_quantizers=ortq.hookimpl(lambda register: register(ReluAgain)))
    with pytest.raises(ortq.PluginError) as info:
        ortq.Toolkit([plugin], autoload=False)
    message = str(info.value)
    assert "'Relu'" in message and "ortq.plugins.ops.activations" in message and "replace=True" in message


def test_replace_true_overrides_and_is_used(toolkit: ortq.Toolkit) -> None:
    class Replacing:
        @ortq.hookimpl
        def ortq_register_op_quantizers(self, register):
            register(ReluAgain, replace=True)

    tk = ortq.Toolkit([Replacing()], autoload=False)
    result = tk.quantize(tiny_cnn(), calibration_data=tiny_data())
    reasons = {f.name: f.reason for f in result.plan.float_nodes}
    assert reasons["relu"] == "replaced by a test plugin"


def test_plugin_raising_at_registration_is_named_and_can_be_skipped() -> None:
    class Broken:
        @ortq.hookimpl
        def ortq_register_calibrators(self, register):
            raise RuntimeError("boom")

    with pytest.raises(ortq.PluginError, match=r"plugin 'broken'.*raised in ortq_register_calibrators.*boom"):
        ortq.Toolkit(autoload=False).register(Broken(), name="broken")
    tk = ortq.Toolkit(autoload=False, on_plugin_error="skip")
    assert tk.register(Broken(), name="broken") is None
    assert "boom" in tk.plugin_info["broken"].error
    assert "minmax" in tk.calibrators  # the rest still works


def test_misspelled_hook_is_rejected() -> None:
    class Typo:
        @ortq.hookimpl
        def ortq_register_calibrator(self, register):  # missing "s"
            pass

    with pytest.raises(ortq.PluginError, match="not a valid ortq plugin"):
        ortq.Toolkit([Typo()], autoload=False)


def test_op_quantizer_failure_names_quantizer_plugin_and_node() -> None:
    class Exploding(ortq.OpQuantizer):
        op_types = ("Relu",)

        def plan(self, node, ctx):
            raise ZeroDivisionError("bad plan")

    class Plugin:
        @ortq.hookimpl
        def ortq_register_op_quantizers(self, register):
            register(Exploding, replace=True)

    tk = ortq.Toolkit([Plugin()], autoload=False)
    with pytest.raises(ortq.PluginError, match=r"Exploding.*'relu' \(Relu\).*bad plan"):
        tk.quantize(tiny_cnn(), calibration_data=tiny_data())


class _FakeDist:
    def __init__(self, name: str, entry_points: list[importlib.metadata.EntryPoint]) -> None:
        self.metadata = {"name": name}
        self.version = "9.9"
        self.entry_points = entry_points


def test_entry_point_that_fails_to_import_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = importlib.metadata.EntryPoint("ghost", "ortq_no_such_module_xyz", "ortq")
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [_FakeDist("ghost-dist", [ep])])
    with pytest.raises(ortq.PluginError, match=r"plugin 'ghost' \(entry point ortq_no_such_module_xyz from ghost-dist 9.9\)"):
        ortq.Toolkit()
    tk = ortq.Toolkit(on_plugin_error="skip")
    assert tk.plugin_info["ghost"].error
    assert ortq.Toolkit(autoload=False).plugin_info.get("ghost") is None


class ClippedMinMax(ortq.Calibrator):
    """A third-party calibrator in about 20 lines: min/max shrunk by a factor."""

    name = "shrunk"

    def __init__(self, factor: str = "0.5") -> None:
        self.factor = float(factor)

    def create_statistic(self, tensor):
        return ortq.MinMaxStatistic()

    def compute_range(self, tensor, statistic, spec):
        return statistic.min * self.factor, statistic.max * self.factor


class CalibratorPlugin:
    @ortq.hookimpl
    def ortq_register_calibrators(self, register):
        register(ClippedMinMax)


def test_third_party_calibrator_chosen_by_name_from_cli(tmp_path, cnn_files) -> None:
    model, data = cnn_files
    tk = ortq.Toolkit([CalibratorPlugin()], autoload=False)
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(
        build_cli(tk),
        ["quantize", str(model), "-o", str(out), "-d", str(data), "--calibrate-method", "shrunk", "--calibrator-option", "factor=0.5"],
    )
    assert result.exit_code == 0, result.output
    assert "calibrator shrunk" in result.output
    reference = ortq.Toolkit(autoload=False).quantize(model, calibration_data=data)
    shrunk = tk.quantize(model, calibration_data=data, calibrate_method="shrunk")
    lo, hi = reference.ranges["x"]
    assert shrunk.ranges["x"] == pytest.approx((lo * 0.5, hi * 0.5))


def test_third_party_backend_is_a_target(tmp_path) -> None:
    seen = {}

    class Npu(ortq.Backend):
        name = "npu"
        default_op_types = frozenset({"Conv", "Relu"})

        def export(self, result, out_dir):
            path = out_dir / "npu_table.txt"
            path.write_text("\n".join(f"{t} {lo} {hi}" for t, (lo, hi) in sorted(result.ranges.items())))
            seen["ranges"] = result.ranges
            return [path]

    class Plugin:
        @ortq.hookimpl
        def ortq_register_backends(self, register):
            register(Npu)

    tk = ortq.Toolkit([Plugin()], autoload=False)
    result = tk.quantize(tiny_cnn(), tmp_path / "q.onnx", calibration_data=tiny_data(), target="npu")
    assert set(result.plan.quantized_nodes.values()) == {"Conv", "Relu"}
    assert result.artifacts == [tmp_path / "npu_table.txt"]
    lines = (tmp_path / "npu_table.txt").read_text().splitlines()
    assert len(lines) == len(seen["ranges"]) and lines[0].split()[0] in seen["ranges"]
    assert np.isfinite([float(v) for line in lines for v in line.split()[1:]]).all()


def test_third_party_backend_gets_an_export_command(tmp_path, cnn_files) -> None:
    class Npu(ortq.Backend):
        name = "npu"
        description = "an imaginary NPU"

        def __init__(self, table_name: str = "npu_table.txt") -> None:
            self.table_name = table_name

        def export(self, result, out_dir):
            path = out_dir / self.table_name
            path.write_text("\n".join(f"{t} {hi}" for t, (_, hi) in sorted(result.ranges.items())))
            return [path]

    class Plugin:
        @ortq.hookimpl
        def ortq_register_backends(self, register):
            register(Npu)

    cli = build_cli(ortq.Toolkit([Plugin()], autoload=False))
    listed = CliRunner().invoke(cli, ["export", "--help"])
    assert "npu" in listed.output and "an imaginary NPU" in listed.output and "cpu" in listed.output
    model, data = cnn_files
    out = tmp_path / "export"
    result = CliRunner().invoke(cli, ["export", "npu", str(model), "-o", str(out), "-d", str(data),
                                      "--backend-option", "table_name=scales.txt"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.npu.onnx", "scales.txt"]
    assert (out / "scales.txt").read_text().count("\n") >= 2


def test_backend_that_fails_after_writing_leaves_nothing(tmp_path) -> None:
    """Artifacts are written into a private folder and moved into place only once export returned."""

    class HalfDone(ortq.Backend):
        name = "halfdone"

        def export(self, result, out_dir):
            (out_dir / "table.txt").write_text("partial")
            (out_dir / "sub").mkdir()
            (out_dir / "sub" / "more.bin").write_bytes(b"partial")
            raise RuntimeError("device table overflow")

    class Plugin:
        @ortq.hookimpl
        def ortq_register_backends(self, register):
            register(HalfDone)

    (tmp_path / "q.onnx").write_bytes(b"the previous model")
    tk = ortq.Toolkit([Plugin()], autoload=False)
    with pytest.raises(ortq.PluginError, match="backend 'halfdone' failed to export.*device table overflow"):
        tk.quantize(tiny_cnn(), tmp_path / "q.onnx", calibration_data=tiny_data(), target="halfdone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    assert (tmp_path / "q.onnx").read_bytes() == b"the previous model"


def test_backend_artifacts_may_sit_in_subfolders_but_not_outside(tmp_path) -> None:
    class Nested(ortq.Backend):
        name = "nested"
        escape = False

        def export(self, result, out_dir):
            (out_dir / "include").mkdir()
            header = out_dir / "include" / "model.h"
            header.write_text("// scales")
            outside = out_dir.parent / "stray.txt"
            if self.escape:
                outside.write_text("x")
            return [header, outside] if self.escape else [header]

    class Plugin:
        @ortq.hookimpl
        def ortq_register_backends(self, register):
            register(Nested)

    tk = ortq.Toolkit([Plugin()], autoload=False)
    result = tk.quantize(tiny_cnn(), tmp_path / "q.onnx", calibration_data=tiny_data(), target="nested")
    assert result.artifacts == [tmp_path / "include" / "model.h"]
    assert (tmp_path / "include" / "model.h").read_text() == "// scales"
    Nested.escape = True
    with pytest.raises(ortq.PluginError, match="outside the folder it was given"):
        tk.quantize(tiny_cnn(), tmp_path / "q2.onnx", calibration_data=tiny_data(), target="nested")
    assert not (tmp_path / "q2.onnx").exists()


def test_failed_export_command_leaves_no_folder(tmp_path, cnn_files) -> None:
    model, _ = cnn_files
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    out = tmp_path / "new" / "export"
    result = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)),
                                ["export", "cpu", str(model), "-o", str(out), "-d", str(broken)])
    assert result.exit_code == 1 and "broken.npz" in result.output
    assert not (tmp_path / "new").exists()


def test_unknown_target_and_calibrator_list_what_exists(toolkit: ortq.Toolkit) -> None:
    with pytest.raises(ortq.ConfigError, match=r"no backend named 'gpu'; registered: cpu"):
        toolkit.quantize(tiny_cnn(), calibration_data=tiny_data(), target="gpu")
    with pytest.raises(ortq.ConfigError, match=r"no calibrator named 'kmeans'; registered: auto, entropy, minmax, mse, percentile"):
        toolkit.quantize(tiny_cnn(), calibration_data=tiny_data(), calibrate_method="kmeans")


def test_cpu_target_reduces_range_only_without_vnni() -> None:
    from ortq.plugins.backends.cpu import cpu_lacks_vnni

    assert cpu_lacks_vnni("flags\t: fpu sse2 avx2 fma") is True
    assert cpu_lacks_vnni("flags\t: fpu sse2 avx2 avx512f avx512_vnni") is False
    assert cpu_lacks_vnni("flags\t: fpu avx2 avx_vnni") is False
    tk = ortq.Toolkit(autoload=False)
    assert tk.backend("cpu", reduce_range="true").default_config().weight.reduce_range is True
    assert tk.backend("cpu", reduce_range="false").default_config().weight.reduce_range is False
    result = tk.quantize(tiny_cnn(), calibration_data=tiny_data(), backend_options={"reduce_range": "true"})
    assert result.config.weight.reduce_range and float(np.abs(result.params["w1"].scale).min()) > 0
    with pytest.raises(ortq.ConfigError, match="reduce_range"):
        tk.backend("cpu", reduce_range="sometimes")
