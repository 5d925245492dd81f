"""Tiny random models and test data: one config row per family, a tiny trained tokenizer,
and the builders the session fixtures in conftest.py call."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


WIKITEXT = SHARED_DATA / "wikitext-2-raw-test.txt"


# One row per family: the config arguments that give a tiny model with a per-layer
# config list that is not uniform (sliding-window layers), so slicing is exercised.
TINY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3},
    "qwen3": {
        "use_sliding_window": True,
        "sliding_window": 16,
        "max_window_layers": 3,
        "head_dim": 16,
    },
    # issue 13's families. Sliding-window ones get a 16-token window (tests run longer
    # windows); MoE ones 4 experts, top-2; Gemma 3's pattern period is 6, so 7 layers.
    # query_pre_attn_scalar = head_dim as in the real checkpoints (llama.cpp assumes it)
    "gemma2": {
        "sliding_window": 16,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "tie_word_embeddings": True,
    },
    "gemma3_text": {
        "sliding_window": 16,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "num_hidden_layers": 7,
        "tie_word_embeddings": True,
        "rope_scaling": None,
    },
    "phi3": {"sliding_window": None, "pad_token_id": 0},
    "granite": {
        "embedding_multiplier": 4.0,
        "logits_scaling": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.25,
    },
    "olmo2": {},
    # no sliding window, as the Mixtral checkpoints (llama.cpp runs Mixtral without one)
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [4],
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "head_dim": 16,
        "mlp_only_layers": [1],
        "norm_topk_prob": True,  # as Qwen3-MoE checkpoints (llama.cpp assumes it)
    },
    # llama.cpp pads a Mamba vocabulary to a multiple of 8 (Mamba-2: 16) and expects the
    # embedding padded too, as the real checkpoints ship it: 608 fits both tokenizers
    "mamba": {
        "hidden_size": 64,
        "state_size": 8,
        "num_hidden_layers": 6,
        "expand": 2,
        "vocab_size": 608,
    },
    "mamba2": {
        "vocab_size": 608,
        "hidden_size": 64,
        "state_size": 16,
        "num_hidden_layers": 6,
        "expand": 2,
        "head_dim": 16,
        "num_heads": 8,
        "n_groups": 1,
        "chunk_size": 16,
    },
    "rwkv": {
        "hidden_size": 64,
        "attention_hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "context_length": 256,
        "rescale_every": 0,
    },
}


# The families test_pruning / test_gguf / test_onnx run over (built-in GGUF writer);
# the others are tested family by family in test_families.py.
CORE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


# families whose config takes none of TINY_COMMON's attention keys
NO_ATTENTION = ("mamba", "mamba2", "rwkv")


TINY_COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}


def calibration_text() -> str:
    return resources.files("shortgpt_export").joinpath("data/calibration.txt").read_text("utf-8")


def build_tiny_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer (vocab 512) trained on the built-in calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([calibration_text()], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.save_pretrained(out)
    return out


# The decoder parameters (regex on names inside a block) the scale-up below multiplies,
# where not all 2-D ones. Mamba: the scan multiplies x, dt, B and C, so scaling them too
# sends the out_proj input to 1.6e9 at block 5, past F16's 65504: llama.cpp feeds F16 and
# quantized matrix products F16 activations, which overflow to NaN (F16, Q8_0, Q4_K_M all
# NaN; F32 fine). Scaling out_proj alone keeps every linear input under 4 and each block
# distinct. Mamba-2: unscaled (its blocks differ without it; scaled, the tiny model turns
# so sensitive that F16 rounding alone flips top-1 on non-tied tokens, in torch too).
SCALED_PARAMS = {"mamba": r"mixer\.out_proj\.", "mamba2": r"(?!)"}


SLIDING_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers")


def build_tiny_model(
    family: str,
    tokenizer_dir: Path,
    out: Path,
    seed: int = 0,
    full_attention: bool = False,
    **overrides,
) -> Path:
    """A tiny random model of ``family``; ``full_attention`` drops its sliding windows
    (llama.cpp runs these families without them); ``overrides`` replace config keys."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    extra = {
        k: v for k, v in TINY_CONFIGS[family].items() if not (full_attention and k in SLIDING_KEYS)
    }
    extra.update(overrides)
    if full_attention and family == "mistral":
        extra["sliding_window"] = None
    from shortgpt_export.architectures import spec_for

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    base = {} if family in NO_ATTENTION else TINY_COMMON
    config = AutoConfig.for_model(family, **{**ids, **base, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    spread_layers(model, spec_for(family).decoder_layers(model), SCALED_PARAMS.get(family))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def spread_layers(model, layers, scaled_params: str | None = None) -> None:
    """Random init gives near-identity residual blocks; scale the weights up so each
    layer changes the hidden state by a different, measurable amount."""
    scaled = re.compile(scaled_params or r".*(?<!A_log)$")
    with torch.no_grad():
        for index, layer in enumerate(layers):
            for name, param in layer.named_parameters():
                if param.dim() == 2 and scaled.match(name):
                    param.mul_(1.0 + 2.0 * index)
        # Peaked next-token distributions, like a trained model's: near-ties between the
        # top two tokens would make top-1 agreement measure rounding noise.
        model.get_output_embeddings().weight.mul_(8.0)


def build_tiny_gemma3_multimodal(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A tiny random Gemma3ForConditionalGeneration: the tiny ``gemma3_text`` row as its
    text model (7 layers, 16-token sliding window) and a one-layer SigLIP vision tower,
    saved with save_pretrained (transformers 4.57: ``language_model.model.*`` names)."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    text = {**TINY_COMMON, **TINY_CONFIGS["gemma3_text"], "vocab_size": vocab}
    text.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
    }  # fmt: skip
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=vocab - 3,
        eoi_token_index=vocab - 2,
        image_token_index=vocab - 1,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    spread_layers(model, model.model.language_model.layers)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text('{"image_processor_type": "Gemma3Image"}')
    return out


# A tiny checkpoint builder per multimodal wrapper in architectures.TEXT_MODELS.
TINY_TEXT_MODELS = {"gemma3": build_tiny_gemma3_multimodal}

# Every export back-end in shortgpt_export.converters.BACKENDS and its test module.
BACKEND_TESTS = {"hf": "test_pruning.py", "gguf": "test_gguf.py", "onnx": "test_onnx.py"}
