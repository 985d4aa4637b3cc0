"""data2vec 2.0 pretraining of the text encoder: the text task of `model.version: 2` on the shared objective core.

    d2v prepare synthetic-text && d2v pretrain --preset text2-tiny       # minutes on CPU
    d2v prepare text corpus/*.txt && d2v pretrain --preset text2-base
    torchrun --nproc_per_node 16 -m d2vcli pretrain --preset text2-base  # 16 x 4 blocks of 512, no accumulation

`d2vcli.pretrain.pretrain` hands a config with `modality: text` and `model.version: 2` to
`pretrain()` here, which runs `pretrain_text`'s entry point (corpus, tokenizer, run folder, loader,
engine) with this task. The recipe is fairseq's `data2vec_multi` with modality TEXT
(`examples/data2vec/config/v2/base_text_only_task.yaml`, `models/data2vec2.py`,
`models/modalities/text.py`; docs/text.md, "data2vec 2.0"). One update, A sequences, M clones:

1. Masks: `masking.clone_batch` (M) random masks per sequence (`objective.masking.compute_random_mask`,
   MAE-style: int(T x (1 - 0.48)) tokens kept in every row, padding not looked at), rows
   sample-major, drawn from the batch's own RNG stream (the same in any process or resumed run).
2. The student (`Data2Vec2TextPretrainModel`) embeds each sequence once (dropout on), encodes only
   each clone's kept tokens and its conv decoder predicts every token; its mask tokens are noise
   from a generator keyed by the batch too.
3. The teacher (`EMATeacher`) is an EMA of the transformer layers only (fairseq `ema_encoder_only`;
   not the embeddings, not the decoder), run once per sequence in eval mode on the **student's**
   embeddings of the unmasked sequence, the same dropout-perturbed tensor the clones start from.
4. Targets (`build_targets`): the FFN outputs of all K layers, each instance-normed over the
   sequence (pads included, as fairseq's instance norm does), averaged, no final norm; repeated
   for the M clones.
5. Loss (`regression_loss`): squared error summed over D, not scaled (`loss_scale: 1`), over the
   masked tokens of all clones; sample_size = those tokens, so the engine's division gives
   fairseq's mean over all masked tokens of all clones and ranks.
6. `after_update`: one EMA step at `ema_decay_at(step)` (0.9999 -> 0.99999 over 100k updates).
7. Monitors: target and prediction std every update; 1.0 text's guards stop a collapsed run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from d2vcli import pretrain_text
from d2vcli.config import Config
from d2vcli.data import STREAM_MASK, STREAM_MASK_NOISE, Batch, batch_rng
from d2vcli.engine import StepOutput, TrainResult
from d2vcli.models.loading import build_text_model
from d2vcli.models.text import TextConfig
from d2vcli.objective.masking import compute_random_mask
from d2vcli.objective.monitors import compute_std
from d2vcli.objective.targets import build_targets, regression_loss
from d2vcli.objective.teacher import EMATeacher
from d2vcli.pretrain_text import TextPretrainTask


class Text2PretrainTask(TextPretrainTask):
    """data2vec 2.0 text pretraining for the engine; EMA step, guards and checkpoint state are 1.0's."""

    teacher_scope = "EMA of the transformer layers only, on the student's embeddings of the unmasked text"

    def __init__(self, cfg: Config, device: torch.device, arch: TextConfig, special_ids: tuple[int, ...] = (0, 1, 2, 3),
                 tokenizer: Optional[dict] = None):
        if arch.version != 2:
            raise ValueError("Text2PretrainTask needs a version 2 TextConfig (model.version: 2)")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.arch = arch
        self.special_ids = tuple(special_ids)
        self.model = build_text_model("text-pretrain", arch).to(device)
        # fairseq ema_encoder_only: the blocks alone; nothing is copied instead of averaged.
        self.teacher = EMATeacher(self.model.encoder.layers)
        self.find_unused_parameters = arch.layerdrop > 0

    def mask(self, batch: Batch) -> Tensor:
        """(A * M, T) bool (True = masked), sequence 0's M clones first, from the batch's own RNG stream."""
        m = self.cfg.masking
        rng = batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
        A, T = batch.source.shape
        mask = compute_random_mask(A * m.clone_batch, T, m.mask_prob, rng)
        return torch.from_numpy(mask).to(batch.source.device, non_blocking=True)

    def noise_generator(self, batch: Batch, device: torch.device) -> torch.Generator:
        """The decoder's mask-token generator for this batch (the same in any process or resumed run)."""
        seed = int(batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MASK_NOISE).integers(2**62))
        return torch.Generator(device=device).manual_seed(seed)

    def targets(self, features: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """The teacher's targets for every token of the unmasked sequences, once per sequence: (A, T, D) fp32."""
        obj = self.cfg.objective
        layer_results = self.teacher.layer_results(features, padding_mask)  # K x (A, T, D)
        with torch.no_grad():
            return build_targets(layer_results, obj.average_top_k_layers, obj.layer_target_norm,
                                 obj.final_target_norm)

    def train_step(self, model: nn.Module, batch: Batch, step: int) -> StepOutput:
        obj = self.cfg.objective
        tokens, padding_mask = batch.source, batch.padding_mask  # (A, T), (A, T) | None
        mask = self.mask(batch)  # (A * M, T)
        out = model(tokens, padding_mask, mask, generator=self.noise_generator(batch, tokens.device))
        pred, clones = out["pred"], out["clones"]  # (N_masked, D), all clones
        full_target = self.targets(out["features"], out["padding_mask"])  # (A, T, D)
        target = full_target.repeat_interleave(clones, 0)[mask]  # (N_masked, D)
        loss = regression_loss(pred, target, obj.loss_beta, obj.loss_scale)
        metrics = {"target_std": compute_std(target), "pred_std": compute_std(pred),
                   "masked_share": mask.float().mean()}
        return StepOutput(loss=loss, sample_size=pred.shape[0], metrics=metrics)


def pretrain(cfg: Config, workspace, name: Optional[str] = None, resume: bool = False, preset: Optional[str] = None,
             stop_at: Optional[int] = None, resume_if_exists: bool = False) -> TrainResult:
    """Run (or resume) data2vec 2.0 text pretraining in <workdir>/runs/<name>; as `d2vcli.pretrain.pretrain`."""
    return pretrain_text.pretrain(cfg, workspace, name=name, resume=resume, preset=preset, stop_at=stop_at,
                                  resume_if_exists=resume_if_exists, make_task=Text2PretrainTask)
