"""Architecture adapter (the layout half of :mod:`cap_lab.modeling`): where each model family keeps its attention and MLP weights.

CAP needs four facts about a decoder-only transformer: the list of decoder layers, the
attention projections (``q_proj``/``k_proj``/``v_proj`` whose rows and ``o_proj`` whose
columns are partitioned by head), the MLP projections, and the head geometry (query heads,
key/value heads, head dimension). Every supported family stores these in the same places in
Hugging Face transformers; the table below is the one place where that is written down, so a
new family is one new row, never a copied module (STYLE.md principle 5).

``head_dim`` is read from the config when it is set: Gemma's is *not* ``hidden / heads``
(Gemma-3-270M: hidden 640, 4 heads, head_dim 256).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
#: named intervention sites: the input of this projection in every decoder layer. ``o_proj``'s
#: input is the attention output (B, S, H * D), split by head; ``down_proj``'s is the MLP's
#: intermediate activation (B, S, I), one feature per neuron.
HOOK_SITES = ("o_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths of one model family (dotted, relative to the ``*ForCausalLM`` module)."""

    decoder: str = "model"
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"


_LLAMA_LIKE = ArchSpec()

#: model_type -> where things are. Families share one spec where their layout is the same.
ARCH_TABLE: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
}

SUPPORTED_MODEL_TYPES = tuple(sorted(ARCH_TABLE))


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


@dataclass(frozen=True)
class ModelLayout:
    """The head geometry and module locations of one loaded model.

    Attributes:
        model_type: the config's ``model_type``.
        num_layers: number of decoder layers L.
        num_heads: query heads per layer H.
        num_kv_heads: key/value heads per layer (H for multi-head attention, fewer under GQA).
        head_dim: dimension of one head D; ``o_proj`` takes ``H * D`` input features.
        spec: the attribute paths.
    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    spec: ArchSpec

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (``H // KV``)."""
        return self.num_heads // self.num_kv_heads

    def decoder(self, model: nn.Module) -> nn.Module:
        """The base decoder (embeddings, layers, final norm; no LM head)."""
        return _get(model, self.spec.decoder)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.spec.layers)

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return _get(self.layers(model)[layer], self.spec.attention)

    def o_proj(self, model: nn.Module, layer: int) -> nn.Linear:
        return self.attention(model, layer).o_proj

    def mlp(self, model: nn.Module, layer: int) -> nn.Module:
        return _get(self.layers(model)[layer], self.spec.mlp)

    def down_proj(self, model: nn.Module, layer: int) -> nn.Linear:
        """The MLP output projection; its input features are the layer's I intermediate neurons."""
        return self.mlp(model, layer).down_proj

    def hook_site(self, model: nn.Module, layer: int, site: str) -> nn.Linear:
        """The module whose input is intervention site ``site`` (one of :data:`HOOK_SITES`) of ``layer``."""
        if site not in HOOK_SITES:
            raise ValueError(f"hook site {site!r}; allowed: {', '.join(HOOK_SITES)}")
        return self.o_proj(model, layer) if site == "o_proj" else self.down_proj(model, layer)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _get(model, self.spec.final_norm)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return _get(model, self.spec.lm_head)

    def linear_weights(self, model: nn.Module) -> list[tuple[int, str, nn.Linear]]:
        """Every prunable linear layer: ``(layer index, projection name, module)``.

        These are the decoder attention and MLP projections; embeddings, norms and the
        language-model head are never included.
        """
        out = []
        for i, layer in enumerate(self.layers(model)):
            attn = _get(layer, self.spec.attention)
            mlp = _get(layer, self.spec.mlp)
            for name in ATTENTION_PROJECTIONS:
                out.append((i, name, getattr(attn, name)))
            for name in MLP_PROJECTIONS:
                out.append((i, name, getattr(mlp, name)))
        return out


def get_layout(model: nn.Module) -> ModelLayout:
    """Return the :class:`ModelLayout` of a transformers causal LM.

    Raises:
        ValueError: if the model's ``model_type`` is not in :data:`ARCH_TABLE`.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCH_TABLE:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layout = ModelLayout(
        model_type=model_type,
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        spec=ARCH_TABLE[model_type],
    )
    o_proj = layout.o_proj(model, 0)
    assert o_proj.in_features == heads * layout.head_dim, (o_proj.in_features, heads, head_dim)
    assert heads % kv_heads == 0, (heads, kv_heads)
    return layout


def model_device(model: nn.Module) -> torch.device:
    """The device of the input embeddings (where input ids must go)."""
    return model.get_input_embeddings().weight.device
