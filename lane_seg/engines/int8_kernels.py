"""
Which ONNX Runtime int8 form computes exactly on this CPU.

The ONNX Runtime form of an int8 model (``*_int8_ort.onnx``) has uint8 activations and int8
weights, so that ONNX Runtime runs its u8s8 kernels. On x86 those are exact only with VNNI
(``vpdpbusd``: AVX512-VNNI, AVX-VNNI, or AMX): without it they multiply with ``vpmaddubsw``,
which saturates the sum of two u8 x s8 products at 16 bits, and some outputs come out wrong
(ONNX Runtime's own quantization guide warns about it). The same numbers with the weights
re-expressed as uint8 around zero point 128 (``*_int8_u8u8.onnx``: w_u8 = w_s8 + 128) run
u8u8 kernels, which widen to 16 bits first and are exact everywhere, at some cost in speed.

:func:`int8_kernels` chooses by CPU; ``LANE_SEG_INT8_KERNELS=u8s8`` or ``u8u8`` overrides it.
"""

import os
import platform

ENV = 'LANE_SEG_INT8_KERNELS'
KERNELS = ('u8s8', 'u8u8')
VNNI_FLAGS = ('avx512_vnni', 'avx_vnni', 'amx_int8')
X86 = ('x86_64', 'amd64', 'i386', 'i686', 'x86')


def cpu_flags(path='/proc/cpuinfo'):
    """
    Return the CPU's feature flags, or None where they cannot be read.

    From ``/proc/cpuinfo`` on Linux; elsewhere (macOS, Windows) from the features NumPy
    detected, which name AVX512-VNNI but not AVX-VNNI (such CPUs then get the exact u8u8 form).
    """
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            for line in f:
                if line.startswith('flags'):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        return numpy_flags()
    return numpy_flags()


def numpy_flags():
    """Return the x86 features NumPy detected, named as in /proc/cpuinfo, or None."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        return None
    names = {'AVX2': 'avx2', 'AVX512F': 'avx512f', 'AVX512VNNI': 'avx512_vnni'}
    return {flag for key, flag in names.items() if features.get(key)}


def u8s8_exact(machine=None, flags=None) -> tuple:
    """``(exact, reason)``: whether ONNX Runtime's u8s8 kernels are exact on this CPU."""
    machine = (machine or platform.machine()).lower()
    if machine not in X86:
        return True, f'{machine} CPU (u8s8 kernels widen before adding)'
    if flags is None:
        flags = cpu_flags()
    if flags is None:
        return False, 'x86 CPU whose flags cannot be read: VNNI not assumed'
    found = [f for f in VNNI_FLAGS if f in flags]
    if found:
        return True, f'x86 CPU with VNNI ({found[0]})'
    return False, 'x86 CPU without VNNI: u8s8 kernels saturate'


def int8_kernels(env=None, machine=None, flags=None) -> tuple:
    """``(kernels, reason)``: 'u8s8' (fastest) or 'u8u8' (exact without VNNI) for this CPU."""
    env = os.environ if env is None else env
    forced = env.get(ENV, '').strip().lower()
    if forced:
        if forced not in KERNELS:
            raise ValueError(f'{ENV}={forced!r} is not one of {", ".join(KERNELS)}')
        return forced, f'{ENV}={forced}'
    exact, why = u8s8_exact(machine, flags)
    return ('u8s8' if exact else 'u8u8'), why
