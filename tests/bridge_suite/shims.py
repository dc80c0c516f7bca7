"""Test-only shims that let Megatron Bridge 0.6.2 on megatron-core 0.19.2 train on a CPU under gloo.

Each `Shim` names the upstream file:line it works around and a line of text expected there;
`test_bridge_shims.py` checks every one against the installed source, so an upgrade that moves or
removes it fails loudly instead of silently changing what runs. `apply()` installs them all in the
calling process (the suite's torchrun workers; never the pytest process, never nemo_paced/). Why
each is needed: shared/research/bridge_cpu.md. Versions are pinned in requirements/bridge.txt.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import importlib.machinery
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class Shim:
    name: str
    module: str  # the upstream module holding `line`
    line: int  # 1-based line of `expected` in that module's file
    expected: str
    why: str

    def source_line(self) -> str:
        """The upstream line, read from the installed file without importing it."""
        top, *rest = self.module.split(".")
        for root in importlib.util.find_spec(top).submodule_search_locations:
            path = Path(root, *rest[:-1], rest[-1] + ".py")
            if path.exists():
                return path.read_text().splitlines()[self.line - 1]
        raise FileNotFoundError(f"{self.module} is not installed")


SHIMS = [
    Shim("fake_te_for_lora_layers", "megatron.bridge.peft.lora_layers", 20, "import transformer_engine.pytorch as te",
         "every `import megatron.bridge` reaches this unguarded Transformer Engine import (via AutoBridge -> peft); "
         "a fake TE is visible only while this module executes, so megatron-core keeps seeing no TE"),
    Shim("allow_no_cuda", "megatron.bridge.training.initialize", 91, 'assert torch.cuda.is_available(), "Megatron',
         "initialize_megatron asserts CUDA unless allow_no_cuda=True, which setup.py:253 never passes"),
    Shim("no_compile_helpers", "megatron.bridge.training.initialize", 147, "compile_helpers()",
         "runs `make` on megatron-core's dataset helpers; the wheel ships them prebuilt and no Makefile, so it exits"),
    Shim("seed_rng_tracker", "megatron.bridge.training.initialize", 869, "if torch.cuda.device_count() > 0:",
         "the model-parallel RNG tracker (used by tensor_parallel/layers.py weight init) is seeded only with a GPU"),
    Shim("cpu_rng_state", "megatron.core.tensor_parallel.random", 104, "def _get_cuda_rng_state(",
         "the RNG tracker saves and restores CUDA generator states; point it at the CPU generator"),
    Shim("cuda_devices_on_cpu", "megatron.bridge.training.setup", 281, 'device="cuda")',
         "device='cuda', .cuda() and torch.cuda.current_device() throughout the loop (also train.py:1461, "
         "gpt_step.py:266, tensor_parallel/layers.py:305); a torch function mode rewrites them to the CPU"),
    Shim("cuda_tensor_type", "megatron.core.optimizer.clip_grads", 174, "assert param.grad.type() == 'torch.cuda.FloatTensor'",
         "gradient clipping asserts CUDA fp32 gradients; Tensor.type() reports torch.cuda.* under the same mode"),
    Shim("cuda_bookkeeping", "megatron.bridge.training.train", 1030, "torch.cuda.synchronize()",
         "synchronize, empty_cache, memory statistics, streams, events and NVTX ranges become no-ops"),
    Shim("hide_old_nvrx_async", "megatron.core.dist_checkpointing.strategies.nvrx", 45, "is_nvrx_min_version()",
         "nvidia-resiliency-ext >= 0.6 has wheels for glibc 2.39 only; with 0.4.1 (what installs on Debian 12) "
         "megatron-core asserts on import once NVRx's async checkpointing modules import, so they are made "
         "unimportable and megatron-core uses its own (the suite saves synchronously anyway)"),
]


def _is_cuda(device: object) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):  # an ordinal, as torch.cuda.current_device() gives
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu(value: object) -> object:
    return "cpu" if _is_cuda(value) else value


class CudaOnCpu(TorchFunctionMode):
    """`device="cuda"` and `.to("cuda")` go to the CPU, `.cuda()` / `.pin_memory()` return the tensor,
    and `Tensor.type()` names CPU tensors as CUDA ones (for clip_grads' assert)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _cpu(kwargs["device"])}
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) for a in args)
        return func(*args, **kwargs)


class _Placeholder(type):
    """A class whose every class attribute is another placeholder class (te.ops.Sequential, ...)."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _FakeTE(types.ModuleType):
    """A stand-in for `transformer_engine(.pytorch)`: any attribute is a placeholder class."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _LoraLayersFinder(importlib.abc.MetaPathFinder):
    """Loads megatron.bridge.peft.lora_layers with a fake TE in sys.modules for its execution only."""

    target = "megatron.bridge.peft.lora_layers"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            fakes = {"transformer_engine": _FakeTE("transformer_engine"),
                     "transformer_engine.pytorch": _FakeTE("transformer_engine.pytorch")}
            fakes["transformer_engine"].pytorch = fakes["transformer_engine.pytorch"]
            saved = {name: sys.modules.get(name) for name in fakes}
            sys.modules.update(fakes)
            try:
                real_exec(module)
            finally:
                for name, value in saved.items():
                    if value is None:
                        sys.modules.pop(name, None)
                    else:
                        sys.modules[name] = value

        spec.loader.exec_module = exec_module
        return spec


class _HiddenModules(importlib.abc.MetaPathFinder):
    """Makes `prefix` and its submodules fail to import, as if not installed."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def find_spec(self, fullname, path, target=None):
        if fullname == self.prefix or fullname.startswith(self.prefix + "."):
            raise ModuleNotFoundError(f"{fullname} hidden by the Bridge suite's shims", name=fullname)
        return None


def _noops(names: list[str]) -> dict[str, Callable]:
    """One distinct no-op function per name (torch/_dynamo/trace_rules.py:3069 rejects shared objects)."""
    return {name: (lambda *args, **kwargs: None) for name in names}


class _NoStream:
    def __init__(self, *args, **kwargs): ...
    def __enter__(self): return self
    def __exit__(self, *exc): return False
    def wait_stream(self, *args, **kwargs): ...
    def wait_event(self, *args, **kwargs): ...
    def record_event(self, *args, **kwargs): return _NoStream()
    def record(self, *args, **kwargs): ...
    def synchronize(self, *args, **kwargs): ...
    def query(self): return True
    def elapsed_time(self, *args): return 0.0


_mode: CudaOnCpu | None = None


def apply() -> None:
    """Install every shim in this process (idempotent); call before importing megatron.bridge."""
    global _mode
    if _mode is not None:
        return
    # hide_old_nvrx_async: before megatron-core probes it
    sys.meta_path.insert(0, _HiddenModules("nvidia_resiliency_ext.checkpointing.async_ckpt"))
    # fake_te_for_lora_layers: megatron-core is imported first, with no TE in sight
    import megatron.core  # noqa: F401

    sys.meta_path.insert(0, _LoraLayersFinder())
    # cuda_devices_on_cpu, cuda_tensor_type
    _mode = CudaOnCpu()
    _mode.__enter__()
    # cuda_bookkeeping
    torch.cuda.current_device = lambda: 0
    for name, fn in _noops(["synchronize", "empty_cache", "reset_peak_memory_stats", "reset_max_memory_allocated",
                            "set_device", "ipc_collect", "set_stream"]).items():
        setattr(torch.cuda, name, fn)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(torch.cuda, name, (lambda *args, **kwargs: 0))
    torch.cuda.memory_stats = lambda *args, **kwargs: {}
    torch.cuda.mem_get_info = lambda *args, **kwargs: (0, 0)
    torch.cuda.Stream = torch.cuda.Event = _NoStream
    torch.cuda.current_stream = torch.cuda.default_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    for name, fn in _noops(["range_push", "range_pop", "mark"]).items():
        setattr(torch.cuda.nvtx, name, fn)
    torch.cuda.nvtx.range = lambda *args, **kwargs: contextlib.nullcontext()

    import megatron.bridge.training.initialize as initialize
    import megatron.bridge.training.setup as setup
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    # allow_no_cuda
    setup.initialize_megatron = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
    # no_compile_helpers
    initialize.compile_helpers = lambda: None
    # cpu_rng_state
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # the tracker's add() (random.py:303-306) seeds and reads "the CUDA generator": the CPU one here
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)  # (torch.manual_seed calls
    # torch.cuda.manual_seed_all, which stays a lazy no-op without a GPU)
    # seed_rng_tracker: seed the tracker as initialize.py:869-881 does with a GPU (no TE tracker)
    set_random_seed = initialize._set_random_seed

    @functools.wraps(set_random_seed)
    def seeded(seed_, data_parallel_random_init=False, *args, pg_collection, **kwargs):
        set_random_seed(seed_, data_parallel_random_init, *args, pg_collection=pg_collection, **kwargs)
        rank = torch.distributed.get_rank()
        seed = seed_ + 100 * torch.distributed.get_group_rank(pg_collection.pp, rank)
        if data_parallel_random_init:
            seed += 10 * torch.distributed.get_group_rank(pg_collection.dp, rank)
        tensor_parallel.model_parallel_cuda_manual_seed(
            seed, tp_rank=torch.distributed.get_group_rank(pg_collection.tp, rank),
            ep_rank=torch.distributed.get_group_rank(pg_collection.ep, rank),
            etp_rank=torch.distributed.get_group_rank(pg_collection.expt_tp, rank))

    initialize._set_random_seed = seeded
