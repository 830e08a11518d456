"""A folder of images as calibration data: layout, size, normalization, batching and clear errors."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.io.data import InputSpec, iter_batches
from ortq.core.errors import CalibrationDataError, ConfigError

Image = pytest.importorskip("PIL.Image")

from ortq.io.images import ImageOptions, ImageReader, image_files, iter_image_batches  # noqa: E402

F32 = np.dtype("float32")


def _spec(shape, dtype=F32, name: str = "x") -> list[InputSpec]:
    return [InputSpec(name, np.dtype(dtype), shape)]


def _solid(path: Path, color, size=(16, 16), mode: str = "RGB") -> Path:
    """A one-color image; ``size`` is (width, height) as Pillow has it."""
    Image.new(mode, size, color).save(path)
    return path


def _gradient(path: Path, width: int = 16, height: int = 16) -> np.ndarray:
    """An RGB image whose pixels all differ per channel and position; returns the HWC pixels."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 8 % 256, y * 8 % 256, (x + y) * 4 % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return pixels


def _batches(folder, inputs, batch_size=None, options=None) -> list[dict[str, np.ndarray]]:
    return list(iter_batches(folder, inputs, batch_size, image_options=options))


# -- layout, normalization, channels ---------------------------------------------------------------------------
def test_nchw_float_scale_mean_std(tmp_path: Path) -> None:
    pixels = _gradient(tmp_path / "a.png")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    (batch,) = _batches(tmp_path, _spec([None, 3, 16, 16]), options=ImageOptions(mean=mean, std=std))
    x = batch["x"]
    assert x.shape == (1, 3, 16, 16) and x.dtype == np.float32
    want = (pixels.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(x[0], want.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)


def test_nhwc_inferred_and_default_scale(tmp_path: Path) -> None:
    pixels = _gradient(tmp_path / "a.png", width=12, height=10)
    (batch,) = _batches(tmp_path, _spec([None, 10, 12, 3]))
    assert batch["x"].shape == (1, 10, 12, 3)
    np.testing.assert_allclose(batch["x"][0], pixels / 255.0, rtol=1e-6)


def test_uint8_input_gets_raw_pixels(tmp_path: Path) -> None:
    pixels = _gradient(tmp_path / "a.png")
    (batch,) = _batches(tmp_path, _spec([None, 16, 16, 3], np.uint8), options=ImageOptions(mean=0.5))
    assert batch["x"].dtype == np.uint8
    np.testing.assert_array_equal(batch["x"][0], pixels)


def test_grayscale_from_shape_and_rgb_files_are_converted(tmp_path: Path) -> None:
    _solid(tmp_path / "gray.png", 100, mode="L")
    _solid(tmp_path / "red.png", (255, 0, 0))
    (batch,) = _batches(tmp_path, _spec([None, 1, 16, 16]), options=ImageOptions(scale=1.0, mean=100.0, std=2.0))
    x = batch["x"]
    assert x.shape == (2, 1, 16, 16)
    np.testing.assert_allclose(x[0], 0.0)  # gray.png sorts first
    luma = Image.new("RGB", (1, 1), (255, 0, 0)).convert("L").getpixel((0, 0))
    np.testing.assert_allclose(x[1], (luma - 100.0) / 2.0)


def test_rgba_and_palette_images_become_rgb(tmp_path: Path) -> None:
    _solid(tmp_path / "a.png", (10, 20, 30, 40), mode="RGBA")
    Image.new("RGB", (16, 16), (50, 60, 70)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "b.png")
    (batch,) = _batches(tmp_path, _spec([None, 3, 16, 16], np.uint8))
    np.testing.assert_array_equal(batch["x"][0, :, 0, 0], [10, 20, 30])
    np.testing.assert_array_equal(batch["x"][1, :, 0, 0], [50, 60, 70])


def test_jpeg_and_other_suffixes_sorted_by_name(tmp_path: Path) -> None:
    _solid(tmp_path / "b.JPG", (200, 200, 200))
    _solid(tmp_path / "a.bmp", (0, 0, 0))
    _solid(tmp_path / "c.ppm", (255, 255, 255))
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in image_files(tmp_path)] == ["a.bmp", "b.JPG", "c.ppm"]
    (batch,) = _batches(tmp_path, _spec([None, 3, 16, 16]))
    np.testing.assert_allclose(batch["x"].mean(axis=(1, 2, 3)), [0.0, 200 / 255, 1.0], atol=2 / 255)


def test_explicit_layout_and_channels_for_unknown_shape(tmp_path: Path) -> None:
    _solid(tmp_path / "a.png", (0, 128, 255), size=(9, 7))
    with pytest.raises(CalibrationDataError, match=r"image size is not known.*ImageOptions\(size="):
        _batches(tmp_path, _spec(None))
    options = ImageOptions(size=(7, 9), layout="nhwc", channels=1)
    (batch,) = _batches(tmp_path, _spec(None), options=options)
    assert batch["x"].shape == (1, 7, 9, 1)


def test_resize_to_a_symbolic_spatial_size(tmp_path: Path) -> None:
    _solid(tmp_path / "a.png", (255, 0, 0), size=(40, 30))
    (batch,) = _batches(tmp_path, _spec([None, 3, None, None]), options=ImageOptions(size=12))
    assert batch["x"].shape == (1, 3, 12, 12)
    np.testing.assert_allclose(batch["x"][0, 0], 1.0)
    np.testing.assert_allclose(batch["x"][0, 1:], 0.0)


def test_shorter_side_crop_keeps_the_center(tmp_path: Path) -> None:
    # 64 wide x 32 high: red | green | blue stripes of 16, 32, 16 columns
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :16, 0] = pixels[:, 16:48, 1] = pixels[:, 48:, 2] = 255
    Image.fromarray(pixels, "RGB").save(tmp_path / "a.png")
    inputs = _spec([None, 3, 8, 8], np.uint8)

    # shorter side to 8 / 0.5 = 16 (so 32 x 16), then the center 8 x 8: all green
    (crop,) = _batches(tmp_path, inputs, options=ImageOptions(resize="shorter-side-crop", crop_fraction=0.5))
    assert crop["x"].shape == (1, 3, 8, 8)
    np.testing.assert_array_equal(crop["x"][0, 1], 255)
    np.testing.assert_array_equal(crop["x"][0, [0, 2]], 0)

    # no resampling needed at crop_fraction 1 and a matching height: an exact center cut
    (exact,) = _batches(tmp_path, _spec([None, 32, 32, 3], np.uint8),
                        options=ImageOptions(resize="shorter-side-crop", crop_fraction=1.0))
    np.testing.assert_array_equal(exact["x"][0], pixels[:, 16:48])

    # a plain resize squeezes the whole width in: red and blue stay visible
    (squeezed,) = _batches(tmp_path, inputs)
    assert squeezed["x"][0, 0, :, 0].min() > 200 and squeezed["x"][0, 2, :, -1].min() > 200


# -- batching --------------------------------------------------------------------------------------------------
def test_dynamic_batch_uses_batch_size_and_keeps_the_remainder(tmp_path: Path) -> None:
    for i in range(5):
        _solid(tmp_path / f"{i:02d}.png", (i * 50, 0, 0))
    batches = _batches(tmp_path, _spec([None, 3, 16, 16]), batch_size=2)
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
    reds = np.concatenate([b["x"][:, 0, 0, 0] for b in batches])
    np.testing.assert_allclose(reds, np.arange(5) * 50 / 255, rtol=1e-6)


def test_default_batch_size_is_16(tmp_path: Path) -> None:
    for i in range(18):
        _solid(tmp_path / f"{i:02d}.png", (i, i, i), size=(4, 4))
    batches = _batches(tmp_path, _spec([None, 3, 4, 4]))
    assert [b["x"].shape[0] for b in batches] == [16, 2]


def test_fixed_batch_dim_wins_and_drops_leftovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(7):
        _solid(tmp_path / f"{i}.png", (i, i, i), size=(4, 4))
    batches = _batches(tmp_path, _spec([3, 3, 4, 4]))
    assert [b["x"].shape for b in batches] == [(3, 3, 4, 4)] * 2
    assert "dropping the last 1 image" in caplog.text
    with pytest.raises(CalibrationDataError, match="fixed at 3; batch size 2"):
        _batches(tmp_path, _spec([3, 3, 4, 4]), batch_size=2)
    with pytest.raises(CalibrationDataError, match="7 image.*fewer than the model's fixed batch size 8"):
        _batches(tmp_path, _spec([8, 3, 4, 4]))


def test_max_samples_and_one_batch_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(6):
        _solid(tmp_path / f"{i}.png", (i, i, i), size=(4, 4))
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(Path(p).name) or real_open(p, *a, **k))
    batches = iter_image_batches(tmp_path, _spec([None, 3, 4, 4]), batch_size=2)
    assert opened == []
    next(batches)
    assert len(opened) == 2  # images are decoded one batch at a time, as asked for
    next(batches)
    assert len(opened) == 4
    limited = iter_batches(tmp_path, _spec([None, 3, 4, 4]), batch_size=2, max_samples=3)
    assert [b["x"].shape[0] for b in limited] == [2, 2]


def test_recursive(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    _solid(tmp_path / "dog" / "1.png", (0, 0, 0))
    _solid(tmp_path / "cat" / "2.png", (255, 255, 255))
    with pytest.raises(CalibrationDataError, match=r"sub-folders.*ImageOptions\(recursive=True\)"):
        _batches(tmp_path, _spec([None, 3, 16, 16]))
    (batch,) = _batches(tmp_path, _spec([None, 3, 16, 16]), options=ImageOptions(recursive=True))
    np.testing.assert_allclose(batch["x"][:, 0, 0, 0], [1.0, 0.0])  # cat/ before dog/


def test_reader_passes_options(tmp_path: Path) -> None:
    _solid(tmp_path / "a.png", (255, 255, 255), size=(20, 20))
    reader = ImageReader(tmp_path, _spec([None, 3, None, None]), ImageOptions(size=(5, 6), mean=0.5, std=0.5))
    first = reader.get_next()
    assert first["x"].shape == (1, 3, 5, 6)
    np.testing.assert_allclose(first["x"], 1.0)
    assert reader.get_next() is None
    reader.rewind()
    assert reader.get_next() is not None


# -- errors ----------------------------------------------------------------------------------------------------
def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    _solid(tmp_path / "a.png", (1, 2, 3))
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(CalibrationDataError, match="cannot read as an image") as info:
        _batches(tmp_path, _spec([None, 3, 16, 16]))
    assert str(bad) in str(info.value)


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    good = _solid(tmp_path / "a.png", (1, 2, 3))
    bad = tmp_path / "b.png"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CalibrationDataError) as info:
        _batches(tmp_path, _spec([None, 3, 16, 16]))
    assert str(bad) in str(info.value)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match="no image files"):
        list(iter_image_batches(tmp_path, _spec([None, 3, 16, 16])))
    with pytest.raises(CalibrationDataError, match="found no calibration data.*image files") as info:
        _batches(tmp_path, _spec([None, 3, 16, 16]))
    assert str(tmp_path) in str(info.value)


def test_multi_input_model_names_the_inputs(tmp_path: Path) -> None:
    _solid(tmp_path / "a.png", (1, 2, 3))
    inputs = [InputSpec("image", F32, (1, 3, 16, 16)), InputSpec("mask", F32, (1, 1, 16, 16))]
    with pytest.raises(CalibrationDataError, match=r"exactly one input.*has 2 \('image', 'mask'\)"):
        _batches(tmp_path, inputs)


@pytest.mark.parametrize(
    "shape, dtype, options, message",
    [
        ([None, 4, 16, 16], F32, ImageOptions(), "4 channels in NCHW layout"),
        ([None, 3, 16, 16], F32, ImageOptions(channels=1), r"has 3 channel\(s\)"),
        ([None, 3, 16, 16], F32, ImageOptions(size=(8, 8)), "height 16"),
        ([None, 3, 16], F32, ImageOptions(), "needs rank 4"),
        ([None, 3, 16, 16], np.int64, ImageOptions(), "float or uint8 inputs only"),
        ([None, 1, 16, 16], F32, ImageOptions(mean=(1, 2, 3)), r"has 3 values.*1 channel"),
    ],
)
def test_options_that_do_not_fit_the_model(tmp_path: Path, shape, dtype, options, message) -> None:
    _solid(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(CalibrationDataError, match=message) as info:
        _batches(tmp_path, _spec(shape, dtype), options=options)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"size": (0, 4)}, {"size": (1, 2, 3)}, {"layout": "CHW"}, {"channels": 4}, {"resize": "crop"},
     {"std": 0}, {"mean": (1, 2)}, {"scale": -1}, {"crop_fraction": 1.5}, {"interpolation": "area"}],
)
def test_invalid_options(kwargs) -> None:
    with pytest.raises(ConfigError):
        ImageOptions(**kwargs)


def test_options_are_frozen_and_normalized() -> None:
    options = ImageOptions(size=[224, 200], mean=[0.5, 0.5, 0.5], std=2, layout="nhwc")
    assert options.size == (224, 200) and options.mean == (0.5, 0.5, 0.5) and options.std == 2.0
    assert options.layout == "NHWC"
    with pytest.raises(AttributeError):
        options.size = (1, 1)  # type: ignore[misc]
    hash(options)


def test_missing_pillow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _solid(tmp_path / "a.png", (1, 2, 3))
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(CalibrationDataError, match=r"needs Pillow: pip install 'ortq\[images\]'"):
        _batches(tmp_path, _spec([None, 3, 16, 16]))


def test_tensor_layouts_still_win_over_images(tmp_path: Path) -> None:
    _solid(tmp_path / "cover.png", (1, 2, 3))
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 16, 16), np.float32))
    (batch,) = _batches(tmp_path, _spec([None, 3, 16, 16]))
    np.testing.assert_array_equal(batch["x"], 0.0)


# -- end to end ------------------------------------------------------------------------------------------------
def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "image_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])],
        [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
         numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def test_quantize_from_an_image_folder(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    model = _conv_model()
    result = ortq.Toolkit(autoload=False).quantize(model, None, calibration_data=folder)
    assert result.calibration_samples == 5
    ops = [n.op_type for n in result.model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    lo, hi = result.ranges["x"]
    assert lo >= 0.0 and 0.9 < hi <= 1.0  # pixels / 255

    # explicit options through a reader bound to the model
    reader = ImageReader(folder, model, ImageOptions(mean=0.5, std=0.5, resize="shorter-side-crop"))
    result = ortq.Toolkit(autoload=False).quantize(model, None, calibration_data=reader)
    lo, hi = result.ranges["x"]
    assert -1.0 <= lo < -0.8 and 0.8 < hi <= 1.0

    # the same options as a quantize() argument
    result = ortq.Toolkit(autoload=False).quantize(
        model, None, calibration_data=folder, image_options=ImageOptions(mean=0.5, std=0.5, resize="shorter-side-crop")
    )
    lo2, hi2 = result.ranges["x"]
    assert (lo2, hi2) == (lo, hi)


def test_cli_image_flags(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ortq.api.cli import build_cli

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        _solid(folder / f"img{i}.png", (255, 0, 0))
    onnx.save(_conv_model(), tmp_path / "m.onnx")
    args = ["calibrate", str(tmp_path / "m.onnx"), "-d", str(folder), "-o", str(tmp_path / "s.json"),
            "--image-mean", "0.5,0.5,0.5", "--image-std", "0.5"]
    result = CliRunner().invoke(build_cli(ortq.Toolkit(autoload=False)), args)
    assert result.exit_code == 0, result.output
    state = ortq.CalibrationState.load(tmp_path / "s.json", ortq.Toolkit(autoload=False).statistic_types())
    assert (state.statistics["x"].min, state.statistics["x"].max) == (-1.0, 1.0)  # red = 1, green/blue = -1
