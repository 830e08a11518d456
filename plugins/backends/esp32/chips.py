"""What each Espressif chip's ESP-DL kernels expect: rounding, weight granularity, bias width, filter layout.

Every number here was looked up; where it was not findable the choice is marked as ours.

Sources (read through the search tool; stored public copies):

* [SPEC] ESP-DL quantization specification, ``espressif/esp-dl`` ``docs/en/tools/quantization-toolkit/
  quantization-specification.rst`` (also https://docs.espressif.com/projects/esp-dl/en/latest/esp32/tools/
  quantization-toolkit/quantization-specification.html): ``real_value = int_value * 2^exponent``, signed
  int8 / int16, symmetric (no zero point); int16 is per-tensor only, int8 per-tensor or per-channel; Concat,
  MaxPool, ReLU, Reshape, Flatten keep their input's exponent.
* [TOOLKIT] ESP-DL quantization toolkit overview and API (``quantization-toolkit-overview.rst``,
  ``quantization-toolkit-api.rst``): ``Calibrator(quantization_bit='int8'|'int16', granularity, calib_method=
  'minmax'|'entropy')`` (int16: per-tensor + minmax only), ``export_coefficient_to_cpp(model, pickle,
  target_chip, output_path, file_name)``, ``Evaluator(...)`` simulating the chip; the optimizer step folds
  BatchNormalization and Add-bias into Conv (onnxoptimizer ``fuse_bn_into_conv``, ``fuse_add_bias_into_conv``)
  and makes the batch dimension dynamic.
* [TUTORIAL] ``docs/en/tutorials/how_to_quantize_model.rst`` (ESP-DL v3): rounding is ROUND_HALF_UP on ESP32
  and ESP32-S3, ROUND_HALF_EVEN on ESP32-P4; "symmetric quantization + POWER OF TWO"; the docs site's
  version adds that ESP32 uses per-tensor quantization.
* [PPQ-Q] ``espressif/esp-ppq`` ``esp_ppq/quantization/quantizer/EspdlQuantizer.py``: per platform
  (bits, bias bits, rounding) = P4 int8 (8, 32, HALF_EVEN), P4 int16 (16, 40, HALF_EVEN), S3 int8
  (8, 20, HALF_UP), S3 int16 (16, 40, HALF_UP), C/ESP32 int8 (8, 32, HALF_UP), C int16 (16, 64, HALF_UP);
  Conv/ConvTranspose/Gemm weights (and biases) per-channel on the P4 platforms only, everything else
  per-tensor, power-of-two, symmetric; Softmax's output stays float.
* [PPQ-LAYOUT] ``esp_ppq/parser/espdl/export_patterns.py`` (``ResetParamLayoutPattern``): ESP32 (the C
  kernels) stores a Conv filter in NHWC element order (depthwise: HWCN); ESP32-S3 and ESP32-P4 store output
  channels in blocks of 16 (int8) or 8 (int16), each block as H, W, C, then the block's channels innermost
  ("N16HWC16" / "N8HWC8"), the remainder channels after them in NHWC order (depthwise remainder CHWN). A Gemm
  weight is transposed to [K, N] and laid out as a 1x1 Conv filter. Activations are NHWC.
* [PPQ-ROUND] ``ppq/utils/round.py`` (OpenPPL ppq, which esp-ppq forks): on tensors ROUND_HALF_UP is
  ``floor(x + 0.5)`` (ties towards +inf), ROUND_HALF_EVEN is banker's rounding.
* [DL-CONST] ``espressif/esp-dl`` ``include/typedef/dl_constant.hpp``: ``dl::Constant<T>{element, exponent,
  shape}``, ``dl::Filter<T>(element, exponent, shape, dilation)`` and the per-channel
  ``Filter(element, const int8_t *channel_exponent, channel_exponent_size, shape, dilation)``, filter shape
  fixed as [filter_height, filter_width, input_channel, output_channel] ([h, w, c, 1] for depthwise) "but
  the element sequence depends on the optimization method"; ``dl::Bias<T>``; ``dl::Activation<T>(type,
  element, exponent, shape)`` with ``dl::activation_type_t {Linear, ReLU, LeakyReLU, PReLU}``
  (``dl_define.hpp``).

Our choices where the sources are silent or disagree:

* Bias element type: ESP-DL v1's ``dl::Bias<T>`` shares the feature type, while ESP-DL v3 (esp-ppq) stores
  biases at the accumulator's exponent with the bias widths above. We follow v3's arithmetic and emit
  ``dl::Bias<int32_t>`` for widths up to 32 bits and ``dl::Bias<int64_t>`` for 40 and 64, values saturated
  to the chip's width. Linking against the real ESP-DL v1 library may need those template instantiations.
* Accumulator width: taken to be the bias width (the S3's 20-bit int8 lanes match its 20-bit bias). Whether
  the hardware wraps or saturates on overflow was not findable; the evaluator accumulates exactly and the
  export report flags layers whose worst case could exceed that width.
* Per-channel on int16 P4 follows esp-ppq (per-channel for every P4 Conv/Gemm); the v1 spec's "int16 is
  per-tensor" is followed on ESP32 and ESP32-S3.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChipSpec", "CHIPS", "chip_spec", "HALF_UP", "HALF_EVEN"]

HALF_UP = "ROUND_HALF_UP"
HALF_EVEN = "ROUND_HALF_EVEN"


@dataclass(frozen=True)
class ChipSpec:
    """One chip at one bit width."""

    chip: str
    bits: int
    rounding: str  # HALF_UP or HALF_EVEN, for every requantizing shift
    per_channel: bool  # Conv/Gemm/MatMul weights
    bias_bits: int  # bias (and accumulator) width
    blocked_filters: bool  # N{align}HWC{align} filter blocks (S3/P4) instead of NHWC (ESP32's C kernels)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def ctype(self) -> str:
        return f"int{self.bits}_t"

    @property
    def bias_ctype(self) -> str:
        return "int32_t" if self.bias_bits <= 32 else "int64_t"

    @property
    def bias_min(self) -> int:
        return -(1 << (self.bias_bits - 1))

    @property
    def bias_max(self) -> int:
        return (1 << (self.bias_bits - 1)) - 1

    @property
    def align(self) -> int:
        """Output channels per filter block on S3/P4 (16 for int8, 8 for int16) [PPQ-LAYOUT]."""
        return 16 if self.bits == 8 else 8


# (chip, bits) -> spec; see the module docstring for where each entry comes from.
CHIPS: dict[tuple[str, int], ChipSpec] = {
    ("esp32", 8): ChipSpec("esp32", 8, HALF_UP, False, 32, False),
    ("esp32", 16): ChipSpec("esp32", 16, HALF_UP, False, 64, False),
    ("esp32s3", 8): ChipSpec("esp32s3", 8, HALF_UP, False, 20, True),
    ("esp32s3", 16): ChipSpec("esp32s3", 16, HALF_UP, False, 40, True),
    ("esp32p4", 8): ChipSpec("esp32p4", 8, HALF_EVEN, True, 32, True),
    ("esp32p4", 16): ChipSpec("esp32p4", 16, HALF_EVEN, True, 40, True),
}


def chip_spec(chip: str, bits: int) -> ChipSpec:
    try:
        return CHIPS[(chip, bits)]
    except KeyError:
        chips = sorted({c for c, _ in CHIPS})
        raise ValueError(f"unsupported chip/bits {chip!r}/{bits}; chips: {', '.join(chips)}; bits: 8 or 16") from None
