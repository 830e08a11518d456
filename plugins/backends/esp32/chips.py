"""What each Espressif chip's ESP-DL kernels expect: rounding, weight granularity, bias type and exponent,
filter layout, per ESP-DL firmware generation (v1.1 for the C++ coefficient export, v3 for ``.espdl``).

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

* [V1.1] ESP-DL release/v1.1 (``../shared/espdl/v1.1``: its ``include/`` and Espressif's tutorial export
  ``tutorial/quantization_tool_example/model/mnist_coefficient.cpp`` / ``mnist_model.hpp``), the firmware the
  C++ coefficient export targets; v1.1 supports esp32, esp32s2, esp32s3 and esp32c3 (the toolkit API's
  ``target_chip``). ``dl::layer::Conv2D<feature_t, bias_t = feature_t>`` (also ``DepthwiseConv2D``,
  ``FullyConnected``): ``bias_t`` is ``int8_t`` for int8 per-tensor, ``int16_t`` for int16 and for int8
  per-channel. Per-tensor biases are stored at the layer's *output* exponent in the activation type: the
  tutorial's int16 layers have bias exponents -11, -11, -9, equal to the output exponents its
  ``mnist_model.hpp`` passes to ``Conv2D``. Per-channel (int8 only; the toolkit allows int16 per-tensor only)
  biases are ``int16_t`` stored at ``input + weight[c] + 4`` with the ``dl::Bias`` object's exponent -128 (a
  marker, not a scale); this rule is from the issue that asked for this export (Espressif's calibrator output),
  not checkable in the headers, which only declare the kernels.

Our choices where the sources are silent or disagree:

* ESP-DL v3 (esp-ppq, the ``.espdl`` export; ``esp32s3`` and ``esp32p4``) stores biases at the accumulator's
  exponent with the bias widths above; ESP-DL v1.1 (the C++ export) as [V1.1] says. A spec carries its
  firmware (``esp_dl``) and the bias rule goes with it. ESP32-P4 has no v1.1 release, so its specs are v3.
* Accumulator width: taken to be 32 bits on v1.1 and the bias width on v3 (the S3's 20-bit int8 lanes match
  its 20-bit bias). Whether the hardware wraps or saturates on overflow was not findable; the evaluator
  accumulates exactly and the export report flags layers whose worst case could exceed that width.
* Rounding on v1.1 is taken to be half-up, as v3 documents for ESP32 and ESP32-S3; ESP32-S2 and ESP32-C3 use
  v1.1's C kernels with ESP32's NHWC filter order.
* Per-channel on int16 P4 follows esp-ppq (per-channel for every P4 Conv/Gemm); the v1 spec's "int16 is
  per-tensor" is followed on the v1.1 chips.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChipSpec", "CHIPS", "ALL_CHIPS", "V1_CHIPS", "V3_CHIPS", "chip_spec", "default_esp_dl", "HALF_UP", "HALF_EVEN"]

HALF_UP = "ROUND_HALF_UP"
HALF_EVEN = "ROUND_HALF_EVEN"


@dataclass(frozen=True)
class ChipSpec:
    """One chip at one bit width, for one ESP-DL firmware generation (``esp_dl``: "1.1" or "3")."""

    chip: str
    bits: int
    rounding: str  # HALF_UP or HALF_EVEN, for every requantizing shift
    per_channel: bool  # Conv/Gemm/MatMul weights, by default
    bias_bits: int  # v3: bias (and accumulator) width; v1.1: the per-tensor bias width (= bits)
    blocked_filters: bool  # N{align}HWC{align} filter blocks (S3/P4) instead of NHWC (the C kernels)
    esp_dl: str = "3"

    @property
    def v1(self) -> bool:
        """ESP-DL v1.1 (the C++ coefficient export) rather than v3 (``.espdl``)."""
        return self.esp_dl == "1.1"

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
        """The per-tensor bias's C type (see :meth:`bias_format` for per-channel)."""
        return self.bias_format(False)[0]

    @property
    def bias_min(self) -> int:
        return -(1 << (self.bias_bits - 1))

    @property
    def bias_max(self) -> int:
        return (1 << (self.bias_bits - 1)) - 1

    @property
    def accumulator_bits(self) -> int:
        return 32 if self.v1 else self.bias_bits

    def bias_format(self, per_channel: bool) -> tuple[str, int]:
        """(C element type, saturation width in bits) of a layer's bias.

        v1.1: the activation type per tensor, ``int16_t`` per channel (int8 only); v3: 32 or 64-bit integers
        saturated to the chip's bias width."""
        if self.v1:
            bits = 16 if per_channel else self.bits
            return f"int{bits}_t", bits
        return ("int32_t" if self.bias_bits <= 32 else "int64_t"), self.bias_bits

    @property
    def align(self) -> int:
        """Output channels per filter block on S3/P4 (16 for int8, 8 for int16) [PPQ-LAYOUT]."""
        return 16 if self.bits == 8 else 8


#: Chips per firmware: ESP-DL v1.1 (C++ coefficients) and v3 (``.espdl`` model files).
V1_CHIPS = ("esp32", "esp32s2", "esp32s3", "esp32c3")
V3_CHIPS = ("esp32s3", "esp32p4")

# (chip, bits, esp_dl) -> spec; see the module docstring for where each entry comes from.
CHIPS: dict[tuple[str, int, str], ChipSpec] = {
    **{
        (chip, bits, "1.1"): ChipSpec(chip, bits, HALF_UP, False, bits, chip == "esp32s3", "1.1")
        for chip in V1_CHIPS for bits in (8, 16)
    },
    ("esp32s3", 8, "3"): ChipSpec("esp32s3", 8, HALF_UP, False, 20, True),
    ("esp32s3", 16, "3"): ChipSpec("esp32s3", 16, HALF_UP, False, 40, True),
    ("esp32p4", 8, "3"): ChipSpec("esp32p4", 8, HALF_EVEN, True, 32, True),
    ("esp32p4", 16, "3"): ChipSpec("esp32p4", 16, HALF_EVEN, True, 40, True),
}

ALL_CHIPS = tuple(sorted({c for c, _, _ in CHIPS}))


def default_esp_dl(chip: str) -> str:
    """The firmware a chip's export targets by default: v1.1 where it exists, else v3 (ESP32-P4)."""
    return "1.1" if chip in V1_CHIPS else "3"


def chip_spec(chip: str, bits: int, esp_dl: str | None = None) -> ChipSpec:
    esp_dl = esp_dl or default_esp_dl(chip)
    try:
        return CHIPS[(chip, bits, esp_dl)]
    except KeyError:
        if chip in ALL_CHIPS and bits in (8, 16):
            have = V1_CHIPS if esp_dl == "1.1" else V3_CHIPS
            raise ValueError(f"ESP-DL {esp_dl} does not run on {chip} (it runs on {', '.join(have)})") from None
        raise ValueError(
            f"unsupported chip/bits {chip!r}/{bits}; chips: {', '.join(ALL_CHIPS)}; bits: 8 or 16"
        ) from None
