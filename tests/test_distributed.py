"""Calibration on Ray equals calibration in one process, survives a dying worker, and names a bad shard.

A local Ray (``ray.init(num_cpus=2)``) is started once for the module; every test is skipped where Ray
is not installed (``pip install 'ortq[ray]'``). Equality is exact: the merged statistics and the written
model bytes, not a tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import ortq
from conftest import tiny_cnn, tiny_data
from ortq.core.errors import CalibrationError, ConfigError
from ortq.tools.distributed import calibrate_on_ray, import_ray, shards_of


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'ortq[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # Workers cannot import this test module: ship the test's reader class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny CNN and a folder of five .npz shards of different sizes and value ranges."""
    model = tmp_path / "model.onnx"
    onnx.save(tiny_cnn(), model)
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, n in enumerate([7, 3, 20, 5, 9]):  # 20 > the batch size: a shard is still read as one batch
        data = tiny_data(n, seed=10 + i)
        data["x"] *= 1 + i  # each shard widens the range: merging must grow histograms exactly
        np.savez(folder / f"part{i}.npz", **data)
    return model, folder


@pytest.mark.parametrize(("method", "workers"), [("minmax", 1), ("entropy", 2)])
def test_ray_statistics_equal_one_process(local_ray, shards, method, workers):
    model, folder = shards
    toolkit = ortq.Toolkit(autoload=False)
    local = toolkit.calibrate(model, folder, calibrate_method=method, batch_size=8)
    seen = []
    distributed = calibrate_on_ray(
        toolkit, model, folder, workers=workers, calibrate_method=method, batch_size=8,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert distributed.to_dict() == local.to_dict()
    assert seen == [(i, 5) for i in range(1, 6)]


def test_ray_quantize_cli_is_byte_identical(local_ray, shards, tmp_path):
    model, folder = shards
    from ortq.api.cli import build_cli

    cli = build_cli(ortq.Toolkit(autoload=False))
    runner = CliRunner()
    plain = runner.invoke(cli, ["quantize", str(model), "-o", str(tmp_path / "plain.onnx"), "-d", str(folder),
                                "--calibrate-method", "entropy"])
    assert plain.exit_code == 0, plain.output
    on_ray = runner.invoke(cli, ["quantize", str(model), "-o", str(tmp_path / "ray.onnx"), "-d", str(folder),
                                 "--calibrate-method", "entropy", "--ray", "--ray-workers", "2"])
    assert on_ray.exit_code == 0, on_ray.output
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    assert "SQNR" in on_ray.output  # verified on the driver, from the first shard


class _DiesOnce:
    """A calibration reader whose worker process dies the first time it is read (a lost machine)."""

    def __init__(self, data: dict[str, np.ndarray], marker: str) -> None:
        self.data, self.marker, self.sent = data, marker, False

    def get_next(self):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)  # the whole worker process, as a killed node would
        if self.sent:
            return None
        self.sent = True
        return self.data


def test_a_dying_worker_is_retried_and_the_result_is_exact(local_ray, tmp_path):
    model = tiny_cnn()
    parts = [tiny_data(6, seed=s) for s in (1, 2, 3)]
    toolkit = ortq.Toolkit(autoload=False)
    local = toolkit.calibrate(model, [parts[0], parts[1], parts[2]])
    marker = str(tmp_path / "died")
    shards = [parts[0], _DiesOnce(parts[1], marker), parts[2]]
    distributed = calibrate_on_ray(toolkit, model, shards, workers=2)
    assert os.path.exists(marker), "the worker never died: the test proves nothing"
    assert distributed.to_dict() == local.to_dict()


def test_a_bad_shard_fails_the_run_with_its_name_and_writes_nothing(local_ray, shards, tmp_path):
    model, folder = shards
    (folder / "part2.npz").write_bytes(b"not an npz archive")
    toolkit = ortq.Toolkit(autoload=False)
    out = tmp_path / "q.onnx"
    with pytest.raises(CalibrationError, match="part2.npz"):
        toolkit.quantize(model, out, calibration_data=folder, ray=True, ray_workers=2)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "shards"]


def test_shards_of_a_folder_list_and_file(tmp_path):
    (tmp_path / "b.npz").write_bytes(b"")
    (tmp_path / "a.npz").write_bytes(b"")
    assert [s.name for s in shards_of(tmp_path)] == [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
    assert [s.name for s in shards_of([tiny_data(2), tiny_data(3)])] == ["shard 0", "shard 1"]
    assert len(shards_of(tmp_path / "a.npz")) == 1


def test_max_samples_is_refused_across_shards(shards):
    model, folder = shards
    with pytest.raises(ConfigError, match="max_samples"):
        calibrate_on_ray(ortq.Toolkit(autoload=False), model, folder, max_samples=4)


def test_without_ray_nothing_imports_it_and_the_option_says_how_to_install(monkeypatch):
    code = "import sys, ortq, ortq.api.cli; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra sees
    with pytest.raises(ConfigError, match=r"pip install 'ortq\[ray\]'"):
        import_ray()


def test_ray_evaluation_equals_one_process(local_ray, tmp_path):
    """Shards scored on workers, metrics merged in shard order: one process's report, labels included."""
    toolkit = ortq.Toolkit(autoload=False)
    model = tiny_cnn()
    quantized = toolkit.quantize(model, calibration_data=tiny_data(16)).model
    rng = np.random.default_rng(5)
    parts = []
    for i, n in enumerate([5, 8, 3]):
        data = tiny_data(n, seed=20 + i)
        data["label"] = rng.integers(0, 5, n)
        np.savez(tmp_path / f"eval{i}.npz", **data)
        parts.append(data)
    whole = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    metrics = ["top1", "accuracy", "sqnr", "cosine"]
    local = toolkit.evaluate(model, quantized, whole, labels="label", metrics=metrics, latency_runs=0)
    shards = [tmp_path / f"eval{i}.npz" for i in range(3)]
    seen = []
    remote = toolkit.evaluate(model, quantized, shards, labels="label", metrics=metrics, latency_runs=0,
                              ray=True, ray_workers=2, progress=lambda d, t: seen.append(d))
    assert remote.samples == local.samples == 16 and seen == [1, 2, 3]
    for a, b in zip(remote.metrics, local.metrics):
        assert (a.label, a.float_value) == (b.label, pytest.approx(b.float_value, rel=1e-12))
        assert a.quantized_value == pytest.approx(b.quantized_value, rel=1e-9)


def test_ray_evaluation_refuses_a_metric_that_cannot_merge(local_ray, tmp_path):
    class Median(ortq.Metric):
        name = "median_error"

        def reset(self):
            self.values = []

        def update(self, reference, candidate, labels=None):
            self.values.append(float(np.median(np.abs(self.select(reference) - self.select(candidate)))))

        def result(self):
            return float(np.median(self.values))

    class Plugin:
        @ortq.hookimpl
        def ortq_register_metrics(self, register):
            register(Median)

    toolkit = ortq.Toolkit([Plugin()], autoload=False)
    model = tiny_cnn()
    quantized = toolkit.quantize(model, calibration_data=tiny_data(8)).model
    np.savez(tmp_path / "a.npz", **tiny_data(4))
    with pytest.raises(ConfigError, match="median_error.*cannot combine"):
        toolkit.evaluate(model, quantized, [tmp_path / "a.npz", tmp_path / "a.npz"], metrics=["median_error"],
                         latency_runs=0, ray=True, ray_workers=1)


def test_accuracy_driven_ranking_on_ray_equals_the_local_search(local_ray):
    from models import outlier_channel_cnn
    from ortq.tools.accuracy_driven import AccuracyTarget, quantize_to_target

    model, calibration, evaluation = outlier_channel_cnn()
    toolkit = ortq.Toolkit(autoload=False)
    options = dict(target=AccuracyTarget("sqnr", min_value=30.0), calibration_data=calibration,
                   eval_data=evaluation, max_rank_trials=6)
    local = quantize_to_target(toolkit, model, **options)
    remote = quantize_to_target(toolkit, model, ray=True, ray_workers=2, **options)
    assert [(u.tensor, u.value) for u in remote.ranking] == [(u.tensor, u.value) for u in local.ranking]
    assert [k.tensor for k in remote.kept] == [k.tensor for k in local.kept] == ["relu_3_out"]
    assert remote.final_value == local.final_value and remote.trials == local.trials
    assert remote.result.model.SerializeToString() == local.result.model.SerializeToString()


def test_accuracy_driven_on_ray_refuses_explicit_plugins(local_ray):
    from models import outlier_channel_cnn
    from ortq.tools.accuracy_driven import AccuracyTarget, quantize_to_target

    class Extra:
        @ortq.hookimpl
        def ortq_register_metrics(self, register):
            pass

    model, calibration, evaluation = outlier_channel_cnn()
    toolkit = ortq.Toolkit([Extra()], autoload=False)
    with pytest.raises(ConfigError, match="plugins given to the Toolkit"):
        quantize_to_target(toolkit, model, target=AccuracyTarget("sqnr", min_value=30.0), calibration_data=calibration,
                           eval_data=evaluation, max_rank_trials=2, ray=True)
