"""Test-only shims that let megatron-core 0.16.1 run on a CPU-only torch under gloo.

megatron-core allocates with `device="cuda"` / `torch.cuda.current_device()` in the schedules,
p2p and attention code, and its RNG tracker stores CUDA RNG states. These shims redirect those
to the CPU (see shared/research/cpu_feasibility.md §1.4). They monkeypatch torch and megatron
globally, so call `apply()` only inside spawned test processes, and re-check them on every
megatron-core upgrade. Nothing under nemo_paced/ may import this module.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device: object) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrite `device="cuda"` in every torch call to the CPU, and make `Tensor.cuda()` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)


_mode: _CudaToCpu | None = None


def apply() -> None:
    """Install the shims in this process (idempotent)."""
    global _mode
    if _mode is not None:
        return
    _mode = _CudaToCpu()
    _mode.__enter__()
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None

    from megatron.core.tensor_parallel import random as mrandom

    class CpuRngStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG streams, kept as CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRngStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
