"""What the text pretraining tests (data2vec 1.0 and 2.0) share: a tiny vocabulary, an in-test source of
random token blocks with text_data.TextBlockLoader's interface, the FFN outputs recomputed from a
layer's parts, and the exact-resume check."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from d2vcli import distributed, engine
from d2vcli.data import Batch, DataPosition
from d2vcli.fileio import read_jsonl
from d2vcli.run_dir import prepare_run

CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
VOCAB, MASK_ID, PAD = 60, 59, 1
SPECIALS = (0, 1, 2, 3)


class RandomBlocks:
    """Random `<s> w... </s>` blocks of 8 to 32 tokens, 4 per batch (at most 128 padded tokens), 6 batches per epoch."""

    def __init__(self, seed: int = 0):
        g = np.random.default_rng(seed)
        self.blocks = []
        for _ in range(24):
            n = int(g.integers(8, 33))
            self.blocks.append(np.concatenate([[0], g.integers(4, MASK_ID, n - 2), [2]]))
        self.position = DataPosition()
        self.bad_files: dict = {}

    def batches(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([7, epoch]).permutation(len(self.blocks))
        return [order[i:i + 4] for i in range(0, len(order), 4)]

    def local_indices(self, epoch: int, consumed: int) -> list[int]:
        return list(range(consumed, len(self.batches(epoch))))

    def make_batch(self, indices, epoch: int, index: int) -> Batch:
        seqs = [self.blocks[i] for i in indices]
        source = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
        for b, s in enumerate(seqs):
            source[b, :len(s)] = torch.from_numpy(s)
        pm = source.eq(PAD)
        return Batch(source=source, padding_mask=pm if pm.any() else None, ids=[str(i) for i in indices],
                     num_samples=int(sum(len(s) for s in seqs)), epoch=epoch, index=index)

    def __iter__(self):
        epoch, batches = self.position.epoch, self.batches(self.position.epoch)
        for g in self.local_indices(epoch, self.position.consumed):
            batch = self.make_batch(batches[g], epoch, g)
            self.position = DataPosition(epoch, g + 1)
            yield batch
        self.position = DataPosition(epoch + 1, 0)

    def state_dict(self) -> dict:
        return self.position.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition.from_dict(state)


def direct_ffn_outputs(layers, x, padding_mask):
    """The post-LN layers' FFN outputs recomputed from their parts (eval mode, no dropout)."""
    outs = []
    for layer in layers:
        h = layer.self_attn_norm(x + layer.self_attn(x, padding_mask))
        f = layer.fc2(F.gelu(layer.fc1(h)))
        x = layer.final_norm(h + f)
        outs.append(f)
    return outs


def assert_resume_is_exact(ws, cfg, make_task) -> None:
    """A run paused at update 2 and resumed ends with the straight 4-update run's weights, teacher and losses."""

    def run(name: str, resume: bool = False, stop_at=None):
        task = make_task(cfg)
        result = engine.train(cfg, task, RandomBlocks(), prepare_run(ws, name, cfg, resume, CPU), CPU,
                              stop_at=stop_at, batch=engine.text_batch_unit(cfg))
        return task, result

    straight, result = run("straight")
    assert result.status == "done" and result.step == 4
    paused = run("split", stop_at=2)[1]
    assert paused.status == "paused" and paused.step == 2
    second, done = run("split", resume=True)
    assert done.status == "done" and done.step == 4
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], value, rtol=0, atol=0)
    for name, value in straight.teacher.state_dict().items():
        torch.testing.assert_close(second.teacher.state_dict()[name], value, rtol=0, atol=0)
    losses = [[r["loss"] for r in read_jsonl(ws.run_dir(n) / "metrics.jsonl") if "loss" in r]
              for n in ("straight", "split")]
    assert losses[0] == losses[1]
