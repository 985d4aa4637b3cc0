"""The Python API, through its public names only: `import d2vcli; d2vcli.load(...)`, `d2vcli.pretrain(...)`.

Run: python -m pytest -q tests/test_api.py
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

import d2vcli
from d2vcli.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _records(ws, split: str, n: int) -> list[dict]:
    lines = Path(ws.root, "data", f"{split}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _cli_transcripts(ws, paths, out: Path) -> list[tuple[str, str]]:
    """`d2v transcribe PATHS --model finetuned-tiny --no-lm` -> [(path, text)], from its --out file."""
    res = CliRunner().invoke(app, ["transcribe", *map(str, paths), "--model", "finetuned-tiny", "--no-lm",
                                   "--out", str(out), "-w", str(ws.root)])
    assert res.exit_code == 0, res.output
    return [tuple(line.split("\t", 1)) for line in out.read_text().splitlines()]


def test_import_d2vcli_is_cheap_and_the_names_are_lazy():
    code = ("import sys, d2vcli; assert 'torch' not in sys.modules, 'import d2vcli imported torch'; "
            "assert 'load' in dir(d2vcli) and 'pretrain' in d2vcli.__all__; "
            "d2vcli.load; assert 'torch' in sys.modules; print(d2vcli.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == d2vcli.__version__
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        d2vcli.nonsense  # noqa: B018


def test_transcribe_path_array_and_list_equal_the_cli(synthetic_workspace, finetuned_tiny, tmp_path):
    ws = synthetic_workspace
    records = _records(ws, "train", 3)  # the tiny model gets its training split nearly right
    paths = [r["path"] for r in records]
    # One of them as 8 kHz stereo: the API and the CLI must downmix and resample alike.
    wav, sr = sf.read(paths[0], dtype="float32")
    stereo = tmp_path / "stereo-8k.wav"
    sf.write(stereo, np.stack([wav[::2], 0.5 * wav[::2]], axis=1), sr // 2, subtype="FLOAT")
    paths.append(str(stereo))
    cli = _cli_transcripts(ws, paths, tmp_path / "cli.tsv")
    assert [p for p, _ in cli] == paths

    model = d2vcli.load("finetuned-tiny", workdir=ws.root)
    assert model.kind == "ctc" and model.checkpoint == Path(finetuned_tiny).resolve()
    listed = model.transcribe(paths)
    assert [(t.path, t.text) for t in listed] == cli
    single = model.transcribe(paths[1])
    assert isinstance(single, d2vcli.Transcript) and single.text == cli[1][1]
    for path, (_, text) in zip(paths, cli):
        wav, sr = sf.read(path, dtype="float32")  # (S,) or (S, C), as soundfile reads it
        assert model.transcribe(wav, sample_rate=sr).text == text
    # An actual transcription, not just agreement: close to the references of the training split.
    for r, (_, text) in zip(records, cli):
        assert difflib.SequenceMatcher(None, text, r["text"]).ratio() > 0.8, (text, r["text"])
    with_times = model.transcribe(Path(paths[2]), timestamps=True)
    assert [w.word for w in with_times.words] == with_times.text.split()


def test_embed_shapes_and_layers_for_pretrain_and_ctc(pretrained_tiny, finetuned_tiny, synthetic_workspace):
    [record] = _records(synthetic_workspace, "dev-clean", 1)
    wav, sr = sf.read(record["path"], dtype="float32")
    for checkpoint, kind in ((pretrained_tiny, "pretrain"), (finetuned_tiny, "ctc")):
        model = d2vcli.load(checkpoint)
        assert model.kind == kind
        n, dim = model.num_layers, model.embed_dim
        frames = model.network.backbone.num_frames(len(wav) * 16_000 // sr)
        last = model.embed(record["path"])
        assert last.shape == (frames, dim) and last.dtype == np.float32 and np.isfinite(last).all()
        np.testing.assert_array_equal(model.embed(record["path"], layer=-1), last)
        np.testing.assert_array_equal(model.embed(record["path"], layer=n), last)
        np.testing.assert_allclose(model.embed(wav, sample_rate=sr), last, atol=1e-6)
        states = [model.embed(record["path"], layer=k) for k in range(n + 1)]
        assert all(s.shape == (frames, dim) for s in states)
        # Layer k + 1 of the network applied to the layer-k states gives the layer-(k + 1) states.
        layers = model.network.backbone.transformer.layers
        with torch.inference_mode():
            for k in range(n):
                nxt = layers[k](torch.from_numpy(states[k])[None])[0][0].numpy()
                np.testing.assert_allclose(nxt, states[k + 1], atol=1e-4)
        assert not np.allclose(states[0], last)
        batch = model.embed([record["path"], wav[: sr // 2]], sample_rate=sr)
        assert [b.shape for b in batch] == [(frames, dim), (model.network.backbone.num_frames(8000), dim)]
        with pytest.raises(d2vcli.UserError, match="layer must be an integer in 0..4"):
            model.embed(record["path"], layer=n + 1)

    # The ctc model's last states are what its letter head reads: projected, they decode to the transcript.
    ctc = d2vcli.load(finetuned_tiny)
    with torch.inference_mode():
        best = ctc.network.proj(torch.from_numpy(ctc.embed(record["path"]))).argmax(-1).tolist()
    ids = [i for i, _ in itertools.groupby(best) if i != 0]
    assert ctc.vocab.decode(ids) == ctc.transcribe(record["path"]).text


def test_user_errors(pretrained_tiny, finetuned_tiny, tmp_path):
    pre = d2vcli.load(pretrained_tiny)
    with pytest.raises(d2vcli.UserError, match="pretrained .*cannot transcribe.*Fine-tune it first"):
        pre.transcribe(np.zeros(16_000, dtype=np.float32), sample_rate=16_000)
    ctc = d2vcli.load(finetuned_tiny)
    with pytest.raises(d2vcli.UserError, match="pass sample_rate="):
        ctc.transcribe(np.zeros(16_000, dtype=np.float32))
    with pytest.raises(d2vcli.UserError, match="audio file not found"):
        ctc.embed(tmp_path / "missing.wav")
    with pytest.raises(d2vcli.UserError, match=r"\(samples,\) or \(samples, channels\)"):
        ctc.embed(np.zeros((1, 2, 16_000)), sample_rate=16_000)


def test_the_commands_functions_pretrain_and_finetune_end_to_end(tmp_path):
    """d2vcli.prepare / pretrain / finetune are the CLI's functions; a run they make loads by name."""
    assert inspect.signature(d2vcli.pretrain).parameters.keys() >= {"cfg", "workspace", "name", "resume"}
    assert inspect.signature(d2vcli.finetune).parameters.keys() >= {"cfg", "workspace", "name", "resume"}
    ws = d2vcli.Workspace.resolve(tmp_path / "ws")
    summary = d2vcli.prepare.prepare_synthetic(ws, size="tiny", seed=1, workers=1)
    assert summary is not None and (ws.root / "data" / "train.jsonl").is_file()
    short = ["train.max_updates=2", "train.log_every=1", "train.save_every=0", "train.batch_seconds=4",
             "data.max_tokens=64000"]
    pre = d2vcli.pretrain(d2vcli.resolve_config("pretrain", preset="speech-tiny", overrides=short), ws, name="api-pre")
    assert pre.status == "done", pre.message
    cfg = d2vcli.resolve_config("finetune", preset="finetune-tiny",
                                overrides=short + ["finetune.init=api-pre", "finetune.validate_every=0"])
    assert isinstance(cfg, d2vcli.Config)
    ft = d2vcli.finetune(cfg, ws, name="api-ft")
    assert ft.status == "done", ft.message
    model = d2vcli.load("api-ft", workdir=ws.root)
    assert model.kind == "ctc"
    assert isinstance(model.transcribe(np.zeros(16_000, dtype=np.float32), sample_rate=16_000).text, str)
    assert d2vcli.load(workdir=ws.root).checkpoint == model.checkpoint  # no name: the newest fine-tuned run
