"""Resolve a MODEL argument (folder, hub id, .gguf or the default) and load it."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from . import default_model
from .architectures import TEXT_MODELS, ArchitectureSpec, TextModelOf, spec_for
from .errors import (
    CorruptModelError,
    ModelNotFoundError,
    NotCausalLMError,
    ShortGPTError,
    UnsafeCheckpointError,
)
from .gguf_header import check_gguf_header
from .safetensors_io import read_header

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GGUF_MAGIC = b"GGUF"


@dataclass
class ModelSource:
    """A model on disk, resolved and checked, not yet loaded."""

    ref: str  # what the user typed, or the default model's name
    kind: str  # "hf" (safetensors folder), "pickle" (allowed .bin folder) or "gguf"
    path: Path  # the folder, or the .gguf file
    config: object  # transformers PretrainedConfig (the text model's, for ``text_of``)
    spec: ArchitectureSpec
    text_of: TextModelOf | None = None  # set when only a multimodal checkpoint's LM is used

    @property
    def name(self) -> str:
        """A short name for output files: the folder or file stem."""
        stem = self.path.stem if self.kind == "gguf" else self.path.name
        return re.sub(r"[^\w.-]+", "-", stem.split("/")[-1]) or "model"

    @property
    def num_layers(self) -> int:
        return int(getattr(self.config, self.spec.num_layers_key))

    def describe(self) -> dict:
        info = {"source": self.ref, "architecture": self.spec.model_type, "format": self.kind}
        if self.text_of is not None:
            info["text_model_of"] = self.text_of.model_type
        return info

    def config_dict(self) -> dict:
        """The (text) model's config as a plain dict: config.json for a folder, the text
        config of a multimodal one (complete, as the causal LM's config.json), the GGUF's."""
        if self.kind == "gguf":
            return self.config.to_dict()
        if self.text_of is not None:
            text = self.config.to_dict()
            text["architectures"] = [self.text_of.text_architecture]
            return text
        return json.loads((self.path / "config.json").read_text(encoding="utf-8"))

    def tensors(self, patch_file=None) -> dict:
        """Tensor locations of a safetensors source by the (text) model's tensor names;
        ``patch_file`` (healing) overrides some."""
        from .pruning import source_tensors

        rename = self.text_of.text_tensor_name if self.text_of else None
        return source_tensors(self.path, patch_file, rename=rename)


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise CorruptModelError(
            f"{path} is not a GGUF file (magic {magic!r})", hint="pass a valid .gguf file"
        )
    check_gguf_header(path)  # counts and lengths bounded by the file size


def _check_folder(path: Path, allow_pickle: bool) -> str:
    if not (path / "config.json").is_file():
        raise NotCausalLMError(
            f"{path} has no config.json, so it is not a Hugging Face model folder",
            hint="pass a folder saved with save_pretrained, a .gguf file or a hub id",
        )
    _check_config_file(path / "config.json")
    from .pruning import index_shards

    shards = index_shards(path)  # None without an index; raises on a bad one
    safetensors = sorted(set(path.glob("*.safetensors")) | set(shards or []))
    if safetensors:
        for file in safetensors:
            read_header(file)  # raises CorruptModelError with the file name
        return "hf"
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path} holds only pickle checkpoints ({pickles[0].name}), which can run code on load",
            hint="convert it to safetensors, or pass --allow-pickle if you trust its origin",
        )
    if not pickles:
        raise ModelNotFoundError(
            f"{path} has no weight files (*.safetensors)", hint="pass a complete model folder"
        )
    return "pickle"


def _check_config_file(path: Path) -> None:
    """config.json is a JSON object naming its ``model_type`` (one line otherwise)."""
    import json

    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NotCausalLMError(
            f"{path} is not valid JSON ({str(exc)[:120]})", hint="re-download or re-save the model"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise NotCausalLMError(
            f"{path} has no model_type, so the model family is unknown",
            hint='add "model_type" (e.g. "llama") to config.json',
        )


def _load_config(path: Path, kind: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        if kind == "gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ShortGPTError:
        raise
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError here
        if kind == "gguf":
            raise CorruptModelError(
                f"cannot read the GGUF metadata of {path}: {exc}",
                hint="check that the file is complete and from a llama.cpp-supported model",
            ) from exc
        raise NotCausalLMError(f"cannot read {path / 'config.json'}: {exc}") from exc


def _check_causal(config, ref: str) -> ArchitectureSpec:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    heads = getattr(config, "architectures", None) or []
    has_lm_head = not heads or any(h.endswith(("ForCausalLM", "LMHeadModel")) for h in heads)
    if (
        getattr(config, "is_encoder_decoder", False)
        or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or not has_lm_head
    ):
        raise NotCausalLMError(
            f"{ref} is a {model_type!r} model, not a decoder-only causal language model",
            hint="pass a causal LM such as Llama, Mistral or Qwen",
        )
    return spec_for(model_type)


def _snapshot_from_hub(ref: str, allow_pickle: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        if allow_pickle:
            patterns.append("*.bin")
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as exc:
        raise ModelNotFoundError(
            f"{ref!r} is not a local path and the hub lookup failed ({type(exc).__name__})",
            hint="check the path, or the hub id and your network / HF_TOKEN",
        ) from exc


def resolve_source(
    model: str | None, *, trust_remote_code: bool = False, allow_pickle: bool = False
) -> ModelSource:
    """Find the model, check its files and family, and read its config (no weights yet)."""
    if model is None:
        path = default_model.default_model_path()
        ref = default_model.DISPLAY_NAME
    else:
        ref = model
        path = Path(model).expanduser()
        if not path.exists():
            if HUB_ID.match(model) and not model.startswith((".", "/", "~")):
                path = _snapshot_from_hub(model, allow_pickle)
            else:
                raise ModelNotFoundError(
                    f"model path {model!r} does not exist",
                    hint="pass an existing folder, a .gguf file or a hub id like org/name",
                )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise NotCausalLMError(
                f"{path} is a file but not a .gguf", hint="pass a model folder or a .gguf file"
            )
        _check_gguf(path)
        kind = "gguf"
    else:
        kind = _check_folder(path, allow_pickle)
    config = None
    if kind == "gguf":
        from .load_cache import cached_source_config

        config = cached_source_config(path)  # reading a GGUF's metadata takes seconds
    if config is None:
        config = _load_config(path, kind, trust_remote_code)
    config, text_of = _text_model(config, ref)
    spec = _check_causal(config, ref)
    return ModelSource(ref=ref, kind=kind, path=path, config=config, spec=spec, text_of=text_of)


def _text_model(config, ref: str) -> tuple[object, TextModelOf | None]:
    """A multimodal checkpoint listed in TEXT_MODELS stands for its text model: its text
    config (the other towers are dropped); any other config stays as it is."""
    text_of = TEXT_MODELS.get(getattr(config, "model_type", None) or "")
    text = getattr(config, text_of.text_config_key, None) if text_of else None
    if text is None:
        return config, None
    log.info(
        "%s is a multimodal %s checkpoint: pruning its text model (%s), dropping its %s",
        ref,
        text_of.model_type,
        text.model_type,
        text_of.dropped,
    )
    if getattr(text, "dtype", None) is None and getattr(config, "dtype", None) is not None:
        text.dtype = config.dtype
    return text, text_of


def pick_device(requested: str | None = None) -> str:
    """CUDA if present, else Apple MPS, else CPU; ``requested`` overrides and is checked."""
    import torch

    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None
        and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested and requested != "auto":
        kind = requested.split(":")[0]
        if kind not in available:
            raise ShortGPTError(f"unknown device {requested!r}", hint="use auto, cpu, cuda or mps")
        if not available[kind]:
            raise ShortGPTError(
                f"device {requested!r} is not available here", hint="use --device cpu"
            )
        return requested
    return next(name for name, ok in available.items() if ok)


def pick_dtype(device: str, requested: str = "auto"):
    """float32 on CPU; bfloat16 on CUDA; float16 on MPS; ``requested`` overrides."""
    import torch

    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if requested != "auto":
        if requested not in names:
            raise ShortGPTError(
                f"unknown dtype {requested!r}", hint=f"use auto or {', '.join(names)}"
            )
        return names[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


@dataclass
class LoadedModel:
    source: ModelSource
    model: object  # transformers PreTrainedModel
    tokenizer: object


def load_model(
    source: ModelSource,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load weights and tokenizer of a resolved source onto ``device``, in eval mode."""
    torch_dtype = pick_dtype(device, dtype)
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(source, torch_dtype)
    else:
        model, tokenizer = _load_folder(source, torch_dtype, trust_remote_code)
    model.to(device)
    model.eval()
    log.info(
        "loaded %s (%s, %d layers) on %s as %s",
        source.ref,
        source.spec.model_type,
        source.num_layers,
        device,
        torch_dtype,
    )
    return LoadedModel(source=source, model=model, tokenizer=tokenizer)


def _load_error(source: ModelSource, exc: Exception) -> CorruptModelError:
    return CorruptModelError(
        f"cannot load {source.ref}: {type(exc).__name__}: {exc}".splitlines()[0][:300],
        hint="check that the weight files are complete",
    )


def _load_folder(source: ModelSource, torch_dtype, trust_remote_code: bool):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_class, path, weights = AutoModelForCausalLM, source.path, {}
    if source.text_of is not None:  # a multimodal checkpoint: its text model's tensors only
        model_class = getattr(transformers, source.text_of.text_architecture)
        path, weights = None, {"config": source.config, "state_dict": _text_state(source)}
    try:
        model, info = model_class.from_pretrained(
            path,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=source.kind == "hf",
            output_loading_info=True,
            **weights,
        )
        if source.text_of is not None and info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise CorruptModelError(
                f"{source.ref}: the text model's tensors are incomplete "
                f"({len(missing)} missing, e.g. {missing[0]})",
                hint="check that the weight files are complete",
            )
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except ShortGPTError:
        raise
    except Exception as exc:
        raise _load_error(source, exc) from exc
    return model, tokenizer


def _text_state(source: ModelSource) -> dict:
    """The text model's state dict, by its own tensor names, over memory maps of the
    checkpoint (no heap copy; the other towers are never read)."""
    from .offload import SafetensorsWeights

    weights = SafetensorsWeights(source)
    return {name: weights.tensor(name, ref.shape) for name, ref in weights.refs.items()}


def _load_gguf(source: ModelSource, torch_dtype):
    """A GGUF source from its converted copy in the load cache, else converted (and cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import load_cache
    from .gguf_tokenizer import align_model_config, tokenizer_from_gguf

    dtype_name = str(torch_dtype).removeprefix("torch.")
    entry = load_cache.find_entry(source.path, dtype_name)
    if entry is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                entry, dtype=torch_dtype, use_safetensors=True
            )
            tokenizer = AutoTokenizer.from_pretrained(entry)
            log.info("loaded %s from the load cache (%s)", source.path.name, entry)
            return model, tokenizer
        except Exception as exc:  # checked, yet unreadable: rebuild it from the GGUF
            load_cache.discard(entry, f"{type(exc).__name__}: {exc}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path.parent, gguf_file=source.path.name, dtype=torch_dtype
        )
        # transformers' GGUF tokenizer conversion gets byte-level BPE and EOS wrong;
        # this builds (or corrects) it from the GGUF's own fields
        tokenizer = tokenizer_from_gguf(source.path)
    except ShortGPTError:
        raise
    except Exception as exc:
        raise _load_error(source, exc) from exc
    align_model_config(model, source.path)
    # transformers points the slow-tokenizer file at the .gguf itself; saving would
    # copy the whole GGUF into the folder as "tokenizer.model"
    if hasattr(tokenizer, "vocab_file"):
        tokenizer.vocab_file = None
    load_cache.store_entry(source.path, dtype_name, model, tokenizer, source.config)
    return model, tokenizer
