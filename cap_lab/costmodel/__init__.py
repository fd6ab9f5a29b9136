"""What head scoring costs: FLOPs, memory traffic and predicted wall time of each scorer (issue 14).

The causal score of a head (paper Sec. 3.2, Eq. 1-2) needs the calibration loss with that head
masked. The three scorers of :mod:`cap_lab.scoring` get it with very different amounts of work,
counted here from the model's shape and the calibration set's token counts, exactly as the code
runs them:

* **reference** (:mod:`cap_lab.scoring.reference`): 1 + L*H full forwards over the calibration
  set in batches of ``batch_size`` items (sorted by length, padded to the longest), the LM head at
  every position, then ``cross_entropy`` over the full logits;
* **exact** (:mod:`cap_lab.scoring.exact`): per chunk (:func:`cap_lab.scoring.exact.plan_chunks`)
  one intact capture pass; then for each layer l and each of its H heads, layers l..L-1 and the
  LM head at target positions only; one intact call of layer l advances the kept hidden states.
  The first capture of a model replays two copies of its batch through every layer
  (:func:`cap_lab.modeling.replay.verify_replay`);
* **attribution** (:mod:`cap_lab.scoring.attribution`): one forward (LM head at target positions)
  and one backward that asks for input gradients only, back to layer 0's ``o_proj`` input
  (:meth:`ModelShape.input_grad_flops`): about one more forward.

FLOPs are 2 per multiply-add: the decoder layers' seven linear projections (q, k, v, o, gate, up,
down), attention at ``4 * H * D`` per (query, key) pair the causal or sliding-window mask allows,
and the LM head. Norms, rotary embeddings, activations and residual adds are not counted.

Wall time is predicted as ``compute + memory``:

* compute = FLOPs / FLOP/s, at three rates: decoder layers (their matmuls with the norms,
  activation and rotary embeddings around them), the LM head (writing its (rows, vocab) output),
  and a forward with autograd plus its backward (attribution);
* memory = bytes moved by the elementwise passes over (rows, vocab) logits / bandwidth: Gemma's
  logit soft-capping, the float32 copy of the shifted logits, the log-softmax (and for
  attribution their backward). FLOPs / throughput alone is too crude: on a CPU the reference
  scorer on a 262k vocabulary spends a large share of its time in these passes, which write
  fresh logit-sized tensors at every position of every masked pass.

:func:`calibrate` measures the rates on this machine (one random decoder layer of the model's
architecture, the LM head, a log-softmax over a fresh (rows, vocab) tensor); :data:`H100_CLASS`
is a stated accelerator profile (one rate for all FLOPs). ``cap-lab plan`` (:mod:`cap_lab.cli.plan`) prints the result;
``benchmarks/bench_scoring.py`` compares it with measured times.
"""
from cap_lab.costmodel.counting import (
    METHODS, ScoringCost, attribution_cost, exact_cost, exact_rank_costs, logit_bytes, reference_cost, scoring_costs,
)
from cap_lab.costmodel.shapes import BUILTIN_SHAPES, CalibrationShape, ModelShape, load_shape
from cap_lab.costmodel.timing import (
    CLOCKS, H100_CLASS, LM_HEAD_COLUMNS, Prediction, Throughput, calibrate, format_table, one_layer_config, predict,
)

__all__ = [
    "BUILTIN_SHAPES", "CLOCKS", "H100_CLASS", "LM_HEAD_COLUMNS", "METHODS", "CalibrationShape", "ModelShape",
    "Prediction", "ScoringCost", "Throughput", "attribution_cost", "calibrate", "exact_cost", "exact_rank_costs",
    "format_table", "load_shape", "logit_bytes", "one_layer_config", "predict", "reference_cost", "scoring_costs",
]
