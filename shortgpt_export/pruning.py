"""Remove decoder layers: in memory (for scoring checks and GGUF sources) and on disk.

On disk, a Hugging Face folder is pruned by streaming: tensors are located in the source
safetensors files, those of removed layers are skipped, the rest renamed so layer indices
are contiguous again, and their bytes copied into new shards one tensor at a time.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

from .architectures import ArchitectureSpec
from .errors import CorruptModelError
from .model_card import render_model_card
from .planning import Plan
from .progress import ProgressFactory, no_progress
from .safetensors_io import TensorRef, read_header, write_safetensors

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Files that travel with the weights unchanged.
COMPANION_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "*.tiktoken", "spiece.model", "chat_template.*", "generation_config.json",
    "preprocessor_config.json",
)  # fmt: skip


def prune_config_dict(config: dict, spec: ArchitectureSpec, keep: list[int]) -> dict:
    """A copy of a config dict for the kept layers: layer count set, per-layer lists sliced,
    and the keys that name layers by index (``max_window_layers``, MoE ``mlp_only_layers``
    with ``decoder_sparse_step``) rewritten so every kept layer keeps its kind."""
    old = int(config[spec.num_layers_key])
    new = dict(config)
    new[spec.num_layers_key] = len(keep)
    for key in spec.per_layer_config_keys:
        value = config.get(key)
        if isinstance(value, list) and len(value) == old:
            new[key] = [value[i] for i in keep]
    threshold = config.get("max_window_layers")  # layers below it use full attention
    if isinstance(threshold, int) and not isinstance(threshold, bool):
        new["max_window_layers"] = sum(1 for i in keep if i < threshold)
    new.update(_sparse_layer_keys(config, keep))
    return new


def _sparse_layer_keys(config: dict, keep: list[int]) -> dict:
    """Qwen-MoE: layer i is dense when listed in ``mlp_only_layers`` or when
    ``(i + 1) % decoder_sparse_step != 0``. Both depend on the index, so the pruned config
    lists its dense layers explicitly (step 1)."""
    step = config.get("decoder_sparse_step")
    dense_list = config.get("mlp_only_layers")
    if step is None and dense_list is None:
        return {}
    step = int(step or 1)
    dense_set = set(dense_list or [])
    experts = int(config.get("num_experts") or 0)

    def dense(i: int) -> bool:
        return i in dense_set or experts == 0 or (i + 1) % step != 0

    return {
        "decoder_sparse_step": 1,
        "mlp_only_layers": [new for new, old in enumerate(keep) if dense(old)],
    }


# config attributes prune_config_dict may change, beyond the layer count and per-layer lists
INDEXED_CONFIG_KEYS = ("max_window_layers", "decoder_sparse_step", "mlp_only_layers")
# block attributes that hold the block's own index (KV cache slot, SSM / RWKV state slot)
LAYER_INDEX_ATTRS = ("layer_idx", "layer_id")


HEAL_ATTR = "_shortgpt_heal"


@contextmanager
def healed(model, keep: list[int], weights: dict[int, object] | None) -> Iterator[object]:
    """While inside, every :func:`pruned_view` of ``model`` with exactly ``keep`` is the
    healed model: the patched down-projection ``weights`` (by original layer) replace the
    originals. The full model (and any other ``keep``) stays the original."""
    if not weights or model is None:
        yield model
        return
    previous = getattr(model, HEAL_ATTR, None)  # nested use (export inside a run) is fine
    setattr(model, HEAL_ATTR, (tuple(keep), weights))
    try:
        yield model
    finally:
        if previous is None:
            delattr(model, HEAL_ATTR)
        else:
            setattr(model, HEAL_ATTR, previous)


@contextmanager
def _patched(model, spec: ArchitectureSpec, keep: list[int]) -> Iterator[None]:
    from .architectures import submodule

    heal = getattr(model, HEAL_ATTR, None)
    if heal is None or heal[0] != tuple(keep):
        yield
        return
    layers = spec.decoder_layers(model)
    saved = {}
    try:
        for index, weight in heal[1].items():
            linear = submodule(layers[index], spec.down_proj_path)
            saved[index] = linear.weight.data
            linear.weight.data = weight.to(device=saved[index].device, dtype=saved[index].dtype)
        yield
    finally:
        for index, data in saved.items():
            submodule(layers[index], spec.down_proj_path).weight.data = data


@contextmanager
def pruned_view(model, spec: ArchitectureSpec, keep: list[int]) -> Iterator[object]:
    """Temporarily turn ``model`` into its pruned self (no weight copies); restore on exit.

    Kept blocks are renumbered (``layer_idx`` of attention modules, so the KV cache uses
    contiguous slots) and the config's layer count and per-layer lists follow. Inside
    :func:`healed` for the same ``keep``, the healed weights are in place.
    """
    with _patched(model, spec, keep), _pruned_view(model, spec, keep) as view:
        yield view


@contextmanager
def _pruned_view(model, spec: ArchitectureSpec, keep: list[int]) -> Iterator[object]:
    import torch

    container_path, _, attr = spec.layers_path.rpartition(".")
    container = model
    for part in filter(None, container_path.split(".")):
        container = getattr(container, part)
    original_layers = getattr(container, attr)
    config = model.config
    keys = (spec.num_layers_key, *spec.per_layer_config_keys, *INDEXED_CONFIG_KEYS)
    saved_config = {k: getattr(config, k) for k in keys if hasattr(config, k)}
    saved_idx: list[tuple[object, str, int]] = []
    moved: list[tuple[object, str]] = []
    try:
        setattr(container, attr, torch.nn.ModuleList([original_layers[i] for i in keep]))
        for new_index, old_index in enumerate(keep):
            for module in original_layers[old_index].modules():
                for name in LAYER_INDEX_ATTRS:
                    if isinstance(getattr(module, name, None), int):
                        saved_idx.append((module, name, getattr(module, name)))
                        setattr(module, name, new_index)
        if keep and keep[0] != 0:  # the new first block takes over block 0's own modules
            for name in spec.first_block_modules:
                setattr(original_layers[keep[0]], name, getattr(original_layers[0], name))
                moved.append((original_layers[keep[0]], name))
        pruned = prune_config_dict(saved_config, spec, keep)
        for key, value in pruned.items():
            setattr(config, key, value)
        yield model
    finally:
        setattr(container, attr, original_layers)
        for module, name, index in saved_idx:
            setattr(module, name, index)
        for module, name in moved:
            delattr(module, name)
        for key, value in saved_config.items():
            setattr(config, key, value)


INDEX_FILE = "model.safetensors.index.json"


def inside_folder(path: Path, folder: Path) -> bool:
    """Whether ``path`` resolves inside ``folder`` (or, for a Hugging Face cache snapshot,
    inside the blob store of the same repository, which its symlinks point into)."""
    real, root = path.resolve(), folder.resolve()
    if root in real.parents:
        return True
    snapshots = folder.absolute().parent
    if snapshots.name == "snapshots":
        blobs = (snapshots.parent / "blobs").resolve()
        return blobs in real.parents
    return False


def index_shards(folder: Path) -> list[Path] | None:
    """The shard files named by ``model.safetensors.index.json``, checked; None without one.

    Shard names must be plain file names of existing files that resolve inside ``folder``.
    """
    index = folder / INDEX_FILE
    if not index.is_file():
        return None

    def bad(why: str) -> CorruptModelError:
        return CorruptModelError(f"{index}: {why}", hint="re-download or re-save the model")

    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not valid JSON ({str(exc)[:120]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise bad("no 'weight_map' object of tensor names to shard file names")
    shards = []
    for name in sorted(set(weight_map.values())):
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise bad(f"shard {name[:80]!r} is not a plain file name in the model folder")
        path = folder / name
        if not path.is_file():
            raise bad(f"shard {name!r} is missing")
        if not inside_folder(path, folder):
            raise bad(f"shard {name!r} is a link that leads outside the model folder")
        shards.append(path)
    return shards


def source_tensors(
    folder: Path, patch_file: str | Path | None = None, *, rename=None
) -> dict[str, TensorRef]:
    """Tensor locations of a safetensors folder; ``patch_file`` (healing) overrides some.

    ``rename`` (a multimodal checkpoint's text model, ``TextModelOf.text_tensor_name``)
    maps each checkpoint name to the name used from here on, or to None to leave it out.
    """
    files = index_shards(folder)
    if files is None:
        files = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, TensorRef] = {}
    for file in files:
        for name, ref in read_header(file)[0].items():
            new = name if rename is None else rename(name)
            if new is not None:
                tensors[new] = ref if new == name else ref.renamed(new)
    if patch_file is not None:
        for name, ref in read_header(Path(patch_file))[0].items():
            if name not in tensors or tensors[name].shape != ref.shape:
                raise CorruptModelError(f"{patch_file}: {name} does not match the model")
            tensors[name] = ref
    return tensors


def plan_tensors(
    tensors: dict[str, TensorRef], spec: ArchitectureSpec, plan: Plan
) -> list[TensorRef]:
    """The tensors of the pruned model, renamed to contiguous layer indices, in layer order."""
    new_index = {old: new for new, old in enumerate(plan.keep)}
    kept: list[tuple[int, str, TensorRef]] = []
    for name, ref in tensors.items():
        layer = spec.layer_of(name)
        if layer is None:
            kept.append((-1, name, ref))
        elif layer >= plan.num_layers:
            raise CorruptModelError(
                f"tensor {name} belongs to layer {layer} "
                f"but the config has {plan.num_layers} layers"
            )
        elif layer in new_index:
            renamed = spec.renumber(name, new_index[layer])
            kept.append((new_index[layer], renamed, ref.renamed(renamed)))
    return [ref for _, _, ref in sorted(kept, key=lambda item: (item[0], item[1]))]


def _shard(refs: list[TensorRef], max_bytes: int) -> list[list[TensorRef]]:
    shards: list[list[TensorRef]] = [[]]
    size = 0
    for ref in refs:
        if shards[-1] and size + ref.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(ref)
        size += ref.nbytes
    return shards


def write_pruned_safetensors(
    tensors: dict[str, TensorRef],
    spec: ArchitectureSpec,
    plan: Plan,
    out_dir: Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: ProgressFactory = no_progress,
) -> int:
    """Stream the kept ``tensors`` (:func:`source_tensors`) into shards in ``out_dir``;
    returns bytes written."""
    refs = plan_tensors(tensors, spec, plan)
    shards = _shard(refs, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    written = 0
    with progress("writing pruned safetensors", sum(r.nbytes for r in refs)) as advance:
        for name, shard in zip(names, shards, strict=True):
            written += write_safetensors(out_dir / name, shard, {"format": "pt"})
            advance(sum(r.nbytes for r in shard))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(r.nbytes for r in refs)},
            "weight_map": {
                ref.name: name for name, shard in zip(names, shards, strict=True) for ref in shard
            },
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, allow_nan=False))
    return written


def copy_companions(folder: Path, out_dir: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy tokenizer and generation files (but not those named in ``skip``) into
    ``out_dir``; returns the names copied.

    A companion that is a link leading outside ``folder`` is skipped with a warning, so a
    crafted folder cannot pull an arbitrary file into the output.
    """
    copied = []
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and any(fnmatch(path.name, p) for p in COMPANION_FILES)):
            continue
        if path.name in skip:
            continue
        if not inside_folder(path, folder):
            log.warning(
                "skipped %s: it is a link to %s, outside the model folder",
                path.name,
                path.resolve(),
            )
            continue
        shutil.copyfile(path, out_dir / path.name)
        copied.append(path.name)
    return copied


def write_pruned_model(
    source,
    plan: Plan,
    out_dir: Path,
    *,
    loaded=None,
    calibration: dict | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: ProgressFactory = no_progress,
) -> Path:
    """Write the pruned Hugging Face folder for ``source`` into the (new) folder ``out_dir``.

    Safetensors folders are streamed from disk (a multimodal checkpoint's text model
    alone, renamed on the fly: a plain causal LM of its family); a GGUF source is written
    from the ``loaded`` model with a pruned view, or, with no model in memory (``loaded``
    None or an offload.StreamedModel), dequantized one tensor at a time (gguf_to_hf.py);
    a pickle source from the ``loaded`` model.
    """
    spec = source.spec
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.kind == "hf":
        write_pruned_safetensors(
            source.tensors(plan.patch_path()),
            spec,
            plan,
            out_dir,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
        (out_dir / "config.json").write_text(
            # as transformers writes it: Mamba-2's time_step_limit holds Infinity
            json.dumps(prune_config_dict(source.config_dict(), spec, plan.keep), indent=2) + "\n"
        )
        skip = source.text_of.dropped_files if source.text_of else ()
        copy_companions(source.path, out_dir, skip)
    elif source.kind == "gguf" and getattr(loaded, "model", None) is None:
        from .gguf_to_hf import write_gguf_as_pruned_hf

        write_gguf_as_pruned_hf(
            source,
            plan,
            out_dir,
            dtype=getattr(loaded, "dtype", None),
            tokenizer=getattr(loaded, "tokenizer", None),
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
    else:
        if loaded is None:
            raise ValueError("a pickle source is pruned from the loaded model")
        with (
            progress("writing pruned model", None),
            healed(loaded.model, plan.keep, plan.patch_weights(spec)),
            pruned_view(loaded.model, spec, plan.keep),
        ):
            loaded.model.save_pretrained(out_dir, safe_serialization=True)
        loaded.tokenizer.save_pretrained(out_dir)
    card = render_model_card(
        original=source.ref, architecture=spec.model_type, plan=plan, calibration=calibration
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    return out_dir
