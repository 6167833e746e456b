"""What `pretrain.precision: auto` and `pretrain.channels_last: null` mean on the device at hand.

On a GPU: bf16 autocast and channels_last. On a CPU with native bf16 instructions (AVX512-BF16 or AMX, checked
through torch): the same pair. Measured on this project's 2-core AVX512-BF16 CPU (no AMX), one SimCLR step of
the digits model (batch 64, 1 thread): bf16 + channels_last 1.6-2.0x faster than fp32, while either one alone
gained little or lost (channels_last alone 0.8-1.3x, bf16 alone 1.0-1.4x); the digits kNN accuracy after
pretraining stayed within its run-to-run spread (see bench/README.md). Without native bf16 torch emulates it
(measured on a 2-core AVX2 AMD EPYC: a step 10x slower), so bf16 stays off there; on such an AVX2 CPU (torch's
CPU capability "AVX2") channels_last alone made the step of the digits and the photos model 1.23-1.37x faster in
fp32 (`selfsup bench --parts formats`, bench/README.md) and is on. Other CPUs (AVX512 without bf16, ARM): fp32,
the default memory format, until measured.
"""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matrix work natively (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    for check in checks:
        try:
            if check is not None and check():
                return True
        except (RuntimeError, AttributeError):
            continue
    return False


def cpu_capability() -> str:
    """torch's name for the widest vector instructions its CPU kernels use here ("AVX2", "AVX512", "DEFAULT", ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (RuntimeError, AttributeError):
        return "DEFAULT"


def fast_formats(device: torch.device | str) -> bool:
    """Whether bf16 autocast + channels_last is the faster step on `device` (what `auto`/null pick)."""
    d = torch.device(device)
    return d.type == "cuda" or (d.type == "cpu" and cpu_has_native_bf16())


def channels_last_faster(device: torch.device | str) -> bool:
    """Whether the channels_last memory format is the faster step on `device` (what `channels_last: null` picks):
    with bf16 where that is native (`fast_formats`), and in fp32 on an AVX2 CPU."""
    d = torch.device(device)
    return fast_formats(d) or (d.type == "cpu" and cpu_capability() == "AVX2")


def resolve_precision(precision: str, channels_last: bool | None, device: torch.device | str) -> tuple[bool, bool]:
    """(bf16 autocast on, channels_last on) for the `pretrain.precision` and `pretrain.channels_last` settings."""
    bf16 = precision == "bf16" or (precision == "auto" and fast_formats(device))
    cl = channels_last_faster(device) if channels_last is None else bool(channels_last)
    return bf16, cl


def smallest_conv_input(model: torch.nn.Module, in_chans: int, image_size: int) -> int:
    """The smallest height or width of any feature map entering a convolution of `model` at `image_size`
    (one fp32 forward pass of a copy, in eval mode, on two blank images)."""
    import copy

    m = copy.deepcopy(model).float().eval()
    sizes: list[int] = []
    hooks = [mod.register_forward_pre_hook(lambda _m, args: sizes.append(min(args[0].shape[-2:])))
             for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            m(torch.zeros(2, in_chans, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    return min(sizes) if sizes else image_size


def resolve_for_model(precision: str, channels_last: bool | None, model: torch.nn.Module, in_chans: int,
                      image_size: int, device: torch.device | str) -> tuple[bool, bool]:
    """`resolve_precision`, except that on a CPU what `auto` and null picked falls back to fp32 and the default
    memory format when a convolution of `model` sees 1x1 feature maps at `image_size`. There oneDNN's bf16
    channels_last backward gave non-finite weight gradients, intermittently (measured: the default stem on 8 px
    images, whose layers 2-4 run on 1x1 maps; a conv alone on 1x1 maps failed in some trials and not others);
    channels_last alone there is not known to be safe either. The digits model (small stem, 16 px: 2x2 at its
    smallest) ran 20 epochs on 2 workers with no non-finite step."""
    bf16, cl = resolve_precision(precision, channels_last, device)
    picked_bf16, picked_cl = precision == "auto" and bf16, channels_last is None and cl
    if torch.device(device).type == "cpu" and (picked_bf16 or picked_cl):
        if smallest_conv_input(model, in_chans, image_size) < 2:
            return bf16 and not picked_bf16, cl and not picked_cl
    return bf16, cl
