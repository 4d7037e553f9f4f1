"""Architectures as data.

Each supported model family is one :class:`ArchSpec` entry naming where its modules live, so that model surgery
(weight quantization, rotations, KV hooks) never branches on the model type. Adding a family that follows the
Llama layout is one entry in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one decoder-only model family live, as attribute paths.

    Paths to model-level parts are relative to the ``*ForCausalLM`` module; paths to layer parts are relative to one
    decoder layer. ``residual_readers`` / ``residual_writers`` name the linears that read from / write to the
    residual stream (needed by rotations); ``attn_bias`` names the linears that carry biases in this family;
    ``post_attn_norm`` is the norm that feeds the MLP.

    Families beyond the Llama layout describe their extra parts here too: ``attn_out_norm`` / ``mlp_out_norm`` name
    norms applied to the attention / MLP output before it joins the residual stream (post-norms: no residual
    rotation survives them), ``qk_norms`` per-head norms on queries and keys before RoPE, ``norm_offset`` the
    constant a norm adds to its weight (a norm scales by ``norm_offset + weight``), and ``layer_types`` whether each
    layer's attention kind (``config.layer_types``: full or sliding window) picks its own rotary table and mask.
    """

    family: str
    model_types: tuple[str, ...]
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attn: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_bias: tuple[str, ...] = ()
    norm_kind: str = "rmsnorm"
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    qk_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0
    layer_types: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def linear_roles(self) -> dict[str, str]:
        """Role name (``q``, ``k``, ...) → path of that linear inside one decoder layer."""
        return {r: getattr(self, r) for r in ("q", "k", "v", "o", "gate", "up", "down")}

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linear roles that read the same input tensor (and so share one input Hessian), in forward order."""
        return (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))

    @property
    def residual_readers(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.gate, self.up)

    @property
    def residual_writers(self) -> tuple[str, ...]:
        return (self.o, self.down)

    @property
    def writer_norms(self) -> tuple[str, ...]:
        """Norms between a residual writer and the residual stream (they see the writer's output, not the stream)."""
        return tuple(p for p in (self.attn_out_norm, self.mlp_out_norm) if p)


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.family: spec
    for spec in (
        ArchSpec(family="llama", model_types=("llama",)),
        ArchSpec(
            family="qwen2",
            model_types=("qwen2",),
            attn_bias=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ),
        ArchSpec(family="mistral", model_types=("mistral",)),
        ArchSpec(
            family="gemma3",
            model_types=("gemma3_text",),
            post_attn_norm="pre_feedforward_layernorm",
            attn_out_norm="post_attention_layernorm",
            mlp_out_norm="post_feedforward_layernorm",
            qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
            norm_offset=1.0,
            layer_types=True,
        ),
    )
}


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` lowbit knows, sorted."""
    return sorted(t for spec in ARCHITECTURES.values() for t in spec.model_types)


def spec_for_model_type(model_type: str) -> ArchSpec:
    """The :class:`ArchSpec` for a transformers ``model_type``, or a :class:`ModelError` naming the supported ones."""
    for spec in ARCHITECTURES.values():
        if model_type in spec.model_types:
            return spec
    raise ModelError(
        f"unsupported architecture '{model_type}': lowbit supports {', '.join(supported_model_types())}; "
        "add an ArchSpec entry in lowbit/models/arch.py for a new Llama-like family"
    )


def spec_for(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of a loaded transformers causal LM."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise ModelError("not a transformers causal LM (no config.model_type): load it with lowbit.load_model")
    return spec_for_model_type(config.model_type)


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted ``path`` (``root`` itself for an empty path)."""
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted ``path``."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(root, parent_path), name, module)


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The model's list of decoder layers."""
    spec = spec or spec_for(model)
    layers = get_module(model, spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{spec.family} model: {spec.layers} is a {type(layers).__name__}, not the list of decoder "
                         "layers this family has: load the model with transformers' own class for it")
    return layers


def head_dim(config) -> int:
    """Per-head width of a model config (``head_dim`` when set, else ``hidden_size / num_attention_heads``)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
