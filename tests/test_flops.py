"""d2vcli.flops, the FLOP count behind gpu_check.py's MFU, for images and text: each update formula
against torch's own count (FlopCounterMode) of one real training step, forward and backward.

The formulas follow the MFU convention (docs/gpu.md): backward = 2 x forward for every product. The
one product autograd really skips is the gradient of the patch embedding's input (the images), one
patch-embedding forward per image; for these tiny ViTs that is 0.3 % of an update, so the stated
tolerance is 1 % for images. Text has no such product (its embeddings are look-ups): 0.1 %.
data2vec 2.0 images are checked forward per module and backward per op (see that test).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from d2vcli import config as cfgmod
from d2vcli.data import Batch
from d2vcli.flops import patch_embed_flops, text_update_flops, vision_update_flops, visible_patches
from d2vcli.pretrain_text import TextPretrainTask, text_arch
from d2vcli.pretrain_vision import VisionPretrainTask
from d2vcli.pretrain_vision2 import Vision2PretrainTask

IMAGE_TOL = 1e-2
TEXT_TOL = 1e-3


def counted_update(task, batch) -> float:
    """FLOPs torch counts in one train_step (student, teacher, loss) and its backward; math SDPA, so the
    attention products are matmuls the counter sees."""
    torch.manual_seed(0)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        task.train_step(task.model, batch, 0).loss.backward()
    return counter.get_total_flops()


def image_batch(cfg, images: int) -> Batch:
    side = cfg.vision.image_size
    return Batch(source=torch.randn(images, 3, side, side), padding_mask=None, ids=[str(i) for i in range(images)],
                 num_samples=images, epoch=1, index=0)


def test_vision_1_update_flops_match_the_counted_step():
    torch.set_num_threads(1)
    cfg = cfgmod.resolve("pretrain", preset="vision-tiny")
    torch.manual_seed(0)
    task = VisionPretrainTask(cfg, torch.device("cpu"))
    counted = counted_update(task, image_batch(cfg, 2))
    expected = vision_update_flops(task.arch, cfg.masking, cfg.model.version)
    assert counted == pytest.approx(2 * expected.total, rel=IMAGE_TOL)
    # The only gap is the input gradient of the patch embedding that autograd does not compute.
    assert counted == pytest.approx(2 * (expected.total - patch_embed_flops(task.arch)), rel=1e-4)


def test_vision_2_update_flops_match_the_counted_step():
    """Forward counted per module (student, teacher) and backward per op. The decoder's grouped convs
    are left out of the backward count: this torch's FlopCounterMode counts a grouped conv's input
    gradient `groups` times over (fixed upstream in pytorch/pytorch PR 183405)."""
    torch.set_num_threads(1)
    cfg = cfgmod.resolve("pretrain", preset="vision2-tiny")
    torch.manual_seed(0)
    task = Vision2PretrainTask(cfg, torch.device("cpu"))
    images = 2
    batch = image_batch(cfg, images)
    assert int((~task.patch_mask(batch)).sum(1)[0]) == visible_patches(task.arch, cfg.masking) == 12
    torch.manual_seed(0)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            out = task.train_step(task.model, batch, 0)
        with FlopCounterMode(display=False) as backward:
            out.loss.backward()
    modules = forward.get_flop_counts()
    student = sum(modules["Data2Vec2VisionForPretraining"].values())
    teacher = sum(modules["Vision2Encoder"].values())  # the EMA copy of the encoder, unmasked images
    assert student + teacher == forward.get_total_flops()
    expected = vision_update_flops(cfg.vision, cfg.masking, cfg.model.version)  # the config section works too
    assert 3 * student + teacher == pytest.approx(images * expected.total, rel=1e-6)
    assert expected.head > 0  # the conv decoder, every patch of every clone
    ops = {str(op): n for op, n in backward.get_flop_counts()["Global"].items()}
    matmuls = {str(op): n for op, n in modules["Data2Vec2VisionForPretraining"].items() if "mm" in str(op)}
    assert ops["aten.mm"] + ops["aten.bmm"] == pytest.approx(2 * sum(matmuls.values()), rel=1e-6)


def test_text_update_flops_match_the_counted_step():
    torch.set_num_threads(1)
    cfg = cfgmod.resolve("pretrain", preset="text-tiny")
    arch = text_arch(cfg, 192, 191)
    torch.manual_seed(0)
    task = TextPretrainTask(cfg, torch.device("cpu"), arch)
    tokens = torch.randint(4, 191, (3, 40))
    tokens[:, 0] = 0
    batch = Batch(source=tokens, padding_mask=None, ids=["0", "1", "2"], num_samples=tokens.numel(), epoch=1, index=0)
    counted = counted_update(task, batch)
    assert counted == pytest.approx(3 * text_update_flops(40, arch).total, rel=TEXT_TOL)


def test_base_sizes():
    """The recipe models' counts per image and per token (docs/gpu.md's table), and what scales them."""
    v1 = cfgmod.resolve("pretrain", preset="vision-base")
    # ViT-B/16: the usual 17.6 G multiply-adds (35.2 GFLOP) per forward on 197 tokens; x3 + the teacher.
    assert vision_update_flops(v1.vision, v1.masking, 1).total / 1e9 == pytest.approx(141.2, abs=0.1)
    v2 = cfgmod.resolve("pretrain", preset="vision2-base")
    assert visible_patches(v2.vision, v2.masking) == 39
    assert vision_update_flops(v2.vision, v2.masking, 2).total / 1e9 == pytest.approx(v2_base_gflop(), abs=0.5)
    t = cfgmod.resolve("pretrain", preset="text-base")
    per_token = text_update_flops(512, t.text).total / 512 / 1e9
    assert per_token == pytest.approx(0.769, abs=0.001)  # 3 x (12 x 8.05 + 2.42) + 12 x 8.05 GF / 512
    assert text_update_flops(1024, t.text).total > 2 * text_update_flops(512, t.text).total  # the T^2 attention


def v2_base_gflop() -> float:
    """vision2-base by hand: 12 blocks of 768 on 40 tokens x 16 clones x 3, teacher on 197, decoder 6 x 3x3/16."""
    d, f = 768, 3072

    def layer(t):
        return 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d

    embed = 2 * 3 * 256 * d * 196
    decoder = 6 * 2 * (d / 16) * d * 9 * 196 + 2 * d * d * 196
    return (4 * embed + 16 * 3 * (12 * layer(40) + decoder) + 12 * layer(197)) / 1e9
