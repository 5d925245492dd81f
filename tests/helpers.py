"""Small helpers shared by the tests."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from shortgpt_export.calibration import CalibrationSet


@contextmanager
def without_final_norm(model):
    """Make ``output_hidden_states[-1]`` the last block's raw output (no final norm)."""
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()
    try:
        yield model
    finally:
        model.model.norm = norm


def reference_scores(model, calib: CalibrationSet, metric: str = "bi") -> list[float]:
    """Straightforward float64 BI/angular from ``output_hidden_states`` (all states stored)."""
    with torch.no_grad(), without_final_norm(model):
        states = model(
            input_ids=calib.input_ids,
            attention_mask=calib.attention_mask,
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states
    real = calib.attention_mask.bool()
    scores = []
    for i in range(len(states) - 1):
        x, y = states[i].double()[real], states[i + 1].double()[real]
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        value = 1 - cos if metric == "bi" else torch.arccos(cos.clamp(-1, 1)) / torch.pi
        scores.append(float(value.mean()))
    return scores


def random_calibration(vocab: int, rows: int, seq_len: int, pad_last: int = 0, seed: int = 0):
    """Random token windows; the last ``pad_last`` positions of odd rows are padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[1::2, -pad_last:] = 0
        ids[mask == 0] = 0
    return CalibrationSet(input_ids=ids, attention_mask=mask, source="random", seq_len=seq_len)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def run_cli(capsys, *argv):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from shortgpt_export.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


FAST = ["--calib-tokens", "512", "--seq-len", "64"]


def export_with_cli(model_dir, root, *options):
    """Run the main command on ``model_dir`` with fast calibration; returns ``root/out``."""
    from importlib import resources

    from shortgpt_export.cli import main

    calib = root / "calib.txt"
    calib.write_text(
        resources.files("shortgpt_export").joinpath("data/calibration.txt").read_text("utf-8")
    )
    out = root / "out"
    code = main(
        [
            str(model_dir),
            "--calib",
            str(calib),
            "--out",
            str(out),
            *FAST,
            *(str(o) for o in options),
        ]
    )
    assert code == 0, f"export of {model_dir} with {options} failed"
    return out


def torch_perplexity(model, windows) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token."""
    import math

    total, count = 0.0, 0
    with torch.inference_mode():
        for window in torch.as_tensor(windows):  # one window at a time
            logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            count += len(window) - 1
    return math.exp(total / count)


def folder_digest(folder) -> str:
    """sha256 of every file in ``folder`` (names and bytes), the model card aside."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if path.name == "README.md":
            continue
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def track_materialized(monkeypatch):
    """Wrap offload.materialize/release: ``live`` (module id -> prefix of what is in memory),
    ``seen`` (prefixes in load order), ``most`` ([most decoder layers in memory at once])."""
    from types import SimpleNamespace

    from shortgpt_export import offload

    track = SimpleNamespace(live={}, seen=[], most=[0])
    real_materialize, real_release = offload.materialize, offload.release

    def materialize(module, prefix, *args):
        real_materialize(module, prefix, *args)
        track.live[id(module)] = prefix
        track.seen.append(prefix)
        layers = sum(p.startswith("model.layers.") for p in track.live.values())
        track.most[0] = max(track.most[0], layers)

    def release(module):
        real_release(module)
        assert all(p.is_meta for p in module.parameters())
        del track.live[id(module)]

    monkeypatch.setattr(offload, "materialize", materialize)
    monkeypatch.setattr(offload, "release", release)
    return track
