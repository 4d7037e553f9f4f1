"""Linears that read the same input run as one: q/k/v and gate/up, one activation quantization and one GEMM.

At decode a 135M model's step is dominated by per-call overhead (Python, dispatch, the per-token activation scale),
not by arithmetic: seven quantized linears per layer mean seven quantizations of inputs of which only four differ.
:func:`fuse_shared_inputs` gives each group of siblings one *combined* runtime module of the same kind over the
concatenated rows (codes, scales, zero points: every output row is computed exactly as before, since the rows of a
linear are independent and the activation quantizer, shared input and all, is the same). The first member called
with an input runs the combined module and keeps its output; the others return their column slice of it.

Nothing on disk changes: each member keeps its persistent tensors, now row views of the combined module's, so
``state_dict``/``save`` write the same bytes; only the kernel layouts (non-persistent) move to the combined module.
The combined module is held outside the module tree (it is not a child: a child would be saved); each member lists
its tensors in :meth:`SharedRun.tensors` so that resident memory counts them once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .linear import Fp8Linear, IntLinear, RuntimeLinear, WeightOnlyLinear

# persistent tensors cut along the output rows (dim 0); input scales are shared, the shape is rebuilt
ROW_TENSORS = ("weight", "weight_packed", "weight_scale", "weight_zero_point")
SHARED_TENSORS = ("input_scale", "input_zero_point")


def _version(x: Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # inference-mode tensors keep no version counter: identity alone then
        return None


class SharedRun:
    """One combined module computing the outputs of several sibling linears from one input, plus the last output.

    :meth:`output` returns a member's column slice; the combined output is recomputed whenever the input is another
    tensor (or was modified in place), and dropped once every member has read it.
    """

    def __init__(self, combined: RuntimeLinear, members: Sequence[RuntimeLinear]) -> None:
        self.combined = combined
        self.columns: dict[int, slice] = {}
        start = 0
        for m in members:
            self.columns[id(m)] = slice(start, start + m.out_features)
            start += m.out_features
        self._input: Tensor | None = None
        self._version: int | None = None
        self._output: Tensor | None = None
        self._unread: set[int] = set()

    def output(self, member: RuntimeLinear, x: Tensor) -> Tensor:
        """``member``'s kernel output ``[M, N_member]`` (float32 or the kernel's dtype, before bias) for input ``x``."""
        key = id(member)
        if self._output is None or x is not self._input or _version(x) != self._version or key not in self._unread:
            self._output = self.combined._matmul(x.reshape(-1, self.combined.in_features))
            self._input, self._version, self._unread = x, _version(x), set(self.columns)
        self._unread.discard(key)
        y = self._output[:, self.columns[key]]
        if not self._unread:
            self._input = self._output = None
        return y

    def tensors(self) -> list[Tensor]:
        """Every tensor the combined module holds (persistent and kernel layouts)."""
        return [t for t in self.combined._buffers.values() if t is not None]

    def opaque_bytes(self) -> int:
        return self.combined.opaque_bytes() if hasattr(self.combined, "opaque_bytes") else 0


def _settings(m: RuntimeLinear) -> tuple:
    """What must be equal for siblings to share one combined module: kind, shapes, schemes, kernel choice, static
    input scales."""
    kernel = {IntLinear: lambda: (m.backend, m.int8_copy, getattr(m, "_onednn_min_macs", None)),
              WeightOnlyLinear: lambda: (m.kernel, m.bf16_cast_max_m),
              Fp8Linear: lambda: (m.mode,)}[type(m)]()
    per_tensor = [n for n in ("weight_scale", "weight_zero_point") if getattr(m, n, None) is not None
                  and getattr(m, n).dim() == 1]  # one value for the whole weight: must be equal to share the rows
    static = tuple(None if getattr(m, n, None) is None else tuple(getattr(m, n).reshape(-1).tolist())
                   for n in (*SHARED_TENSORS, *per_tensor))
    return (type(m), m.in_features, m.dtype, m.group, m.weight_scheme, m.input_scheme, kernel, static)


def can_fuse(members: Sequence[nn.Module]) -> bool:
    """Whether ``members`` (two or more) are prepared runtime linears of one kind and settings, with every stored
    tensor present (not a lean load) and no online input rotation (its output is a new tensor per call)."""
    if len(members) < 2 or not all(type(m) in (IntLinear, WeightOnlyLinear, Fp8Linear) for m in members):
        return False
    if any(not m.prepared or m.input_transform is not None or getattr(m, "lean", False)
           or getattr(m, "shared", None) is not None for m in members):
        return False
    return len({_settings(m) for m in members}) == 1


def _prepare_like(combined: RuntimeLinear, first: RuntimeLinear) -> None:
    if isinstance(first, IntLinear):
        combined.prepare(int8_copy=first.int8_copy, backend=first.backend,
                         onednn_min_macs=getattr(first, "_onednn_min_macs", None))
    elif isinstance(first, WeightOnlyLinear):
        combined.prepare(kernel=first.kernel)
        combined.bf16_cast_max_m = first.bf16_cast_max_m
    else:
        combined.prepare(mode=first.mode)


def fuse(members: Sequence[RuntimeLinear]) -> SharedRun:
    """Give ``members`` (see :func:`can_fuse`) one combined module; their persistent tensors become row views of
    its tensors and their own kernel layouts are released."""
    first = members[0]
    n = sum(m.out_features for m in members)
    combined = RuntimeLinear.empty(first.in_features, n, False, first.weight_scheme, first.input_scheme, first.dtype)
    state = {}
    for name in ROW_TENSORS:
        if first._buffers.get(name) is None:
            continue
        per_tensor = name in ("weight_scale", "weight_zero_point") and first._buffers[name].dim() == 1
        state[name] = first._buffers[name].clone() if per_tensor else torch.cat([m._buffers[name] for m in members])
    if "weight_packed" in state:
        state["weight_shape"] = torch.tensor([n, first.in_features], dtype=torch.int64)
    for name in SHARED_TENSORS:
        if first._buffers.get(name) is not None:
            state[name] = first._buffers[name].clone()
    combined.load_state_dict(state, assign=True)
    _prepare_like(combined, first)
    run = SharedRun(combined, members)
    start = 0
    for m in members:
        rows = slice(start, start + m.out_features)
        for name in ROW_TENSORS:
            if name in state and combined._buffers[name].shape[0] == n:
                m._buffers[name] = combined._buffers[name][rows]
        for name in m._non_persistent_buffers_set:
            m._buffers[name] = None
        if hasattr(m, "_packed"):
            m._packed.clear()
        m.shared = run
        start += m.out_features
    return run


def fuse_groups(groups: Iterable[Sequence[nn.Module]]) -> int:
    """Fuse every group that :func:`can_fuse`; returns how many were fused."""
    count = 0
    for members in groups:
        if can_fuse(members):
            fuse(members)
            count += 1
    return count
