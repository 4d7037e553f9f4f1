"""Models offloaded by accelerate: bring one part at a time into memory, change it, and store it back.

A model loaded with ``device_map=... , offload_folder=...`` or wrapped by ``accelerate.cpu_offload`` /
``disk_offload`` keeps its parameters on the ``meta`` device; an accelerate ``AlignDevicesHook`` on each module
loads them from an offload store (a CPU state dict, or memory-mapped files on disk) for every forward and drops them
after. lowbit's steps read and write weights, so they work on such a model part by part inside :func:`onloaded`:
the part's parameters are materialized on its execution device, forwards inside use them as they are (the hooks
stop reloading), and on exit the current values, quantized or rotated, are written back to the store and released.
Only the part being processed (one decoder layer for layer-streamed GPTQ) is in memory at a time. Training
(quantization-aware training) runs the whole model forward and backward instead: inside :func:`streamed` each weight
matrix is loaded for its module's forward only, and :func:`checkpointed` makes the backward pass recompute each
decoder layer (loading its matrices again) instead of keeping every layer's weights alive in the autograd graph.

For a model without offloading :func:`onloaded` and :func:`streamed` do nothing.
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


def _split(weights_map, name: str):
    """The dataset an accelerate offload store keeps ``name`` in, and its key there."""
    from accelerate.utils import PrefixedDataset

    if isinstance(weights_map, PrefixedDataset):
        return weights_map.dataset, weights_map.prefix + name
    return weights_map, name


def _in_store(weights_map, name: str) -> bool:
    """Whether the offload store holds a value for ``name`` (a tensor made since offloading, such as a scale that
    is training, lives in memory only)."""
    from accelerate.utils import OffloadedWeightsLoader

    dataset, key = _split(weights_map, name)
    if isinstance(dataset, OffloadedWeightsLoader):
        return key in dataset.state_dict or key in dataset.index
    return key in dataset


def _stored(module: nn.Module, hook) -> list[str]:
    """The names of ``module``'s tensors whose values its offload store holds."""
    return [name for name in _tensors(module, hook) if _in_store(hook.weights_map, name)]


def _store(weights_map, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into an accelerate offload store under ``name``, on disk when the store keeps it there.

    A weight that was read from the user's own safetensors checkpoint is never written there: it gets a new file in
    the store's offload folder (or stays in CPU memory when the store has no folder).
    """
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    dataset, key = _split(weights_map, name)
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
    reloading stale values. On exit each one is written back to its offload store and released to ``meta``. A
    parameter the store does not hold (one made since offloading, e.g. a scale being trained) is left as it is on
    entry.
    """
    hooked = _offload_hooks(module)
    for sub, hook in hooked:
        _load(sub, _stored(sub, hook), hook, device)
        hook.offload = False
    try:
        yield
    finally:
        for sub, hook in hooked:
            hook.offload = True
            tensors = _tensors(sub, hook)
            for name, tensor in tensors.items():
                _store(hook.weights_map, name, tensor)
            _release(sub, list(tensors))


def _load(module: nn.Module, names: list[str], hook, device=None) -> None:
    """Materialize ``names`` of ``module`` from its offload store on ``device`` (default: the execution device)."""
    from accelerate.utils import set_module_tensor_to_device

    target = device if device is not None else hook.execution_device
    for name in names:
        set_module_tensor_to_device(module, name, target, value=hook.weights_map[name].clone())  # tied: no aliasing


def _release(module: nn.Module, names: list[str]) -> None:
    """Drop ``names`` of ``module`` to ``meta`` without writing them back (their stored values are current)."""
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(module, name, "meta")


def _is_matrix(name: str, tensor: torch.Tensor) -> bool:
    """Whether ``name`` is a weight matrix (a linear's or an embedding's), as against a vector or a scale."""
    return name.rsplit(".", 1)[-1] == "weight" and tensor.dim() >= 2


def _streaming(module: nn.Module, names: list[str], hook) -> list:
    """Forward hooks that load ``names`` of ``module`` as its forward starts and drop them as it ends."""
    return [module.register_forward_pre_hook(lambda m, args: _load(m, names, hook)),
            module.register_forward_hook(lambda m, args, out: _release(m, names))]


@contextmanager
def streamed(model: nn.Module) -> Iterator[None]:
    """Run forwards and backwards through an offloaded ``model`` with its weight matrices streamed (for training).

    Every offloaded tensor that is not a weight matrix (norm weights, biases, offloaded buffers: a vector each) is
    brought into memory for the duration, so that it can train and stays the same tensor from one forward to the
    next; each weight matrix is loaded when its module's forward starts and dropped when it ends (again in a
    backward pass that recomputes the module, :func:`checkpointed`). On exit the in-memory tensors are written
    back to the store and released. Matrices are only read here: change one inside :func:`onloaded`.
    """
    hooked, handles, kept = _offload_hooks(model), [], []
    try:
        for sub, hook in hooked:
            tensors, stored = _tensors(sub, hook), _stored(sub, hook)
            matrices = [name for name in stored if _is_matrix(name, tensors[name])]
            kept.append((sub, hook, [name for name in stored if name not in matrices]))
            _load(sub, kept[-1][2], hook)
            hook.offload = False
            handles += _streaming(sub, matrices, hook) if matrices else []
        yield
    finally:
        for handle in handles:
            handle.remove()
        for sub, hook, names in kept:
            tensors = _tensors(sub, hook)
            for name in names:
                _store(hook.weights_map, name, tensors[name])
            _release(sub, names)
            hook.offload = True


@contextmanager
def checkpointed(model: nn.Module) -> Iterator[None]:
    """Every transformers decoder layer of ``model`` checkpointed for the duration: the forward keeps only each
    layer's input, and the backward pass recomputes the layer (so a streamed model holds one weight matrix and one
    layer's activations at a time, not the whole graph's). Only the layers' own flags change; their submodules stay in
    evaluation mode."""
    layers = _checkpoint_layers(model)
    names = ("gradient_checkpointing", "_gradient_checkpointing_func", "_can_checkpoint_with_cache")
    saved = [(layer, layer.training, {name: layer.__dict__[name] for name in names if name in layer.__dict__})
             for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing, layer.training = True, True
        layer._gradient_checkpointing_func = _checkpoint
        layer._can_checkpoint_with_cache = True  # a prefix cache stays: _replayable makes its recompute exact
    try:
        yield
    finally:
        for layer, training, own in saved:
            layer.training = training
            for name in names:
                layer.__dict__.pop(name, None)
            layer.__dict__.update(own)


def _checkpoint(function, *args):
    """torch's non-reentrant checkpoint, recomputing the whole layer (stopping early would skip the forward hooks
    of its last module, and :func:`streamed` would leave that module's weight in memory)."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    with set_checkpoint_early_stop(False):
        return checkpoint(_replayable(function), *args, use_reentrant=False)


def _replayable(function):
    """A decoder layer's forward (``partial(forward, layer, **kwargs)``, as transformers checkpoints it) made safe to
    run again: a cache it writes to (a PrefixQuant prefix's) gets the layer's entry back as it was before the first
    run, so the recompute attends to the same keys and values."""
    kwargs = getattr(function, "keywords", None) or {}
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return function
    layer = function.args[0]
    index = next(m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))
    entry = cache.layers[index]
    before = dict(entry.__dict__)  # the tensors an update replaces (torch.cat makes new ones), and any counters

    def run(*args):
        entry.__dict__.clear()
        entry.__dict__.update(before)
        return function(*args)

    return run


def _checkpoint_layers(model: nn.Module) -> list[nn.Module]:
    """``model``'s layers that transformers knows how to checkpoint (its own decoder layer class)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpointable(model: nn.Module) -> bool:
    """Whether :func:`checkpointed` can checkpoint ``model``'s decoder layers."""
    return bool(_checkpoint_layers(model))


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
