"""Models offloaded by accelerate: bring one part at a time into memory, change it, and store it back.

A model loaded with ``device_map=... , offload_folder=...`` or wrapped by ``accelerate.cpu_offload`` /
``disk_offload`` keeps its parameters on the ``meta`` device; an accelerate ``AlignDevicesHook`` on each module
loads them from an offload store (a CPU state dict, or memory-mapped files on disk) for every forward and drops them
after. lowbit's steps read and write weights, so they work on such a model part by part inside :func:`onloaded`:
the part's parameters are materialized on its execution device, forwards inside use them as they are (the hooks
stop reloading), and on exit the current values, quantized or rotated, are written back to the store and released.
Only the part being processed (one decoder layer for layer-streamed GPTQ) is in memory at a time.

For a model without offloading every function here is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _offload_hooks(module: nn.Module) -> list[tuple[nn.Module, object]]:
    """``(submodule, hook)`` for every submodule of ``module`` whose parameters accelerate offloads."""
    try:
        from accelerate.utils import has_offloaded_params
    except ImportError:  # accelerate not installed: nothing can be offloaded
        return []
    return [(m, m._hf_hook) for m in module.modules() if has_offloaded_params(m)]


def is_offloaded(module: nn.Module) -> bool:
    """True when some parameter under ``module`` lives in an accelerate offload store."""
    return bool(_offload_hooks(module))


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its offload hook's execution device, else the device of its first parameter."""
    hooks = _offload_hooks(module)
    if hooks and hooks[0][1].execution_device is not None:
        return torch.device(hooks[0][1].execution_device)
    return next(module.parameters()).device


def carry_hook(old: nn.Module, new: nn.Module) -> None:
    """Move an accelerate hook from a module to the module that replaces it (e.g. nn.Linear -> QuantLinear)."""
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)


def _tensors(module: nn.Module, hook) -> dict[str, torch.Tensor]:
    """The tensors the hook offloads for this module, by name (as accelerate's own hooks enumerate them)."""
    from accelerate.utils import named_module_tensors

    return dict(named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                                     remove_non_persistent=True))


def _store(weights_map, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into an accelerate offload store under ``name``, on disk when the store keeps it there.

    A weight that was read from the user's own safetensors checkpoint is never written there: it gets a new file in
    the store's offload folder (or stays in CPU memory when the store has no folder).
    """
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    dataset, key = weights_map, name
    if isinstance(weights_map, PrefixedDataset):
        dataset, key = weights_map.dataset, weights_map.prefix + name
    value = value.detach().to("cpu")
    if isinstance(dataset, OffloadedWeightsLoader):
        if key in dataset.state_dict or dataset.save_folder is None:
            dataset.state_dict[key] = value
        else:
            offload_weight(value, key, dataset.save_folder, index=dataset.index)
            if key not in dataset.all_keys:
                dataset.all_keys.append(key)
    else:
        dataset[key] = value


@contextmanager
def onloaded(module: nn.Module, device: torch.device | str | None = None) -> Iterator[None]:
    """Materialize every offloaded parameter under ``module`` (on ``device``, default the hook's execution device).

    Inside, the parameters are ordinary tensors: steps read and modify them, and forwards use them without the hook
    reloading stale values. On exit each one is written back to its offload store and released to ``meta``.
    """
    from accelerate.utils import set_module_tensor_to_device

    hooked = _offload_hooks(module)
    for sub, hook in hooked:
        target = device if device is not None else hook.execution_device
        for name in _tensors(sub, hook):
            set_module_tensor_to_device(sub, name, target, value=hook.weights_map[name].clone())  # tied: no aliasing
        hook.offload = False
    try:
        yield
    finally:
        for sub, hook in hooked:
            hook.offload = True
            for name, tensor in _tensors(sub, hook).items():
                _store(hook.weights_map, name, tensor)
                set_module_tensor_to_device(sub, name, "meta")


@contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[None]:
    """``module`` computing on ``device`` for the duration: onloaded when offloaded, else moved there and back."""
    if is_offloaded(module):
        with onloaded(module, device):
            yield
        return
    origin = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(origin)
