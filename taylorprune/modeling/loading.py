"""Load a causal LM and its tokenizer from a local folder, a hub id, a GGUF file, or the built-in demo.

Loading goes through ``transformers`` (and accelerate when ``device_map`` is given). Without a device map the
model is materialised on the CPU and the engine streams one decoder block at a time to the compute device,
which is what lets a model larger than the GPU prune on it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from taylorprune.errors import UserError
from taylorprune.modeling import gguf

DEMO_NAMES = ("demo", "stories260K")
MAX_DEFAULT_SEQLEN = 2048
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    """A model ready for pruning, with where it came from."""

    model: nn.Module
    tokenizer: object
    source: str
    gguf_file: str | None = None
    tokenizer_gguf: str | None = None  # the GGUF the tokenizer was read from: a GGUF we write copies its metadata


def demo_dir() -> Path:
    """The bundled stories260K folder (MIT, karpathy/tinyllamas)."""
    return Path(str(resources.files("taylorprune") / "assets" / "stories260K"))


def resolve_source(model: str) -> tuple[str, str | None]:
    """Turn ``--model`` into (folder or hub id, gguf file name or None); refuse paths that do not exist."""
    if model in DEMO_NAMES:
        return str(demo_dir()), None
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"--model {model}: GGUF file not found")
        return str(path.parent.resolve()), path.name
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {model}: expected a model folder, a hub id or a .gguf file")
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model}: folder has no config.json (not a Hugging Face model folder)")
        return str(path.resolve()), None
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        raise UserError(f"--model {model}: no such folder or file")
    return model, None


def torch_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_weights_present(folder: Path) -> None:
    """Refuse pickle-only or weightless folders before transformers gets a chance to unpickle anything."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise UserError(
            f"{folder} holds only pickle checkpoints (.bin/.pt); taylorprune loads safetensors only, because "
            "unpickling runs code from the file. Convert it first (e.g. save_pretrained in a trusted session)"
        )
    raise UserError(f"{folder} has a config.json but no *.safetensors weights")


def load_config(model: str, trust_remote_code: bool = False):
    """Read only the config (cheap): refuse what is not a causal LM before any weight is loaded."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    source, gguf_file = resolve_source(model)
    common = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    elif Path(source).is_dir():
        _check_weights_present(Path(source))
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model {model}: cannot read its config ({_first_line(exc)})") from None
    except Exception as exc:  # the gguf reader raises its own errors on a damaged or truncated file
        if not gguf_file:
            raise
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        raise UserError(f"--model {model}: not a readable GGUF file ({reason})") from None
    if gguf_file:
        gguf.complete_config(config, Path(source) / gguf_file)
    archs = getattr(config, "architectures", None) or []
    # The architecture the checkpoint was saved as decides: a BertModel is not a causal LM even though
    # transformers can build a BertLMHeadModel from its config.
    causal = any(a.endswith("ForCausalLM") for a in archs) or (
        not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if not causal:
        raise UserError(
            f"--model {model}: {config.model_type} ({', '.join(archs) or 'no architecture'}) is not a decoder-only "
            "causal LM; supported are models AutoModelForCausalLM loads (LLaMA, Mistral, Qwen2, Gemma, ...)"
        )
    return config


def resolve_seqlen(requested: int | None, config, flag: str = "--seqlen") -> int:
    """A window length the model supports; default min(2048, max_position_embeddings), never Llama-3's 131072."""
    limit = getattr(config, "max_position_embeddings", None)
    if requested is None:
        return min(MAX_DEFAULT_SEQLEN, limit or MAX_DEFAULT_SEQLEN)
    if requested < 2:
        raise UserError(f"{flag} {requested}: must be at least 2")
    if limit and requested > limit:
        raise UserError(f"{flag} {requested}: the model supports at most {limit} positions")
    return requested


BOS_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def window_start(config, tokenizer) -> int | None:
    """The token every calibration and evaluation window starts with, or None (the text's tokens as they come).

    Gemma models always run after a BOS: without one each window is scored in a state the model never runs in
    (Gemma-3-270m's perplexity on 20 × 512 WikiText-2 windows: 68.96 without, 26.99 with). The LLaMA-class
    families keep the papers' protocol (the text tokenized once, windows cut from it as they are).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    bos = getattr(tokenizer, "bos_token_id", None)
    families = {getattr(text, "model_type", None), getattr(config, "model_type", None)}
    return bos if families & set(BOS_FAMILIES) and bos is not None else None


def input_bytes(model: str) -> int | None:
    """Size of a local checkpoint's weight files (the output is about as large); None when unknown."""
    source, gguf_file = resolve_source(model)
    if gguf_file or not Path(source).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(source).glob("*.safetensors"))


def load(
    model: str,
    dtype: str = "auto",
    device_map: str | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    config=None,
) -> Loaded:
    """Load model and tokenizer; every failure a user can cause becomes a one-line ``UserError``.

    ``config``: the one ``load_config`` returned while validating (not read again).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = copy.deepcopy(config) if config is not None else load_config(model, trust_remote_code)
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and not 0 <= pad < getattr(config, "vocab_size", pad + 1):
        config.pad_token_id = None  # some GGUF conversions (llama2.c) carry a pad id outside the vocabulary
    source, gguf_file = resolve_source(model)
    torch_dt = torch_dtype(dtype)
    common = {"trust_remote_code": trust_remote_code, **({"gguf_file": gguf_file} if gguf_file else {})}
    kwargs = dict(common, dtype=torch_dt)
    if device_map:
        kwargs.update(device_map=device_map, offload_folder=offload_folder)
    if not gguf_file:
        kwargs["use_safetensors"] = True
    try:
        with _quiet_transformers():
            net = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
            tokenizer, from_gguf = _load_tokenizer(AutoTokenizer, source, common)
    except ValueError as exc:
        raise UserError(f"--model {model}: not a causal LM taylorprune can load ({_first_line(exc)})") from None
    except OSError as exc:
        raise UserError(f"--model {model}: cannot load weights ({_first_line(exc)})") from None
    except Exception as exc:  # safetensors raises its own errors for corrupt or truncated files
        if type(exc).__name__ in {"SafetensorError", "HeaderTooLarge", "MetadataIncompleteBuffer"}:
            raise UserError(f"--model {model}: corrupt or truncated safetensors ({_first_line(exc)})") from None
        raise
    if gguf_file:
        net = gguf.strip_quantizer(net, torch_dt)
    net.eval()
    net.requires_grad_(False)
    return Loaded(net, tokenizer, source, gguf_file, str(Path(source) / gguf_file) if from_gguf else None)


def _load_tokenizer(auto, source: str, common: dict):
    """(tokenizer, whether it came from the GGUF file) of the checkpoint; for a GGUF whose embedded vocabulary
    transformers cannot read, the tokenizer files beside it (llama2.c conversions carry special-token ids outside
    their vocabulary)."""
    try:
        return auto.from_pretrained(source, **common), "gguf_file" in common
    except (IndexError, KeyError, ValueError) as exc:
        beside = Path(source)
        if "gguf_file" in common and ((beside / "tokenizer.json").is_file() or (beside / "tokenizer.model").is_file()):
            return auto.from_pretrained(source, trust_remote_code=common["trust_remote_code"]), False
        raise UserError(f"cannot load the tokenizer of {source} ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _quiet_transformers:
    """Silence transformers' info/warning chatter (progress bars of its own) while loading, and read a GGUF's
    metadata once (``_metadata_once``)."""

    def __enter__(self) -> None:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logging.getLogger("accelerate").setLevel(logging.ERROR)
        self._read = getattr(gguf_utils, "load_gguf_checkpoint", None)
        if self._read is not None and not hasattr(self._read, "wrapped"):
            gguf_utils.load_gguf_checkpoint = gguf.metadata_once(self._read)

    def __exit__(self, *exc: object) -> None:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._read is not None and not hasattr(self._read, "wrapped"):
            gguf_utils.load_gguf_checkpoint = self._read
