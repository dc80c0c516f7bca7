"""Canaries: each shim's upstream line is still where it says, and the shims do what they claim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _pythonpath
from shims import SHIMS


@pytest.mark.parametrize("shim", SHIMS, ids=[s.name for s in SHIMS])
def test_upstream_line_is_still_there(shim):
    line = shim.source_line()
    assert shim.expected in line, (f"{shim.module}:{shim.line} changed ({line.strip()!r}); re-check the "
                                   f"{shim.name} shim: {shim.why}")


def test_shims_import_bridge_without_te_and_megatron_core_still_sees_no_te():
    code = """
import shims, sys, torch
shims.apply()
import megatron.bridge
from megatron.bridge.models.distillation_provider import convert_to_distillation_provider
from megatron.core.extensions import transformer_engine as te_ext
assert 'transformer_engine' not in sys.modules, 'the fake TE outlived lora_layers'
assert not te_ext.HAVE_TE, 'megatron-core saw a Transformer Engine'
assert torch.zeros(2, device='cuda').device.type == 'cpu'
assert torch.zeros(2).type() == 'torch.cuda.FloatTensor'
from megatron.core.tensor_parallel import random as r
s = r._get_cuda_rng_state(); torch.rand(3); r._set_cuda_rng_state(s); a = torch.rand(3); r._set_cuda_rng_state(s)
assert torch.equal(a, torch.rand(3))
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": _pythonpath()}, cwd=Path(__file__).parent)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
