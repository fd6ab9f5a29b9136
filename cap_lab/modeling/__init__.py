"""The modeling layer: the only code in cap_lab that touches transformers internals.

Everything else (scoring, pruning, evaluation) calls these modules, so a transformers release
that moves or renames something is one change here, and a release that changes behaviour fails
here with one clear :class:`ReplayError` naming the version:

* :mod:`~cap_lab.modeling.layout`: the adapter table (where each family keeps its layers,
  attention and MLP projections, final norm and LM head) and the head geometry;
* :mod:`~cap_lab.modeling.hooks`: scoped forward hooks (head masking before ``o_proj``, neuron
  masking before ``down_proj``, input capture);
* :mod:`~cap_lab.modeling.replay`: capture one intact forward and replay decoder layers
  ``start..stop`` with the model's own arguments, checked by value and self-verified per model;
* :mod:`~cap_lab.modeling.head`: final norm, LM head, soft-capping and chunked log-probs /
  target cross-entropy, written once;
* :mod:`~cap_lab.modeling.decoding`: forwards with a KV cache for evaluation;
* :mod:`~cap_lab.modeling.offload`: layer-by-layer execution with one decoder layer at a time
  on the accelerator, for models larger than it.
"""
from cap_lab.modeling.decoding import decoder_forward, lm_forward, repeat_cache, select_cache
from cap_lab.modeling.head import TargetTokens, lm_logits, target_loss_sums, token_logprobs
from cap_lab.modeling.hooks import StopForward, capture_inputs, mask_heads, mask_neurons
from cap_lab.modeling.layout import (
    ARCH_TABLE, ATTENTION_PROJECTIONS, HOOK_SITES, MLP_PROJECTIONS, SUPPORTED_MODEL_TYPES, ModelLayout, get_layout,
    model_device,
)
from cap_lab.modeling.offload import LayerOnloader, onload_layers
from cap_lab.modeling.replay import Capture, ReplayError, call_layer, capture, run_layers

__all__ = [
    "ARCH_TABLE", "ATTENTION_PROJECTIONS", "Capture", "HOOK_SITES", "LayerOnloader", "MLP_PROJECTIONS", "ModelLayout",
    "ReplayError", "SUPPORTED_MODEL_TYPES", "StopForward", "TargetTokens", "call_layer", "capture", "capture_inputs",
    "decoder_forward", "get_layout", "lm_forward", "lm_logits", "mask_heads", "mask_neurons", "model_device",
    "onload_layers", "repeat_cache", "run_layers", "select_cache", "target_loss_sums", "token_logprobs",
]
