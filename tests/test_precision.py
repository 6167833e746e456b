"""What `pretrain.precision: auto` and `pretrain.channels_last: null` resolve to (pretrain/precision.py)."""

from __future__ import annotations

import torch

from pretrain.precision import cpu_has_native_bf16, resolve_precision


def test_explicit_settings_win_everywhere():
    assert resolve_precision("fp32", False, "cpu") == (False, False)
    assert resolve_precision("bf16", True, "cpu") == (True, True)
    assert resolve_precision("fp32", None, "cuda") == (False, True)


def test_auto_on_cpu_follows_native_bf16():
    """bf16 + channels_last together on a CPU with AVX512-BF16/AMX (measured faster there), fp32 otherwise."""
    native = cpu_has_native_bf16()
    assert native == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert resolve_precision("auto", None, "cpu") == (native, native)
    assert resolve_precision("auto", None, "cuda") == (True, True)


def test_auto_falls_back_to_fp32_where_the_fast_formats_fail():
    """The default stem on 8 px images (1x1 maps in layers 2-4): oneDNN's bf16 channels_last backward gave
    non-finite gradients there, so `auto` keeps fp32; the digits model at 16 px (2x2 at its smallest) gets both."""
    from pretrain.model import SimCLRModel, build_backbone
    from pretrain.precision import resolve_for_model, smallest_conv_input

    if not cpu_has_native_bf16():
        return  # auto is fp32 on this CPU anyway
    tiny = SimCLRModel(build_backbone("resnet18", 1, "default", {"channels": [8, 16, 32, 64]}), 64, 32)
    assert smallest_conv_input(tiny, 1, 8) == 1
    assert resolve_for_model("auto", None, tiny, 1, 8, "cpu") == (False, False)
    assert resolve_for_model("bf16", True, tiny, 1, 8, "cpu") == (True, True)  # asked for: as asked
    digits = SimCLRModel(build_backbone("resnet18", 1, "small", {"channels": [32, 64, 128, 256]}))
    assert smallest_conv_input(digits, 1, 16) == 2
    assert resolve_for_model("auto", None, digits, 1, 16, "cpu") == (True, True)
