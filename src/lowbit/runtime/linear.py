"""Real low-bit linears: the function of a fake-quant :class:`~lowbit.surgery.linear.QuantLinear`, run by low-bit
kernels, with a ``state_dict`` that IS the on-disk format (compressed-tensors names).

Persistent tensors (all buffers): ``weight_packed`` int32 ``[N, ceil(K*b/32)]`` + ``weight_shape`` int64 ``[2]``
(int weights below 8 bits: ``pack_int32(q + 2^(b-1), b)``, asymmetric codes unsigned as they are), or ``weight``
int8 ``[N, K]`` (int8: signed codes, asymmetric ``q - 128``) or float8 ``[N, K]`` (fp8: ``w / s``);
or, for fp4 E2M1, ``weight_packed`` uint8 ``[N, ceil(K/2)]`` (two 4-bit codes a byte, sign in bit 3, column ``2j`` in
the low nibble: compressed-tensors' nvfp4 packing);
``weight_scale`` float32 ``[N, 1]`` / ``[N, ceil(K/g)]`` / ``[1]`` (channel / group / tensor), except block scales
stored as the recipe rounds them: float8 E4M3 times ``weight_scale_unit`` float32 ``[1]`` (NVFP4), or uint8 biased
exponents (e8m0, MXFP4);
``weight_zero_point`` int32, same shape, asymmetric only, signed (``z - 2^(b-1)``); ``bias`` in the model dtype;
``input_scale`` float32 ``[1]`` (+ ``input_zero_point`` int32 ``[1]``, signed, asymmetric) for a static activation
quantizer. An online input rotation stays the ``input_transform`` child; it is not serialized here.
Kernel layouts derived from these are non-persistent buffers that :meth:`RuntimeLinear.prepare` builds after loading.

Kinds, chosen by the schemes (:func:`kernel_class`): :class:`IntLinear` (int weights x int activations,
``torch._int_mm`` with VNNI/AMX, else fbgemm's u8 x s8 GEMM or float32 on the codes), :class:`WeightOnlyLinear`
(int weights, float activations), :class:`Fp8Linear` (fp8 weights, optionally fp8 activations). Anything else raises :class:`~lowbit.errors.NoKernelError`: keep the fake-quant layer.
The defaults of each kind's flags are measured by ``benchmarks/kernel_bench.py`` (see benchmarks/README.md).
"""

from __future__ import annotations

import math
import sys
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArtifactError, CalibrationError, ModelError, NoKernelError
from ..quant import FloatFormat, IntFormat, QParams, dequantize, quantize, split_relative_scale
from ..quant.integer import (
    act_qparams,
    clamp_needed,
    column_blocks,
    exact_block,
    float_linear,
    int_values,
    magnitude,
)
from ..schemes import QuantScheme
from ..surgery.linear import QuantLinear
from ..surgery.offload import carry_hook
from ..surgery.quantizer import granularity_for, observer_kwargs
from . import kernels as K

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP4 = "fp4_e2m1"
E8M0_BIAS = 127  # an e8m0 scale 2^e is stored as the byte e + 127 (the OCP MX layout compressed-tensors writes)
FALLBACK = "run the fake-quant simulation instead (lowbit.load(..., simulate=True); CLI: --simulate)"


def unsaved_reason(scheme: QuantScheme | None) -> str | None:
    """Why weights of ``scheme`` have no saved form (None when they have one): :func:`weight_state` writes integer
    codes, fp8 values and packed fp4 codes."""
    if scheme is None or scheme.format.startswith("int") or scheme.format in FP8_DTYPES or scheme.format == FP4:
        return None
    return (f"{scheme.format} weights have no saved form (lowbit saves int2-int8 codes, fp8 and fp4): evaluate the "
            "recipe without --save, or save a recipe with int4 weights")


def _no_kernel(weight: QuantScheme, act: QuantScheme | None, why: str) -> NoKernelError:
    a = act.describe() if act else "float"
    return NoKernelError(f"no real low-bit kernel for weights {weight.describe()} x activations {a}: {why}; {FALLBACK}")


def _check_act(weight: QuantScheme, act: QuantScheme) -> None:
    """Activation scales must factor out of the matmul: dynamic per token or per tensor, or static per tensor."""
    ok = act.granularity == "tensor" or (act.granularity == "token" and act.dynamic)
    if not ok:
        raise _no_kernel(weight, act, f"{act.granularity} activation scales ({'dynamic' if act.dynamic else 'static'})"
                                      " do not factor out of a matmul (kernels take per-token or per-tensor scales)")


def kernel_class(weight: QuantScheme, act: QuantScheme | None) -> type[RuntimeLinear]:
    """The runtime module kind for a weight and activation scheme, or :class:`NoKernelError` naming the fallback."""
    wf, af = weight.number_format(), act.number_format() if act else None
    if isinstance(wf, IntFormat) and af is None:
        return WeightOnlyLinear
    if isinstance(wf, IntFormat) and isinstance(af, IntFormat):
        _check_act(weight, act)
        if weight.granularity == "group" and not IntLinear.GROUPS:
            raise _no_kernel(weight, act, "group-wise weights with integer activations (per-group partial products "
                                          "measured 1.5-3x the per-channel kernel; IntLinear.GROUPS = True runs them)")
        return IntLinear
    if weight.format in FP8_DTYPES and (af is None or act.format in FP8_DTYPES):
        if act is not None:
            _check_act(weight, act)
        return Fp8Linear
    raise _no_kernel(weight, act, "this format pair has no kernel on this CPU")


class _Packed(dict):
    """Opaque kernel layouts (fbgemm's packed weight object, oneDNN's mkldnn tensor) by kernel name: not module
    tensors (never moved, cast or saved), read-only, so a deep copy shares them (mkldnn tensors cannot be copied)."""

    def __deepcopy__(self, memo: dict) -> _Packed:
        return self


# How FP4 weights' block scales are stored: FP8 E4M3 times a float32 ``weight_scale_unit`` per tensor (NVFP4;
# compressed-tensors stores the unit's inverse, its ``weight_global_scale``, and divides), e8m0 as biased exponent
# bytes (MXFP4). Every other scale is float32, whatever it was rounded to: the integer kernels, the fusion of
# siblings and the compressed-tensors export read ``weight_scale`` as float32 scales.
_STORED_SCALE = {"float8_e4m3": torch.float8_e4m3fn, "e8m0": torch.uint8}


def _scale_storage(scheme: QuantScheme) -> str | None:
    """The key of :data:`_STORED_SCALE` that ``scheme``'s weight scales are stored as (None: float32)."""
    return scheme.scale_dtype if scheme.format == FP4 and scheme.scale_dtype in _STORED_SCALE else None


def stored_scales(scale: Tensor, scheme: QuantScheme) -> dict[str, Tensor]:
    """Float32 scales in their stored form (see :data:`_STORED_SCALE`): ``weight_scale`` and, for FP8 block
    scales, ``weight_scale_unit``."""
    storage = _scale_storage(scheme)
    if storage == "float8_e4m3":
        blocks, unit = split_relative_scale(scale, torch.float8_e4m3fn)
        return {"weight_scale": blocks, "weight_scale_unit": unit}
    if storage == "e8m0":
        return {"weight_scale": (torch.log2(scale).round() + E8M0_BIAS).to(torch.uint8)}
    return {"weight_scale": scale.to(torch.float32)}


def scale_values(module: nn.Module) -> Tensor:
    """The float32 weight scales of a runtime linear or table in their stored shape, from their stored form (inverse
    of :func:`stored_scales`)."""
    s, unit = module.weight_scale, getattr(module, "weight_scale_unit", None)
    if unit is not None:
        return s.to(torch.float32) * unit
    if s.dtype == torch.uint8:
        return torch.exp2(s.to(torch.float32) - E8M0_BIAS)
    return s


def stored_codes(module: nn.Module, k: int, rows: Tensor | None = None) -> Tensor:
    """The weight codes ``[N, k]`` of a runtime linear or table (or of its ``rows`` only), decoded from their stored
    form: signed int8 codes, fp8 values, or fp4 values as float32."""
    packed = module._buffers.get("weight_packed")
    stored = module.weight if packed is None else packed
    stored = stored if rows is None else stored.index_select(0, rows)
    if module.weight_scheme.format == FP4:
        return K.unpack_fp4(stored, k)
    return stored if packed is None else K.unpack_codes(stored, module.bits, k)


def weight_buffers(rows: int, columns: int, scheme: QuantScheme,
                   device: torch.device | str = "meta") -> dict[str, Tensor]:
    """The persistent tensors of a quantized weight ``[rows, columns]`` (see the module docstring), empty, in the
    order they are registered: codes (``weight`` or ``weight_packed`` + ``weight_shape``), ``weight_scale``,
    ``weight_zero_point`` when asymmetric."""
    wf, out = scheme.number_format(), {}
    group = scheme.group_size if scheme.granularity == "group" else columns
    qshape = {"channel": (rows, 1), "group": (rows, math.ceil(columns / group)), "tensor": (1,)}[scheme.granularity]

    def new(shape: tuple[int, ...], dt: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dt, device=device)

    if scheme.format == FP4:
        out["weight_packed"] = new((rows, math.ceil(columns / 2)), torch.uint8)
    elif isinstance(wf, FloatFormat):
        out["weight"] = new((rows, columns), FP8_DTYPES[scheme.format])
    elif wf.bits == 8:
        out["weight"] = new((rows, columns), torch.int8)
    else:
        out["weight_packed"] = new((rows, math.ceil(columns * wf.bits / 32)), torch.int32)
        out["weight_shape"] = new((2,), torch.int64)
    out["weight_scale"] = new(qshape, _STORED_SCALE.get(_scale_storage(scheme), torch.float32))
    if _scale_storage(scheme) == "float8_e4m3":
        out["weight_scale_unit"] = new((1,), torch.float32)
    if not wf.symmetric:
        out["weight_zero_point"] = new(qshape, torch.int32)
    return out


class RuntimeLinear(nn.Module):
    """Base of the runtime linears: shapes, schemes, the persistent tensors, the rotation child and the forward frame.

    Build one with :meth:`empty` (on ``meta``, for a loader: ``load_state_dict(sd, assign=True)`` then
    :meth:`prepare`) or :meth:`from_quant_linear`. Subclasses implement :meth:`prepare` and ``_matmul``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_scheme: QuantScheme,
                 input_scheme: QuantScheme | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "meta") -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.weight_scheme, self.input_scheme = weight_scheme, input_scheme
        self.input_transform: nn.Module | None = None
        self.shared = None  # a runtime.fused.SharedRun when fused with siblings that read the same input
        self.prepared = False
        n, k = out_features, in_features
        self.bits = weight_scheme.number_format().bits
        self.group = weight_scheme.group_size if weight_scheme.granularity == "group" else k
        for name, tensor in weight_buffers(n, k, weight_scheme, device).items():
            self.register_buffer(name, tensor)

        def new(shape: tuple[int, ...], dt: torch.dtype) -> Tensor:
            return torch.empty(shape, dtype=dt, device=device)

        self.register_buffer("bias", new((n,), dtype) if bias else None)
        if input_scheme is not None and not input_scheme.dynamic:
            self.register_buffer("input_scale", new((1,), torch.float32))
            if not input_scheme.number_format().symmetric:
                self.register_buffer("input_zero_point", new((1,), torch.int32))

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, weight_scheme: QuantScheme,
              input_scheme: QuantScheme | None = None, dtype: torch.dtype = torch.float32) -> RuntimeLinear:
        """An unfilled module of the right kind and shapes on ``meta`` (called on the base class, the kind is chosen
        from the schemes; raises :class:`NoKernelError` when there is none)."""
        kind = kernel_class(weight_scheme, input_scheme)
        if cls is not RuntimeLinear and kind is not cls:
            raise ValueError(f"{cls.__name__} does not run {weight_scheme.describe()} weights ({kind.__name__} does)")
        return kind(in_features, out_features, bias, weight_scheme, input_scheme, dtype)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> RuntimeLinear:
        """The runtime module computing what the fake-quant ``layer`` computes, prepared (see :func:`to_runtime`)."""
        return to_runtime(layer)

    def extra_repr(self) -> str:
        a = self.input_scheme.describe() if self.input_scheme else "float"
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, " \
               f"weight={self.weight_scheme.describe()}, input={a}"

    # --- persistent tensors -> kernel views ---

    def signed_codes(self) -> Tensor:
        """The weight's signed int8 codes ``[N, K]`` (int formats), unpacked from the stored form."""
        return stored_codes(self, self.in_features)

    def scale_rows(self) -> Tensor:
        """``weight_scale`` as ``[G, N]`` float32 (``[1, 1]`` per tensor)."""
        s = scale_values(self)
        return s.reshape(1, 1) if s.dim() == 1 else s.t().contiguous()

    def zero_rows(self) -> Tensor | None:
        """``weight_zero_point`` as ``[G, N]`` int32, signed, or None when symmetric."""
        z = getattr(self, "weight_zero_point", None)
        return None if z is None else (z.reshape(1, 1) if z.dim() == 1 else z.t().contiguous())

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``(q - z) * s`` ``[N, K]`` in ``dtype`` (default: the model dtype), computed in float32."""
        s = scale_values(self)
        s = s.reshape(1, 1) if s.dim() == 1 else s
        z = getattr(self, "weight_zero_point", None)
        z = None if z is None else (z.reshape(1, 1) if z.dim() == 1 else z)
        return K.dequantize_weight(stored_codes(self, self.in_features), s, z, self.group, dtype or self.dtype)

    # --- forward ---

    def prepare(self) -> RuntimeLinear:
        """Build the kernel layouts from the persistent tensors (after loading); returns self."""
        raise NotImplementedError

    def _matmul(self, x2: Tensor) -> Tensor:
        raise NotImplementedError

    def _reads_stored_codes(self) -> bool:
        """Whether the prepared kernel still reads the stored weight codes (else :meth:`drop_stored_codes` frees
        them)."""
        return True

    def drop_stored_codes(self) -> int:
        """Free the stored weight codes when the prepared kernel layout no longer reads them (a lean load: the
        kernel layout alone stays resident); the module then refuses to be saved. Returns the bytes freed."""
        name = "weight_packed" if self.bits < 8 and "weight_packed" in self._buffers else "weight"
        stored = self._buffers.get(name)
        owner = self.shared.combined if self.shared is not None else self  # a fused member's codes are its rows
        if not self.prepared or stored is None or stored.device.type == "meta" or owner._reads_stored_codes():
            return 0
        self._buffers[name] = torch.empty_like(stored, device="meta")
        self.lean = True
        return owner.drop_stored_codes() if owner is not self else stored.untyped_storage().nbytes()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if getattr(self, "lean", False):
            raise ModelError(f"{prefix.rstrip('.') or type(self).__name__}: its stored weight codes were freed by a "
                             "lean load (lowbit.load(..., lean=True)); load the folder again without lean to save it")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, x: Tensor) -> Tensor:
        if not self.prepared:
            raise RuntimeError(f"{type(self).__name__}.prepare() must run after its tensors are loaded")
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.shared is not None:
            y = self.shared.output(self, x)
        else:
            y = self._matmul(x.reshape(-1, self.in_features))
        # a bf16 kernel's output is added to an fp32 bias in fp32; the dtype checks skip no-op casts (decode cost)
        if y.dtype != x.dtype:
            y = y.to(torch.promote_types(y.dtype, x.dtype))
        if self.bias is not None:
            y = y + (self.bias if self.bias.dtype == y.dtype else self.bias.to(y.dtype))
        return (y if y.dtype == x.dtype else y.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)


class IntLinear(RuntimeLinear):
    """Int weights x int activations: activations to integer codes exactly as ``ActQuantizer`` rounds them (same
    scale formula, clip ratio and round-half-to-even), an exact integer matmul, then ``* s_x * s_w``. Zero points
    (asymmetric weights or activations) enter exactly (subtracted from the codes, or integer rank-1 corrections).

    Backends (:meth:`possible_backends`; ``prepare(backend=...)`` or ``BACKEND`` forces one):
    ``"int_mm"``: one ``torch._int_mm`` per weight group; fast only with int8 dot-product instructions (AVX512-VNNI,
    AMX), so the default there. ``"u8s8"``: the u8 x s8 GEMMs of fbgemm and oneDNN (codes shifted to unsigned, fp32
    output), for weights whose codes fit :data:`~lowbit.runtime.kernels.U8S8_MAX_W` (int2-int7 symmetric, int2-int6
    asymmetric; per channel or tensor): fbgemm below ``ONEDNN_MIN_MACS`` multiply-adds per call (``M*N*K``), oneDNN
    from there; each packing is built only when some row count uses it. The default is fbgemm alone: oneDNN costs
    ~250 us per call (2-3x fbgemm at decode) and gained nothing measurable in the layer at prefill (13-37% kernel-only;
    crossover ~2^25 multiply-adds), for another ``N*K`` bytes. ``"float"``: float32 ``F.linear`` on the codes in exact column blocks (any weights;
    holds ``4*N*K`` bytes). Without VNNI the default is ``"u8s8"`` where it fits, else ``"float"``. All are exact:
    integer sums, then the same float32 scaling as ``"int_mm"``; except ``"float"`` with group-wise weights, one GEMM
    on the dequantized weight (float32 sums, as the fake-quant layer's).

    ``int8_copy`` (``"int_mm"`` only): keep the weight's codes as an int8 copy (``[N, K]`` bytes) instead of
    unpacking them on every call; without it int2-int4 codes stay packed two per byte (``N*K/2`` bytes, in the layout
    of :func:`~lowbit.runtime.kernels.nibble_pack`, which replaces the stored words in a lean load) and are unpacked
    per call: half the memory, slower decode (benchmarks/README.md). ``GROUPS``: group-wise weights
    run per-group partial products (measured 1.5-3x the per-channel kernel at decode), so they are refused unless
    set. Measurements: benchmarks/kernel_bench.py.
    """

    INT8_COPY = True
    GROUPS = False  # group-wise weights by per-group partial products: correct, but measured not cheap (off)
    BACKEND: ClassVar[str] = "auto"
    ONEDNN_MIN_MACS: ClassVar[int] = sys.maxsize  # fbgemm only; 2**25: oneDNN from the measured crossover

    def possible_backends(self) -> list[str]:
        """The backends that run this layer, fastest first on this CPU; the first is the ``"auto"`` choice."""
        if self.weight_scale.device.type != "cpu":
            return ["int_mm", "float"]  # fbgemm and oneDNN are CPU libraries
        found = ["int_mm"] if K.has_int8_dot() else []
        wf, af = self.weight_scheme.number_format(), self.input_scheme.number_format()
        w_max = 2 ** (wf.bits - 1) - 1 if wf.symmetric else 2**wf.bits - 1
        per_tensor_zero = self.input_scheme.granularity == "tensor"
        acts_fit = af.symmetric or af.bits < 8 or per_tensor_zero  # one zero point shifts every code into uint8
        if self.weight_scheme.granularity != "group" and w_max <= K.U8S8_MAX_W and acts_fit and K.u8s8_kernels():
            found.append("u8s8")
        return [*found, "float"] + ([] if "int_mm" in found else ["int_mm"])

    def prepare(self, int8_copy: bool | None = None, backend: str | None = None,
                onednn_min_macs: int | None = None) -> IntLinear:
        """Build ``backend``'s layout (default ``BACKEND``; ``"auto"``: the first of :meth:`possible_backends`).
        ``onednn_min_macs`` (u8s8): oneDNN from this many ``M*N*K`` per call, fbgemm below (default
        ``ONEDNN_MIN_MACS``; 0: oneDNN only; ``sys.maxsize``: fbgemm only)."""
        possible = self.possible_backends()
        backend = backend or self.BACKEND
        backend = possible[0] if backend == "auto" else backend
        if backend not in possible:
            raise ValueError(f"backend {backend!r} does not run this layer (possible: {possible})")
        self.backend, self.int8_copy = backend, self.INT8_COPY if int8_copy is None else int8_copy
        fmt, scheme = self.input_scheme.number_format(), self.input_scheme
        ws, wz = self.scale_rows(), self.zero_rows()
        for name in ("_w8", "_nibbles", "_wcolsum", "_wc", "_float_ws", "_u8s8_scale", "_u8s8_wzero"):
            self.register_buffer(name, None, persistent=False)
        self._packed, self._blocks = _Packed(), []
        self.register_buffer("_ws", ws, persistent=False)
        self.register_buffer("_wz", wz, persistent=False)
        if backend == "int_mm":
            self._prepare_int_mm(fmt, ws, wz)
        elif backend == "u8s8":
            self._prepare_u8s8(ws, wz, self.ONEDNN_MIN_MACS if onednn_min_macs is None else onednn_min_macs)
        else:
            self._prepare_float(fmt, ws)
        z = getattr(self, "input_zero_point", None)
        z = None if scheme.dynamic or z is None else z.reshape(1, 1).to(torch.int32)
        self.register_buffer("_xz", z, persistent=False)
        self.register_buffer("_xzu", None if z is None else z.to(torch.float32) + K.offset(fmt.bits), persistent=False)
        self._clamp = clamp_needed(fmt, scheme.dynamic, scheme.observer, scheme.clip_ratio)
        # u8s8 activation zero point: 128 holds every code minus its zero point, except 8-bit asymmetric ones
        self._zero_is_code = not fmt.symmetric and fmt.bits == 8
        self._fmt, self.prepared = fmt, True
        return self

    def _prepare_int_mm(self, fmt: IntFormat, ws: Tensor, wz: Tensor | None) -> None:
        self._w8 = self.signed_codes() if (self.int8_copy or self.bits == 8) else None
        self._nibbles = K.nibble_pack(self.signed_codes()) if self._w8 is None and self.bits <= 4 else None
        if not fmt.symmetric:
            w = self.signed_codes().to(torch.int32)
            sizes = [c.shape[1] for c in w.split(self.group, 1)]
            colsum = torch.stack([c.sum(1) for c in w.split(self.group, 1)])  # [G, N]
            if wz is not None:
                colsum = colsum - torch.tensor(sizes, dtype=torch.int32).unsqueeze(1) * wz
            self._wcolsum = colsum

    def _weight_minus_zero(self) -> Tensor:
        """Signed codes minus their zero point, ``[N, K]`` int16."""
        w, wz = self.signed_codes().to(torch.int16), self.zero_rows()
        if wz is None:
            return w
        return w - wz.repeat_interleave(self.group, dim=0)[: self.in_features].t().to(torch.int16)

    def _prepare_u8s8(self, ws: Tensor, wz: Tensor | None, onednn_min_macs: int) -> None:
        n, k = self.out_features, self.in_features
        w8 = self._weight_minus_zero().to(torch.int8)
        scale = ws.reshape(-1).expand(n).contiguous()
        kernels = K.u8s8_kernels()
        use_fbgemm = "fbgemm" in kernels and (n * k < onednn_min_macs or "onednn" not in kernels)
        use_onednn = "onednn" in kernels and (onednn_min_macs < sys.maxsize or "fbgemm" not in kernels)
        self._onednn_min_macs = onednn_min_macs if use_fbgemm and use_onednn else (0 if use_onednn else sys.maxsize)
        if use_fbgemm:
            self._packed["fbgemm"] = K.fbgemm_pack(w8, scale)
        if use_onednn:
            self._packed["onednn"] = K.onednn_pack(w8)
            self._u8s8_scale, self._u8s8_wzero = scale, torch.zeros(n, dtype=torch.int32)

    def _prepare_float(self, fmt: IntFormat, ws: Tensor) -> None:
        if self.weight_scheme.granularity == "group":  # one GEMM on the dequantized weight (per-group products: slow)
            self._wc = self.dequantized_weight(torch.float32)
            self._blocks = [(0, self.in_features, 0)]
            return
        wf = self.weight_scheme.number_format()
        self._wc, self._float_ws = self._weight_minus_zero().to(torch.float32), ws
        self._blocks = column_blocks(self.in_features, self.group, exact_block(magnitude(fmt), magnitude(wf)))

    def _weight_codes(self) -> Tensor:
        if self._w8 is not None:
            return self._w8
        return K.nibble_unpack(self._nibbles, self.in_features) if self._nibbles is not None else self.signed_codes()

    def _reads_stored_codes(self) -> bool:
        return self.backend == "int_mm" and ((self._w8 is None and self._nibbles is None) or self.bits == 8)

    def opaque_bytes(self) -> int:
        """Bytes of the kernel layouts that are not module tensors (fbgemm's and oneDNN's packed weights): their
        int8 weight, ``N*K`` each (block padding and fbgemm's ``4*N`` column offsets not counted)."""
        return len(self._packed) * self.out_features * self.in_features if self.prepared else 0

    def _matmul(self, x2: Tensor) -> Tensor:
        fmt, scheme = self._fmt, self.input_scheme
        x32 = x2.to(torch.float32)
        if scheme.dynamic:
            s_x, z_u = act_qparams(x32, fmt, scheme.granularity == "token", scheme.observer, scheme.clip_ratio,
                                   observer_kwargs(scheme))
        else:
            s_x, z_u = self.input_scale.reshape(1, 1), self._xzu
        if self.backend == "int_mm":
            z_x = None if z_u is None else (z_u - K.offset(fmt.bits)).to(torch.int32)
            xq = K.int_codes(x32, s_x, z_u, fmt)
            y = K.int_linear(xq, self._weight_codes(), self._ws, self.group, z_x, self._wz, self._wcolsum)
            return y.mul_(s_x)
        v = int_values(x32, s_x, z_u, fmt, clamp=self._clamp)
        if self.backend == "float":
            return float_linear(v, self._wc, self._float_ws, self._blocks).mul_(s_x)
        zero = int(z_u.item()) if self._zero_is_code else K.U8S8_ZERO  # v + zero: the unsigned code itself
        if v.shape[0] * self.out_features * self.in_features >= self._onednn_min_macs:
            y = K.onednn_mm(v, self._packed["onednn"], self._u8s8_scale, self._u8s8_wzero, zero)
        else:
            y = K.fbgemm_mm(v, self._packed["fbgemm"], zero)
        return y.mul_(s_x)


class WeightOnlyLinear(RuntimeLinear):
    """Int weights, float activations: ``_weight_int4pack_mm_for_cpu`` (int2-int4, whose signed codes are int4 codes;
    bf16 activations; group 32..256 or a
    group size they divide, K % group == 0, N % 16 == 0), else ``_weight_int8pack_mm`` (symmetric per channel/tensor,
    any bits, K % 16 == 0; symmetric groups of a multiple of 16 columns: one call per group, ``int8group``, e.g.
    GGUF Q8_0 tables and heads), else the weight dequantized on every call and ``F.linear``.

    Both kernels are fast with bf16 activations only. For float32/float16 models, inputs of at most
    ``bf16_cast_max_m`` rows are cast to bf16 around the kernel (costs bf16 rounding of ``x``, of the scales and of
    the output, ~2^-8 relative); larger ones dequantize the weight in the model dtype instead. The default
    thresholds are measured (benchmarks/kernel_bench.py): at M=1 the cast is 9x (int8) to 30x (int4) faster than
    dequantizing, at M=256 dequantizing is faster (int4 from ~M=200, int8 from ~M=50); ``int8group`` runs a
    K=32-wide kernel per group, which wins up to M=8 only (a 49152 x 576 head: 35 vs 200 ms at M=1, 98 vs 241 at
    M=8, 286 vs 211 at M=32, two shared cores).
    """

    BF16_CAST_MAX_M: ClassVar[dict[str, int]] = {"int4pack": 128, "int8pack": 32, "int8group": 8}

    def possible_kernels(self) -> list[str]:
        """The kernels whose constraints this layer meets, fastest first."""
        s, n, k = self.weight_scheme, self.out_features, self.in_features
        found = []
        if self.bits <= 4 and n % 16 == 0 and K.int4pack_group(k, self.group) and (k % self.group == 0):
            found.append("int4pack")
        if s.symmetric and s.granularity != "group" and k % 16 == 0:
            found.append("int8pack")
        if s.symmetric and s.granularity == "group" and self.group % 16 == 0 and k % self.group == 0:
            found.append("int8group")
        return [*found, "dequant"]

    def prepare(self, kernel: str | None = None, bf16_cast: bool | None = None) -> WeightOnlyLinear:
        """Pick ``kernel`` (default: the first of :meth:`possible_kernels`) and build its layout. ``bf16_cast``:
        True / False cast non-bf16 inputs of any size / never; None: up to ``BF16_CAST_MAX_M[kernel]`` rows."""
        possible = self.possible_kernels()
        if kernel is not None and kernel not in possible:
            raise ValueError(f"kernel {kernel!r} does not fit this layer (possible: {possible})")
        self.kernel = kernel or possible[0]
        default = self.BF16_CAST_MAX_M.get(self.kernel, 0)
        self.bf16_cast_max_m = default if bf16_cast is None else (sys.maxsize if bf16_cast else 0)
        for name in ("_int4", "_int4_sz", "_w8", "_w8_scale"):
            self.register_buffer(name, None, persistent=False)
        if self.kernel == "int4pack":
            self.kernel_group = K.int4pack_group(self.in_features, self.group)
            self._int4 = K.int4pack_weight(self.signed_codes())
            s = self.scale_rows().t().expand(self.out_features, -1)
            z = self.zero_rows()
            z = None if z is None else z.t().expand(self.out_features, -1)
            self._int4_sz = K.int4pack_scales_zeros(s, z, self.group, self.kernel_group, torch.bfloat16)
        elif self.kernel == "int8pack":
            self._w8 = self.signed_codes()
            self._w8_scale = self.weight_scale.reshape(-1).expand(self.out_features).to(torch.bfloat16).contiguous()
        elif self.kernel == "int8group":  # [G, N, g]: each group's columns contiguous, as the kernel reads them
            n, k, g = self.out_features, self.in_features, self.group
            self._w8 = self.signed_codes().reshape(n, k // g, g).transpose(0, 1).contiguous()
            self._w8_scale = self.scale_rows().to(torch.bfloat16).contiguous()
        self.prepared = True
        return self

    def _reads_stored_codes(self) -> bool:
        """The dequantize path (kernel ``"dequant"``, or inputs above ``bf16_cast_max_m`` rows) reads them; int8
        codes are the int8pack kernel's own weight. ``int8group`` dequantizes from its own copy."""
        if self.kernel == "int8group":
            return False
        return self.kernel == "dequant" or self.bf16_cast_max_m < sys.maxsize or self.bits == 8

    def _matmul(self, x2: Tensor) -> Tensor:
        if self.kernel == "dequant" or (x2.dtype != torch.bfloat16 and x2.shape[0] > self.bf16_cast_max_m):
            return F.linear(x2, self._dequantized(x2.dtype))
        xb = x2.to(torch.bfloat16)
        if self.kernel == "int4pack":
            return K.int4pack_mm(xb, self._int4, self.kernel_group, self._int4_sz)
        if self.kernel == "int8group":
            return K.int8group_mm(xb, self._w8, self._w8_scale)
        return K.int8pack_mm(xb, self._w8, self._w8_scale)

    def _dequantized(self, dtype: torch.dtype) -> Tensor:
        """The dequantized weight, from the stored codes or (``int8group``, whose lean load frees them) its copy."""
        if self.kernel != "int8group":
            return self.dequantized_weight(dtype)
        codes = self._w8.transpose(0, 1).reshape(self.out_features, self.in_features)
        return K.dequantize_weight(codes, self.weight_scale, None, self.group, dtype)


class Fp8Linear(RuntimeLinear):
    """fp8 weights (e4m3 / e5m2), float or fp8 activations (dynamic per token or tensor, static per tensor).

    This CPU has no fast fp8 GEMM: ``torch._scaled_mm`` runs a reference path and fp8 -> float casts are scalar (both
    measured in benchmarks/kernel_bench.py), so ``mode="cached"`` (the default) dequantizes the weight once in
    :meth:`prepare` (RAM as the float model; fp8 saves disk only); ``"per_call"`` upcasts on every call (RAM of fp8);
    ``"scaled_mm"`` runs ``torch._scaled_mm`` (fp8 activations, per-channel or per-tensor weights).
    Activations are rounded to the fp8 grid exactly as the fake quantizer rounds them.
    """

    MODE = "cached"

    def prepare(self, mode: str | None = None) -> Fp8Linear:
        mode = mode or self.MODE
        if mode not in ("cached", "per_call", "scaled_mm"):
            raise ValueError(f"unknown fp8 mode {mode!r} (cached, per_call, scaled_mm)")
        if mode == "scaled_mm" and (self.input_scheme is None or self.weight_scheme.granularity == "group"):
            raise ValueError("scaled_mm needs fp8 activations and per-channel or per-tensor weight scales")
        self.mode = mode
        self.register_buffer("_w", self.dequantized_weight() if mode == "cached" else None, persistent=False)
        rows = mode == "scaled_mm"  # its weight scales as [1, N]
        self.register_buffer("_ws", self.scale_rows().expand(1, self.out_features).contiguous() if rows else None,
                             persistent=False)
        self.prepared = True
        return self

    def _reads_stored_codes(self) -> bool:
        return self.mode != "cached"

    def _matmul(self, x2: Tensor) -> Tensor:
        scheme = self.input_scheme
        if scheme is not None:
            fmt, x32 = scheme.number_format(), x2.to(torch.float32)
            if scheme.dynamic:
                s_x, _ = act_qparams(x32, fmt, scheme.granularity == "token", scheme.observer, scheme.clip_ratio,
                                     observer_kwargs(scheme))
            else:
                s_x = self.input_scale.reshape(1, 1)
            xf = K.fp8_codes(x32, s_x, fmt, FP8_DTYPES[scheme.format])
            if self.mode == "scaled_mm":
                s_a = s_x.expand(x2.shape[0], 1).contiguous() if s_x.numel() == 1 else s_x
                return torch._scaled_mm(xf, self.weight.t(), scale_a=s_a, scale_b=self._ws, out_dtype=torch.float32)
            x2 = (xf.to(torch.float32) * s_x).to(x2.dtype)
        w = self._w if self._w is not None else self.dequantized_weight(x2.dtype)
        return F.linear(x2, w.to(x2.dtype))


# --- from the fake-quant layer --------------------------------------------------------------------------------------


def _weight_codes(layer: nn.Module) -> Tensor:
    """Codes of the on-grid fake-quant weight (of a :class:`QuantLinear` or
    :class:`~lowbit.surgery.embedding.QuantEmbedding`), recovered exactly; a weight off its grid is an error."""
    scheme, w = layer.weight_scheme, layer.weight.detach()
    fmt, gran = scheme.number_format(), granularity_for(scheme, "weight")
    qp = QParams(layer.weight_scale, layer.weight_zero)
    codes = quantize(w.to(torch.float32), qp, fmt, gran)
    back = dequantize(codes, qp, fmt, gran, w.shape, dtype=w.dtype)
    step = qp.scale.to(torch.float32).amax().item()
    if not torch.allclose(back.to(torch.float32), w.to(torch.float32), rtol=0, atol=1e-3 * step):
        raise ValueError(f"{layer.extra_repr()}: the weight is not on its quantization grid (trained, not frozen?)")
    return codes


def _scale_tensor(t: Tensor, granularity: str) -> Tensor:
    """A QuantLinear qparam (``[N,1]``, ``[N,G,1]`` or ``[1,1]``) in the on-disk shape."""
    return {"channel": lambda: t.reshape(-1, 1), "group": lambda: t.reshape(t.shape[0], -1),
            "tensor": lambda: t.reshape(1)}[granularity]()


def weight_state(layer: nn.Module) -> dict[str, Tensor]:
    """The persistent tensors of a fake-quant module's quantized weight (:func:`weight_buffers`: codes, scale, zero
    point), from a :class:`QuantLinear` or a :class:`~lowbit.surgery.embedding.QuantEmbedding`."""
    scheme, fmt = layer.weight_scheme, layer.weight_scheme.number_format()
    why = unsaved_reason(scheme)
    if why is not None:
        raise ArtifactError(f"{layer.extra_repr()}: {why}")
    codes, out = _weight_codes(layer), {}
    if scheme.format == FP4:
        out["weight_packed"] = K.pack_fp4(codes)
    elif isinstance(fmt, FloatFormat):
        out["weight"] = codes.to(FP8_DTYPES[scheme.format])
    else:
        signed = codes if fmt.symmetric else codes - K.offset(fmt.bits)
        if fmt.bits == 8:
            out["weight"] = signed.to(torch.int8)
        else:
            out["weight_packed"] = K.pack_codes(signed.to(torch.int8), fmt.bits)
            out["weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
    out.update(stored_scales(_scale_tensor(layer.weight_scale.detach().to(torch.float32), scheme.granularity), scheme))
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        z = _scale_tensor(layer.weight_zero.detach(), scheme.granularity)
        out["weight_zero_point"] = (z - K.offset(fmt.bits)).to(torch.int32)
    return out


def quant_linear_state(layer: QuantLinear) -> dict[str, Tensor]:
    """The persistent tensors (on-disk format) of the runtime module for ``layer``."""
    out = weight_state(layer)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().clone()
    q = layer.input_quant
    if q is not None and q.static:
        if q.scale is None:
            raise CalibrationError(f"static quantizer {q.name or q.kind} was never calibrated")
        shape = (1,) if q.scale.numel() == 1 else q.scale.shape  # per channel (no kernel): kept for simulate=True
        out["input_scale"] = q.scale.detach().to(torch.float32).reshape(shape)
        if q.zero_point is not None:
            out["input_zero_point"] = (q.zero_point.reshape(shape) - K.offset(q.fmt.bits)).to(torch.int32)
    return out


def to_runtime(layer: QuantLinear) -> RuntimeLinear:
    """A prepared runtime module computing what the fake-quant ``layer`` computes (same online rotation object).

    Built the way a loader builds one: :meth:`RuntimeLinear.empty`, ``load_state_dict(assign=True)``, ``prepare()``.
    Raises :class:`NoKernelError` for schemes without a kernel, ValueError for a layer still training.
    """
    if layer.weight_scheme is None:
        raise NoKernelError(f"{layer.extra_repr()}: float weights have no low-bit kernel; {FALLBACK}")
    q = layer.input_quant
    if layer.learning or (q is not None and (not q.enabled or q.calibrating or q.learned_clip is not None)):
        raise ValueError(f"{layer.extra_repr()}: finish training or calibration before converting to the runtime")
    module = RuntimeLinear.empty(layer.in_features, layer.out_features, layer.bias is not None, layer.weight_scheme,
                                 q.scheme if q is not None else None, layer.weight.dtype)
    module.load_state_dict(quant_linear_state(layer), assign=True)
    module.input_transform = layer.input_transform
    return module.prepare()


def convert(model: nn.Module) -> nn.Module:
    """Replace every fake-quant :class:`QuantLinear` of ``model`` by its runtime module, in place; returns ``model``.

    Layers with float weights and inputs (an online rotation only) stay as they are. All layers are converted before
    any is swapped, so a :class:`NoKernelError` leaves the model untouched.
    """
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, QuantLinear) and (m.weight_scheme is not None or m.input_quant is not None)]
    runtime = [(name, to_runtime(m)) for name, m in found]
    for name, module in runtime:
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        carry_hook(old, module)
        setattr(model.get_submodule(parent) if parent else model, child, module)
    return model
