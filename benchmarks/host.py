"""The host a benchmark ran on, in one line: CPU model, usable cores, and the ISA flags that
decide which kernels XLA and PyTorch's oneDNN can use (AVX-512 families, AMX).

Benchmark ratios differ between CPU kinds (an Intel Xeon with AMX vs an AMD EPYC), so every
table says where it was measured.
"""

from __future__ import annotations

import os
import platform
from typing import Optional

# The flags (as /proc/cpuinfo spells them) that change which CPU kernels are fast.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def parse_cpuinfo(text: str) -> tuple:
  """(model name or None, the ISA_FLAGS present, in ISA_FLAGS order) of /proc/cpuinfo text."""
  model, flags = None, set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and model is None:
      model = value.strip()
    elif key == "flags" and not flags:
      flags = set(value.split())
  return model, tuple(f for f in ISA_FLAGS if f in flags)


def describe(cpuinfo_text: Optional[str] = None, cores: Optional[int] = None) -> str:
  """'host: <model>, <n> cores, ISA: <flags>' for this machine (or the given cpuinfo text)."""
  if cpuinfo_text is None:
    try:
      with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpuinfo_text = f.read()
    except OSError:
      cpuinfo_text = ""
  model, flags = parse_cpuinfo(cpuinfo_text)
  model = model or platform.processor() or platform.machine() or "unknown CPU"
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"host: {model}, {cores} cores, ISA: {' '.join(flags) or 'none of ' + ' '.join(ISA_FLAGS)}"
