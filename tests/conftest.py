"""Shared fixtures: every expensive artefact (synthetic corpus, tiny pretrained and
fine-tuned models, the LM) is built once per test session and reused."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread for the whole suite: the tiny models' ops are too small to share, and on a
# busy machine spinning OpenMP threads make them several times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("session")


# ----------------------------------------------------------------------------- model / interop (HF parity)

HF_TINY = dict(
    conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), hidden_size=64, num_hidden_layers=3,
    num_attention_heads=4, intermediate_size=128, num_conv_pos_embeddings=5, conv_pos_kernel_size=19,
    num_conv_pos_embedding_groups=16, vocab_size=32, mask_time_prob=0.05, layerdrop=0.0,
)


@pytest.fixture(scope="session")
def hf_tiny_ctc():
    """A tiny but structurally complete HF Data2VecAudioForCTC (real pos-conv depth/kernel/groups), eager
    attention, eval mode. LayerNorm weights and all biases are randomized so a swapped key cannot hide."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1234)
    cfg = transformers.Data2VecAudioConfig(**HF_TINY, attn_implementation="eager")
    model = transformers.Data2VecAudioForCTC(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
    return model


@pytest.fixture(scope="session")
def synthetic_workspace(tmp_path_factory):
    """A `Workspace` with the tiny synthetic corpus generated and prepared (about 1 s, once per session).

    data/: train (32 utterances), dev-clean, dev-other, test-clean, test-other (8 each) manifests
    and dict.ltr.txt; the corpus and its LM text are under <root>/corpus/synthetic/
    (`lm-text.txt`, 300 sentences). Shared by every test: add runs/decodes under names of
    your own, and never modify data/ (copy the manifests elsewhere if a test must).
    """
    from d2vcli.prepare import prepare_synthetic
    from d2vcli.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("synthetic") / "ws")
    prepare_synthetic(ws, size="tiny", seed=0, workers=1)
    return ws


# ----------------------------------------------------------------------------- pretraining

# A pretraining run small enough for a test session: speech-tiny with 4 s batches (2 s crops),
# every update logged.
PRETRAIN_TINY_SET = [
    "data.max_tokens=64000", "data.max_sample_size=32000", "train.batch_seconds=4",
    "train.max_updates=20", "train.log_every=1", "train.save_every=10",
]


@pytest.fixture(scope="session")
def pretrained_tiny(synthetic_workspace):
    """Path of last.pt of a 20-update speech-tiny pretraining run on the synthetic corpus (a few seconds).

    The run lives in <synthetic_workspace>/runs/pretrained-tiny with its config.yaml and a
    metrics.jsonl line per update. Kind "pretrain": model (student + final_proj) and teacher.
    """
    from d2vcli.config import resolve
    from d2vcli.pretrain import pretrain

    cfg = resolve("pretrain", preset="speech-tiny", overrides=PRETRAIN_TINY_SET)
    result = pretrain(cfg, synthetic_workspace, name="pretrained-tiny")
    assert result.status == "done", result.message
    return result.checkpoint


# ----------------------------------------------------------------------------- fine-tuning

# finetune-tiny is made for the demo's labeled subset (1,200 updates, the head alone for 900); the
# session's tiny corpus (32 utterances) gets 400 updates at one rate of 1e-3, validated at 300 and 400.
FINETUNE_TINY_SET = [
    "train.max_updates=400", "optim.lr=0.001", "finetune.freeze_updates=10", "finetune.encoder_lr_scale=1.0",
    "finetune.validate_every=100",
    "finetune.validate_after=300", "finetune.best_metric=dev-other/cer",
]


@pytest.fixture(scope="session")
def finetuned_tiny(synthetic_workspace, pretrained_tiny):
    """Path of best.pt (lowest dev-other CER) of a CTC fine-tuning of `pretrained_tiny` on the
    tiny synthetic corpus (finetune-tiny with FINETUNE_TINY_SET; about 30 s).

    The run lives in <synthetic_workspace>/runs/finetuned-tiny (config.yaml, last.pt, step-N.pt,
    metrics.jsonl with validation lines). Kind "ctc", with vocab, arch and normalize.
    What it can do: the training split comes out nearly right (CER about 6 %); unseen speakers
    (dev/test) only at about 70 % CER, since 32 utterances of 4 speakers are too few for this
    transformer to generalize (the 800-utterance demo corpus gets about 1 %; tests/test_finetune.py
    pins both numbers of this fixture).
    """
    from d2vcli.config import merge, resolve
    from d2vcli.finetune import finetune

    cfg = merge(resolve("finetune", preset="finetune-tiny", overrides=FINETUNE_TINY_SET),
                {"finetune": {"init": str(pretrained_tiny)}})
    result = finetune(cfg, synthetic_workspace, name="finetuned-tiny")
    assert result.status == "done", result.message
    return result.run_dir / "best.pt"


# ----------------------------------------------------------------------------- LM and decoding


@pytest.fixture(scope="session")
def kenlm_tools():
    """lmplz and build_binary: from PATH or the cache, built there on first use (once per machine, 1-2 min)."""
    from d2vcli.lm.kenlm_tools import find_kenlm_tools

    return find_kenlm_tools(build=True)


@pytest.fixture(scope="session")
def synthetic_lm(synthetic_workspace, kenlm_tools):
    """`LMReport` of a word 4-gram + lexicon built from the synthetic corpus's lm-text.txt into
    <synthetic_workspace>/lm/ (4gram.bin, lexicon.txt, report.json); `d2v decode` there then uses it by default."""
    from d2vcli.lm.prepare import prepare_lm

    text = synthetic_workspace.root / "corpus" / "synthetic" / "lm-text.txt"
    return prepare_lm(synthetic_workspace, text=text, order=4, memory="64M")


@pytest.fixture(scope="session")
def random_ctc_checkpoint(synthetic_workspace):
    """best.pt of <synthetic_workspace>/runs/ctc-random: an untrained speech-tiny Data2VecForCTC saved as
    kind "ctc" (the synthetic dictionary, normalize=True). Decodes to garbage; for plumbing and caching tests."""
    from d2vcli import config as cfgmod
    from d2vcli.checkpoint import save_checkpoint
    from d2vcli.models.audio import Data2VecForCTC, build_backbone
    from d2vcli.vocab import Vocab

    cfg = cfgmod.resolve("pretrain", preset="speech-tiny")
    vocab = Vocab.load(synthetic_workspace.dictionary)
    torch.manual_seed(0)
    model = Data2VecForCTC(build_backbone(cfg.model), len(vocab))
    path = synthetic_workspace.run_dir("ctc-random") / "best.pt"
    save_checkpoint(path, {"kind": "ctc", "arch": cfgmod.to_dict(cfg.model), "normalize": True,
                           "model": model.state_dict(), "vocab": list(vocab.symbols), "config": cfgmod.to_dict(cfg)})
    return path
