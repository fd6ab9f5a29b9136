"""Model and calibration-set shapes: everything the cost model needs to know about either.

:class:`ModelShape` holds the config fields that set a decoder-only transformer's cost (layers,
widths, heads, vocabulary, sliding windows), read from a transformers config without weights
(:func:`load_shape`) or built in for the paper's models (:data:`BUILTIN_SHAPES`), and counts the
FLOPs of its parts. :class:`CalibrationShape` holds a calibration set's token counts and groups
them into the batches and chunks the scorers use.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cap_lab.scoring.exact import plan_chunks


# ------------------------------------------------------------------ model shape
@dataclass(frozen=True)
class ModelShape:
    """The config fields that set a decoder-only transformer's cost.

    Attributes:
        name: what the shape is called (alias, folder, config path or built-in name).
        num_layers: decoder layers L.
        hidden_size: model width d.
        intermediate_size: MLP width (gated MLP: gate, up, down projections).
        num_heads: query heads H.
        num_kv_heads: key/value heads (grouped-query attention).
        head_dim: dimension of one head D.
        vocab_size: LM-head outputs V.
        windows: per layer, the sliding window (keys a query sees at most), or ``None``.
        logit_softcapping: the config sets ``final_logit_softcapping`` (Gemma-2/3).
        config: the transformers config it was read from (``None`` for a built-in shape);
            :func:`calibrate` builds a decoder layer from it.
    """

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    windows: tuple[int | None, ...] = ()
    logit_softcapping: bool = False
    config: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.windows:
            object.__setattr__(self, "windows", (None,) * self.num_layers)
        if len(self.windows) != self.num_layers:
            raise ValueError(f"windows has {len(self.windows)} entries for {self.num_layers} layers")

    @classmethod
    def from_config(cls, config, name: str = "") -> "ModelShape":
        """From a transformers config (the text config of a multimodal one)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(config.num_attention_heads)
        layers = int(config.num_hidden_layers)
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if types:  # Gemma-3, Qwen2/3: per-layer attention type
            windows = tuple(window if t == "sliding_attention" else None for t in types)
        else:  # Mistral: a set sliding_window applies to every layer
            windows = (window,) * layers
        return cls(
            name=name or getattr(config, "name_or_path", "") or config.model_type,
            num_layers=layers, hidden_size=int(config.hidden_size), intermediate_size=int(config.intermediate_size),
            num_heads=heads, num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            vocab_size=int(config.vocab_size), windows=windows,
            logit_softcapping=bool(getattr(config, "final_logit_softcapping", None)), config=config,
        )

    @property
    def linear_flops(self) -> int:
        """FLOPs of one decoder layer's linear projections for one token."""
        d, hd, kvd = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * (d * hd + 2 * d * kvd + hd * d + 3 * d * self.intermediate_size)

    @property
    def attention_flops(self) -> int:
        """FLOPs of QK^T and AV for one (query, key) pair in one layer."""
        return 4 * self.num_heads * self.head_dim

    @property
    def lm_head_flops(self) -> int:
        """FLOPs of the LM head for one position."""
        return 2 * self.hidden_size * self.vocab_size

    @property
    def qkv_flops(self) -> int:
        """FLOPs of one layer's q, k and v projections for one token."""
        return 2 * self.hidden_size * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def attention_pairs(self, layer: int, width: int) -> int:
        """(query, key) pairs of layer ``layer`` in one row of ``width`` tokens: causal, windowed."""
        w = min(self.windows[layer] or width, width)
        return w * (w + 1) // 2 + (width - w) * w  # query t sees min(t + 1, w) keys

    def layer_flops(self, layer: int, width: int) -> int:
        """FLOPs of decoder layer ``layer`` for one row of ``width`` tokens (causal attention)."""
        return self.linear_flops * width + self.attention_flops * self.attention_pairs(layer, width)

    def input_grad_flops(self, width: int) -> int:
        """FLOPs of a backward to every layer's ``o_proj`` input for one row (no weight gradients).

        Input gradients of a linear layer cost its forward; attention's backward (dQ, dK, dV
        through the probabilities) costs twice its forward. It stops at layer 0's ``o_proj``
        input, so layer 0's q, k, v projections and attention are not traversed.
        """
        total = (self.linear_flops - self.qkv_flops) * width
        for layer in range(1, self.num_layers):
            total += self.linear_flops * width + 2 * self.attention_flops * self.attention_pairs(layer, width)
        return total

    def layers_flops(self, width: int, first: int = 0) -> int:
        """FLOPs of layers ``first..L-1`` for one row of ``width`` tokens."""
        return sum(self.layer_flops(i, width) for i in range(first, self.num_layers))

    @property
    def parameters(self) -> int:
        """Parameters of the decoder layers and the LM head (norms and embeddings not counted)."""
        return (self.linear_flops * self.num_layers + self.lm_head_flops) // 2


#: shapes of models whose weights are not here (no hub access needed): the paper's two models.
#: Fields: name, layers, hidden, intermediate, heads, KV heads, head_dim, vocab.
BUILTIN_SHAPES: dict[str, ModelShape] = {
    s.name: s for s in (
        ModelShape("llama-3-8b", 32, 4096, 14336, 32, 8, 128, 128256),  # Meta-Llama-3-8B(-Instruct)
        ModelShape("mistral-7b", 32, 4096, 14336, 32, 8, 128, 32000),  # Mistral-7B-Instruct-v0.2: no sliding window
    )
}


def load_shape(model: str) -> ModelShape:
    """The shape of ``model`` without loading weights.

    Args:
        model: a built-in shape (:data:`BUILTIN_SHAPES`), a cap_lab alias whose converted cache
            exists, a folder with a ``config.json``, a ``config.json`` path, or a hub id.

    Raises:
        ValueError: none of those (names what was tried).
    """
    from transformers import AutoConfig

    from cap_lab.models import ALIASES, alias_cache_dir

    if model in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[model]
    if model in ALIASES:
        path = alias_cache_dir(model) / "config.json"
        if not path.is_file():
            raise ValueError(f"alias {model!r} has no converted cache at {path.parent}; load it once "
                             f"(cap-lab score --model {model}) or pass a config.json")
        return ModelShape.from_config(AutoConfig.from_pretrained(path.parent), model)
    path = Path(model).expanduser()
    if path.is_dir() or path.is_file():
        folder = path if path.is_dir() else path.parent
        if path.is_file() and path.name != "config.json":  # any json file holding a config
            data = json.loads(path.read_text(encoding="utf-8"))
            return ModelShape.from_config(AutoConfig.for_model(data.pop("model_type"), **data), model)
        if not (folder / "config.json").is_file():
            raise ValueError(f"model folder {model!r} has no config.json")
        return ModelShape.from_config(AutoConfig.from_pretrained(folder), model)
    if model.startswith((".", "/", "~")):
        raise ValueError(f"model path {model!r} does not exist")
    try:
        return ModelShape.from_config(AutoConfig.from_pretrained(model), model)
    except OSError as e:
        raise ValueError(f"cannot read the config of {model!r}: not a built-in shape ({', '.join(BUILTIN_SHAPES)}), "
                         f"not an alias ({', '.join(ALIASES)}), not a folder or config file, and the hub could not "
                         f"provide it ({e.__class__.__name__})") from e


# ------------------------------------------------------------------ calibration shape
@dataclass(frozen=True)
class CalibrationShape:
    """Token counts of a calibration set, all the cost model needs of it.

    Attributes:
        lengths: tokens of each item (prompt and target).
        targets: target tokens of each item that a position predicts (``len - max(target_start, 1)``).
        batch_size: items per forward (reference, attribution) and at most per chunk (exact).
        max_padding: the exact scorer's chunk padding bound.
    """

    lengths: tuple[int, ...]
    targets: tuple[int, ...]
    batch_size: int = 8
    max_padding: float = 0.02

    def __post_init__(self) -> None:
        if len(self.lengths) != len(self.targets) or not self.lengths:
            raise ValueError(f"lengths ({len(self.lengths)}) and targets ({len(self.targets)}) must be equal, non-empty")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}; must be >= 1")

    @classmethod
    def of(cls, calib, batch_size: int = 8, max_padding: float = 0.02) -> "CalibrationShape":
        """From a :class:`cap_lab.calibration.CalibrationSet`."""
        return cls(tuple(len(it.input_ids) for it in calib.items),
                   tuple(len(it.input_ids) - max(it.target_start, 1) for it in calib.items), batch_size, max_padding)

    @classmethod
    def uniform(cls, n_items: int, length: int, target_fraction: float = 0.5, batch_size: int = 8) -> "CalibrationShape":
        """``n_items`` items of ``length`` tokens, ``target_fraction`` of them targets (an assumption)."""
        return cls((length,) * n_items, (max(1, round(length * target_fraction)),) * n_items, batch_size)

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def n_targets(self) -> int:
        return sum(self.targets)

    def batches(self) -> list[list[int]]:
        """Item indices of each forward of the reference and attribution scorers.

        Same order as :meth:`cap_lab.calibration.CalibrationSet.batches`: sorted by length,
        then consecutive groups of ``batch_size``.
        """
        order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def chunks(self) -> list[list[int]]:
        """Item indices of each chunk of the exact scorer."""
        return plan_chunks(list(self.lengths), self.batch_size, self.max_padding)
