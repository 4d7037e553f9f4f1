"""Computational-invariance rotations (QuaRot): fold norms, rotate offline (R1, R2), hook online (R3, R4).

Row-vector convention: a linear computes ``y = x @ W.T + b`` with ``W`` of shape ``[out, in]``. For an orthogonal
``Q``, ``x @ W.T == (x @ Q) @ (W @ Q).T``, so a layer that *reads* a rotated input takes ``W <- W @ Q`` and a layer
that *writes* a rotated output takes ``W <- Q.T @ W`` (its bias ``b <- b @ Q``). RMSNorm with unit scale commutes
with ``Q`` (``||x Q|| = ||x||``), which is why the norm scales are folded into their readers first.

A family with post-norms (a norm between o_proj / down_proj and the residual add, :attr:`ArchSpec.writer_norms`)
cannot take R1: the post-norm sees the writer's rotated output ``y Q`` and returns ``RMSNorm(y) * g`` rotated only
when its scale ``g`` is uniform, and no linear follows it to fold ``g`` into. R2, R3, R4 and the rotation of o_proj's
input are all inside a block, before the writer's output is formed, so the post-norm never sees them: they stay
exact, as do the online reader rotations, which rotate a norm's output, never the stream. :func:`check_residual_rotation` refuses R1 on such a family.

- R1 (hidden × hidden): the residual stream. Embeddings, readers (q, k, v, gate, up, lm_head) and writers (o, down).
- R2 (head_dim × head_dim, one per layer): v_proj's output per KV head and o_proj's input per query head (a query
  head uses the R2 of the KV head it reads, so GQA needs nothing special with one R2 per layer).
- R3 (online, head_dim): Hadamard on Q and K after RoPE, before K is quantized; cancels in ``q @ k.T``.
- R4 (online, intermediate): Hadamard on the down_proj input at run time, with ``W_down <- W_down @ H`` offline.
- Reader rotations (online, hidden): one Hadamard on the q/k/v input and one on the gate/up input, folded into those
  weights: what R1 does to the readers' activations where R1 itself is not exact (see below).

Every weight update is computed in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from ..models.arch import ArchSpec, decoder_layers, get_module, head_dim
from ..rotations import RotationMatrix, random_hadamard
from ..rotations.kinds import RotationKind, offline_rotation
from .attach import as_quant_linear, untie_lm_head
from .attention import add_attention_hook
from .offload import onloaded


class OnlineRotation(nn.Module):
    """Applies ``x @ Q`` over the last dimension at run time with the rotation's fast transform."""

    def __init__(self, rotation: RotationMatrix) -> None:
        super().__init__()
        self.rotation = rotation

    def extra_repr(self) -> str:
        return self.rotation.description

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation.apply(x)


class QKRotationHook(nn.Module):
    """Attention hook: rotate post-RoPE queries and keys by the same orthogonal Q (R3); scores are unchanged."""

    def __init__(self, rotation: RotationMatrix) -> None:
        super().__init__()
        self.rotate = OnlineRotation(rotation)

    def forward(self, query, key, value):
        return self.rotate(query), self.rotate(key), value


def _update(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _read(linear: nn.Module, q: torch.Tensor) -> None:
    """``W <- W @ Q`` (the layer reads a rotated input)."""
    _update(linear.weight, linear.weight.double() @ q)


def _write(linear: nn.Module, q: torch.Tensor) -> None:
    """``W <- Q.T @ W`` and ``b <- b @ Q`` (the layer writes a rotated output)."""
    _update(linear.weight, q.T @ linear.weight.double())
    if linear.bias is not None:
        _update(linear.bias, linear.bias.double() @ q)


def _fold(norm: nn.Module, readers: list[nn.Module], offset: float = 0.0) -> None:
    """Fold one RMSNorm scale (``offset + weight``) into the linears that read its output; the scale becomes 1."""
    scale = norm.weight.double() + offset
    for linear in readers:
        _update(linear.weight, linear.weight.double() * scale[None, :])
    norm.weight.data.fill_(1.0 - offset)


def check_residual_rotation(spec: ArchSpec, what: str = "R1") -> None:
    """Refuse a rotation of the residual stream on a family whose residual writers are followed by post-norms."""
    if spec.writer_norms:
        raise ModelError(
            f"{what} (the residual-stream rotation) is not exact on {spec.family}: its post-norms "
            f"({', '.join(spec.writer_norms)}) normalize the o_proj/down_proj outputs with non-uniform scales before "
            "the residual add, so a rotated residual cannot pass through them; set r1: false (R2, R3, R4 stay exact; "
            "readers: true rotates the q/k/v and gate/up inputs online instead)"
        )


@torch.no_grad()
def fold_norms(model: nn.Module, spec: ArchSpec) -> int:
    """Fold every RMSNorm scale into the linears that read the norm's output, and set the scales to 1.

    Unties a tied lm_head first (folding the final norm into it would otherwise change the embeddings) and returns
    the bytes that untying added (0 when the model was untied). Offloaded models are processed part by part.
    """
    untied_bytes = untie_lm_head(model, spec)
    final_norm, head = get_module(model, spec.final_norm), get_module(model, spec.lm_head)
    offset = spec.norm_offset
    with onloaded(final_norm), onloaded(head):
        _fold(final_norm, [head], offset)
    for layer in decoder_layers(model, spec):
        with onloaded(layer):
            _fold(get_module(layer, spec.input_norm), [get_module(layer, p) for p in (spec.q, spec.k, spec.v)], offset)
            _fold(get_module(layer, spec.post_attn_norm), [get_module(layer, p) for p in (spec.gate, spec.up)], offset)
    return untied_bytes


@torch.no_grad()
def rotate_residual(model: nn.Module, spec: ArchSpec, r1: torch.Tensor) -> None:
    """Apply R1 (float64, hidden × hidden) to the residual stream. Norms must be folded first."""
    check_residual_rotation(spec)
    embed, head = get_module(model, spec.embed), get_module(model, spec.lm_head)
    with onloaded(embed), onloaded(head):
        _update(embed.weight, embed.weight.double() @ r1)
        _read(head, r1)
    for layer in decoder_layers(model, spec):
        with onloaded(layer):
            for path in spec.residual_readers:
                _read(get_module(layer, path), r1)
            for path in spec.residual_writers:
                _write(get_module(layer, path), r1)


@torch.no_grad()
def rotate_heads(model: nn.Module, spec: ArchSpec, r2: list[torch.Tensor]) -> None:
    """Apply one R2 (float64, head_dim × head_dim) per layer to v_proj's output heads and o_proj's input heads."""
    d = head_dim(model.config)
    for layer, q in zip(decoder_layers(model, spec), r2, strict=True):
        with onloaded(layer):
            _rotate_layer_heads(get_module(layer, spec.v), get_module(layer, spec.o), q, d)


def rotate_output_heads(w: torch.Tensor, q: torch.Tensor, d: int) -> torch.Tensor:
    """``Q^T`` on each ``d``-row head of a weight ``[heads * d, in]`` (v_proj's outputs); pure, differentiable."""
    return (q.T @ w.view(-1, d, w.shape[1])).reshape(w.shape)


def rotate_bias_heads(b: torch.Tensor, q: torch.Tensor, d: int) -> torch.Tensor:
    """``b @ Q`` on each ``d``-entry head of a bias ``[heads * d]`` (v_proj's bias)."""
    return (b.view(-1, d) @ q).reshape(-1)


def rotate_input_heads(w: torch.Tensor, q: torch.Tensor, d: int) -> torch.Tensor:
    """``@ Q`` on each ``d``-column head of a weight ``[out, heads * d]`` (o_proj's inputs)."""
    return (w.view(w.shape[0], -1, d) @ q).reshape(w.shape)


def _rotate_layer_heads(v: nn.Module, o: nn.Module, q: torch.Tensor, d: int) -> None:
    """One layer's R2: v_proj's output heads and o_proj's input heads by the same head_dim × head_dim Q."""
    _update(v.weight, rotate_output_heads(v.weight.double(), q, d))
    if v.bias is not None:
        _update(v.bias, rotate_bias_heads(v.bias.double(), q, d))
    _update(o.weight, rotate_input_heads(o.weight.double(), q, d))


@torch.no_grad()
def add_online_input_rotation(model: nn.Module, spec: ArchSpec, path: str, rotation: RotationMatrix,
                              fold: bool = True) -> None:
    """Fold ``W <- W @ Q`` into every layer's linear at ``path`` and rotate its input by Q at run time.

    R4 is this for down_proj; for o_proj it mixes the attention heads (QuaRot's online Hadamard across heads), and
    it must come after R2, which rotates o_proj's input within each head: the weight becomes ``W · R2 · Q``.
    ``fold=False`` only hooks the online rotation; the caller folds Q later with :func:`fold_input_rotation`
    (SpinQuant, whose R2 is learned after the hook exists).
    """
    for layer in decoder_layers(model, spec):
        as_quant_linear(layer, path).input_transform = OnlineRotation(rotation)
    if fold:
        fold_input_rotation(model, spec, path, rotation.dense())


@torch.no_grad()
def fold_input_rotation(model: nn.Module, spec: ArchSpec, path: str, q: torch.Tensor) -> None:
    """``W <- W @ Q`` for every layer's linear at ``path`` (the weight half of an online input rotation)."""
    for layer in decoder_layers(model, spec):
        linear = get_module(layer, path)
        with onloaded(linear):
            _read(linear, q)


def o_rotation_matrix(model: nn.Module, seeds: list[int], fallback: str | None = None) -> RotationMatrix:
    """The seeded rotation of o_proj's input across heads; its seed derives from R4's, so the seeds of R1-R4 and
    every R2 stay as they were without it."""
    width = model.config.num_attention_heads * head_dim(model.config)
    return random_hadamard(width, _sub_seeds(seeds[2], 1)[0], fallback)


def add_online_qk_rotation(model: nn.Module, spec: ArchSpec, r3: RotationMatrix) -> None:
    """R3: rotate post-RoPE queries and keys of every layer by the same Q (before any KV quantizer)."""
    for layer in decoder_layers(model, spec):
        add_attention_hook(model, get_module(layer, spec.attn), QKRotationHook(r3))


def _sub_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent seeds derived from one, so each rotation has its own reproducible signs."""
    return torch.randint(0, 2**31 - 1, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def rotation_seeds(model: nn.Module, spec: ArchSpec, seed: int) -> list[int]:
    """The per-rotation seeds a run derives from ``seed``: R1, R3, R4, then one R2 per layer."""
    return _sub_seeds(seed, 3 + len(decoder_layers(model, spec)))


def random_r1_r2(model: nn.Module, seeds: list[int], fallback: str | None = None, kind: RotationKind = "hadamard",
                 block: int | None = None):
    """The seeded R1 (hidden) and every layer's R2 (head_dim): QuaRot's random Hadamards, or another ``kind``
    (:mod:`lowbit.rotations.kinds`; ``block``: block_hadamard's block order)."""
    d = head_dim(model.config)
    return (offline_rotation(kind, model.config.hidden_size, seeds[0], fallback, block),
            [offline_rotation(kind, d, s, fallback, block) for s in seeds[3:]])


def reader_rotation_matrices(model: nn.Module, seeds: list[int], fallback: str | None = None):
    """The seeded hidden-size rotations of the attention input (q/k/v) and the MLP input (gate/up); their seeds
    derive from R1's, so every other rotation's seed stays as it was."""
    return [random_hadamard(model.config.hidden_size, s, fallback) for s in _sub_seeds(seeds[0], 2)]


def add_reader_rotations(model: nn.Module, spec: ArchSpec, seeds: list[int], fallback: str | None = None) -> dict:
    """Online rotations of the residual readers' inputs (one shared by q/k/v, one by gate/up), folded into their
    weights: R1's effect on those activations without rotating the residual stream, so exact under post-norms."""
    attn_in, mlp_in = reader_rotation_matrices(model, seeds, fallback)
    for paths, rotation in (((spec.q, spec.k, spec.v), attn_in), ((spec.gate, spec.up), mlp_in)):
        for path in paths:
            add_online_input_rotation(model, spec, path, rotation)
    return {"reader inputs": attn_in.description + " (online, q/k/v input; another on gate/up)"}


def add_online_rotations(model: nn.Module, spec: ArchSpec, seeds: list[int], r3: bool, r4: bool,
                         fallback: str | None = None, o_rotation: bool = False, fold_o: bool = True,
                         readers: bool = False) -> dict:
    """Hook the seeded online R3 (Q/K), R4 (down_proj input), with ``o_rotation`` a rotation of o_proj's input
    across heads (folded into their weights; the o_proj one only with ``fold_o``, else the caller folds it after
    R2) and with ``readers`` rotations of the q/k/v and gate/up inputs; returns their info. Call after R2 is folded
    in."""
    info = add_reader_rotations(model, spec, seeds, fallback) if readers else {}
    if o_rotation:
        rot_o = o_rotation_matrix(model, seeds, fallback)
        add_online_input_rotation(model, spec, spec.o, rot_o, fold=fold_o)
        info["o_proj input"] = rot_o.description + " (online, across heads)"
    if r3:
        rot3 = random_hadamard(head_dim(model.config), seeds[1], fallback)
        add_online_qk_rotation(model, spec, rot3)
        info["R3"] = rot3.description + " (online)"
    if r4:
        rot4 = random_hadamard(model.config.intermediate_size, seeds[2], fallback)
        add_online_input_rotation(model, spec, spec.down, rot4)
        info["R4"] = rot4.description + " (online)"
    return info
