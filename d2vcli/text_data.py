"""Text for the engine: the sentencepiece tokenizer, the token shards of `d2v prepare text`, and batches.

    tok = Tokenizer.load(ws_text / "spm.model")          # ids: 0 <s>, 1 <pad>, 2 </s>, 3 <unk>, ..., <mask>
    blocks = TokenBlocks(ws_text, "train")               # block i: int64 array, lines ending in </s>
    loader = TextBlockLoader(blocks, tok, tokens_per_batch=8192, seed=1)   # Batch.source (B, T) int64

Token ids follow fairseq/RoBERTa (docs/text-data.md): `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3.
Our sentencepiece models are trained with exactly these ids and `<mask>` as a user-defined
symbol, so a sentencepiece id is the model's token id. A model trained elsewhere is accepted
when its four special ids are these; if it has no `<mask>` piece, `<mask>` becomes the id after
its last piece (as fairseq's masked_lm task appends it to the dictionary); other ids are refused.

Shards (`data/text/`): `<split>.bin` is every block's tokens back to back (uint16 when the
vocabulary has fewer than 65,536 ids, else int32) and `<split>.idx.npy` the N+1 block offsets.
Blocks are stored without `<s>`; the loader prepends it, as fairseq's masked_lm task does
(`PrependTokenDataset` over a `TokenBlockDataset` of tokens_per_sample - 1).

Loaders are engine batch sources like `image_data.ImageBatchLoader`: a batch is keyed by
(seed, epoch, global batch index), rank r takes global batches r, r + world, ..., and the
position (epoch, batches consumed) is saved and restored, so a resumed run reads the same
batches in the same order.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import sentencepiece as spm
import torch

from d2vcli.data import Batch, DataError, DataPosition, EpochShare
from d2vcli.errors import UserError
from d2vcli.fileio import read_jsonl
from d2vcli.workspace import Workspace

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIAL_PIECES = {BOS: "<s>", PAD: "<pad>", EOS: "</s>", UNK: "<unk>"}
MASK_PIECE = "<mask>"
META_VERSION = 1
# sentencepiece trains on the first this many sentences (no shuffle: the same input gives the same model);
# its README suggests a few million suffice.
MAX_TRAIN_SENTENCES = 10_000_000


class TokenizerError(UserError):
    """A sentencepiece model that cannot be used as it is; the message says why and what to do."""


def text_dir(ws: Workspace, override: Optional[str] = None) -> Path:
    """Where the token shards live: data.text_dir if set, else <workdir>/data/text."""
    return Path(override).expanduser().resolve() if override else ws.data_dir / "text"


def glue_dir(ws: Workspace) -> Path:
    """The labeled text tasks: <workdir>/data/glue/<TASK>/."""
    return ws.data_dir / "glue"


def token_dtype(vocab_size: int) -> np.dtype:
    """The shards' dtype: uint16 when every id fits, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the tokenizer


class Tokenizer:
    """A sentencepiece model whose ids are the model's token ids (module docstring)."""

    bos_id, pad_id, eos_id, unk_id = BOS, PAD, EOS, UNK

    def __init__(self, proto: bytes, source: str = "<memory>"):
        self.proto = proto
        self.source = source
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        got = {"<s>": self.sp.bos_id(), "<pad>": self.sp.pad_id(), "</s>": self.sp.eos_id(), "<unk>": self.sp.unk_id()}
        want = {SPECIAL_PIECES[i]: i for i in SPECIAL_PIECES}
        if got != want:
            shown = ", ".join(f"{k} {v}" for k, v in got.items())
            raise TokenizerError(
                f"{source}: its special ids are {shown} (-1 = absent); d2v models use <s> 0, <pad> 1, </s> 2, "
                f"<unk> 3 (fairseq/RoBERTa), so its ids would not be the model's. Retrain it with --bos_id=0 "
                f"--pad_id=1 --eos_id=2 --unk_id=3 --user_defined_symbols='<mask>', or let `d2v prepare text` "
                f"train one (drop --spm).")
        pieces = self.sp.get_piece_size()
        mask = self.sp.piece_to_id(MASK_PIECE)
        # piece_to_id answers unk for an unknown piece.
        self.mask_appended = mask == self.sp.unk_id()
        self.mask_id = pieces if self.mask_appended else mask
        self.vocab_size = pieces + int(self.mask_appended)

    @classmethod
    def load(cls, path: Path | str) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"sentencepiece model not found: {path}. Run `d2v prepare text` (it trains one) or "
                                 f"pass the path of an existing .model file.")
        data = path.read_bytes()
        try:
            return cls(data, str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path} is not a sentencepiece model ({str(e).strip()[:200]}); pass a .model "
                                 f"file written by spm_train or `d2v prepare text`") from None

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int, model_type: str = "bpe",
              character_coverage: float = 0.9995, max_sentence_bytes: int = 1 << 16) -> "Tokenizer":
        """Train on `sentences` with the special ids above; the same sentences and settings give
        byte-identical model bytes (one trainer thread: the thread count is stored in the model)."""
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
                bos_id=BOS, pad_id=PAD, eos_id=EOS, unk_id=UNK, bos_piece="<s>", pad_piece="<pad>",
                eos_piece="</s>", unk_piece="<unk>", user_defined_symbols=[MASK_PIECE],
                character_coverage=character_coverage, num_threads=1, minloglevel=2,
                max_sentence_length=max_sentence_bytes, shuffle_input_sentence=False,
                input_sentence_size=MAX_TRAIN_SENTENCES,
                normalization_rule_name="identity",
            )
        except RuntimeError as e:
            text = str(e).strip()
            if "Vocabulary size too high" in text or "Vocabulary size is smaller" in text:
                limit = text.rsplit("<=", 1)[-1].strip(" .)") if "<=" in text else "?"
                raise TokenizerError(f"--vocab-size {vocab_size} is more than this corpus supports with "
                                     f"{model_type} (at most {limit}); pass a smaller --vocab-size") from None
            raise TokenizerError(f"sentencepiece training failed: {text[:300]}") from None
        return cls(buf.getvalue(), "<trained>")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.bos_id, self.pad_id, self.eos_id, self.mask_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in special])

    def sha256(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()


# ----------------------------------------------------------------------------- shards


def read_text_meta(text_dir: Path) -> dict:
    path = Path(text_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no text corpus at {text_dir} (meta.json missing). Run `d2v prepare text FILES...` "
                        f"(or `d2v prepare synthetic-text`) with this --workdir first.") from None
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `d2v prepare text`") from None
    if meta.get("version") != META_VERSION:
        raise DataError(f"{path} was written by another d2v version; re-run `d2v prepare text`")
    return meta


class TokenBlocks:
    """The blocks of one split's shard: `blocks[i]` is block i as an int64 array (no `<s>`)."""

    def __init__(self, text_dir: Path | str, split: str):
        self.text_dir = Path(text_dir)
        self.meta = read_text_meta(self.text_dir)
        if split not in self.meta["splits"]:
            raise DataError(f"{self.text_dir} has no text split '{split}' (it has {', '.join(self.meta['splits'])})")
        bin_path, idx_path = self.text_dir / f"{split}.bin", self.text_dir / f"{split}.idx.npy"
        self.offsets = np.load(idx_path)
        dtype = np.dtype(self.meta["dtype"])
        n_tokens = int(self.offsets[-1]) if len(self.offsets) else 0
        if not bin_path.exists() or bin_path.stat().st_size != n_tokens * dtype.itemsize:
            raise DataError(f"{bin_path} does not hold the {n_tokens} tokens its index names (missing or cut "
                            f"short); re-run `d2v prepare text`")
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype)
        self.sizes = np.diff(self.offsets)
        self.split = split

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int64)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, T) int64 right-padded with pad_id, and the (B, T) bool mask (True = pad; None if none)."""
    width = max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), width), pad_id, dtype=np.int64)
    pad = np.ones((len(seqs), width), dtype=bool)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
        pad[i, :len(s)] = False
    return torch.from_numpy(out), (torch.from_numpy(pad) if pad.any() else None)


# ----------------------------------------------------------------------------- batch sources


class _PositionedLoader:
    """What both text loaders share: the epoch's batches from `plan(epoch)` (an index array per batch),
    collated by `collate(indices, epoch, index)`, a rank's share (data.EpochShare) and the resumable position."""

    def __init__(self, plan: Callable[[int], list[np.ndarray]], collate: Callable[[np.ndarray, int, int], Batch],
                 seed: int, rank: int, world_size: int):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.share = EpochShare(plan, rank, world_size)
        self.make_batch = collate
        self.position = DataPosition()
        self.bad_files: dict[str, str] = {}  # the engine's BatchSource field; token shards have no unreadable files

    def batches(self, epoch: int) -> list[np.ndarray]:
        return self.share.batches(epoch)

    def local_indices(self, epoch: int, consumed: int) -> list[int]:
        """Global batch indices this rank reads in `epoch` after `consumed` (an even share per rank)."""
        return self.share.local_indices(epoch, consumed)

    def __iter__(self) -> Iterator[Batch]:
        epoch, consumed = self.position.epoch, self.position.consumed
        batches = self.batches(epoch)
        for g in self.local_indices(epoch, consumed):
            batch = self.make_batch(batches[g], epoch, g)
            self.position = self.share.position_after(epoch, g)
            yield batch
        self.position = DataPosition(epoch + 1, 0)

    def __len__(self) -> int:
        return len(self.local_indices(self.position.epoch, 0))

    def state_dict(self) -> dict:
        return self.position.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition.from_dict(state)


def group_by_tokens(sizes: np.ndarray, order: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Consecutive runs of `order` whose padded size (count x longest) stays within max_tokens."""
    out, start, longest = [], 0, 0
    for k, i in enumerate(order):
        longest_with = max(longest, int(sizes[i]))
        if k > start and longest_with * (k - start + 1) > max_tokens:
            out.append(order[start:k])
            start, longest_with = k, int(sizes[i])
        longest = longest_with
    if start < len(order):
        out.append(order[start:])
    return out


class TextBlockLoader(_PositionedLoader):
    """Pretraining batches of blocks, `<s>` prepended, up to tokens_per_batch padded tokens each.

    Each epoch, like fairseq's masked_lm ordering: blocks in a seeded random order, stably sorted by
    length (so a batch pads little), cut into batches of at most tokens_per_batch tokens (batch size x
    longest), and the batches shuffled. A `data.Batch`: `source` (B, T) int64, `padding_mask`,
    `num_samples` the real tokens, `target` None, `ids` the block numbers.
    """

    def __init__(self, blocks: TokenBlocks, tokenizer_or_bos: Tokenizer | int, tokens_per_batch: int, seed: int, *,
                 tokens_per_sample: Optional[int] = None, rank: int = 0, world_size: int = 1):
        super().__init__(self._plan, self._collate, seed, rank, world_size)
        self.blocks, self.tokens_per_batch = blocks, tokens_per_batch
        self.bos_id = tokenizer_or_bos if isinstance(tokenizer_or_bos, int) else tokenizer_or_bos.bos_id
        self.pad_id = PAD
        longest = int(blocks.sizes.max()) + 1 if len(blocks) else 0
        if tokens_per_sample is not None and longest > tokens_per_sample:
            raise DataError(f"{blocks.text_dir}: blocks of up to {longest} tokens (with <s>) but "
                            f"data.tokens_per_sample "
                            f"is {tokens_per_sample}; re-run `d2v prepare text --tokens-per-sample "
                            f"{tokens_per_sample}` or raise data.tokens_per_sample")
        if longest > tokens_per_batch:
            raise DataError(f"data.text_tokens_per_batch={tokens_per_batch} is smaller than the longest block "
                            f"({longest} tokens with <s>); raise it to at least {longest}")
        if not len(blocks):
            raise DataError(f"{blocks.text_dir}: split '{blocks.split}' has no blocks; prepare more text")

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.blocks))
        order = perm[np.argsort(self.blocks.sizes[perm], kind="stable")]
        groups = group_by_tokens(self.blocks.sizes + 1, order, self.tokens_per_batch)
        return [groups[i] for i in rng.permutation(len(groups))]

    def _collate(self, indices: np.ndarray, epoch: int, index: int) -> Batch:
        seqs = [np.concatenate([[self.bos_id], self.blocks[int(i)]]) for i in indices]
        source, padding_mask = pad_sequences(seqs, self.pad_id)
        return Batch(source=source, padding_mask=padding_mask, ids=[str(int(i)) for i in indices],
                     num_samples=int(sum(len(s) for s in seqs)), epoch=epoch, index=index)


# ----------------------------------------------------------------------------- labeled tasks


def read_task(task_dir: Path | str, tokenizer: Optional[Tokenizer] = None) -> dict:
    """task.json of a `d2v prepare glue` task folder; with `tokenizer` (the model's), records tokenized
    with another one are refused: their ids would mean other pieces to the model."""
    path = Path(task_dir) / "task.json"
    try:
        task = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no text task at {task_dir} (task.json missing). Run `d2v prepare glue DIR` (or "
                        f"`d2v prepare synthetic-text`) with this --workdir first.") from None
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `d2v prepare glue`") from None
    if tokenizer is not None and task.get("tokenizer_sha256") != tokenizer.sha256():
        raise DataError(f"{task_dir} was tokenized with another tokenizer (sha256 "
                        f"{str(task.get('tokenizer_sha256'))[:12]}) than the model's ({tokenizer.source}, "
                        f"{tokenizer.sha256()[:12]}); re-run `d2v prepare glue ... --spm {tokenizer.source}`")
    return task


def read_task_records(task_dir: Path | str, split: str) -> list[dict]:
    path = Path(task_dir) / f"{split}.jsonl"
    if not path.exists():
        have = sorted(p.stem for p in Path(task_dir).glob("*.jsonl"))
        raise DataError(f"{path} not found; task {Path(task_dir).name} has the splits {', '.join(have) or 'none'}")
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "tokens" not in r or "label" not in r:
            raise DataError(f"{path}: line {i} is not a text task record (id, tokens, label); re-run "
                            f"`d2v prepare glue`")
    return rows


class TextTaskLoader(_PositionedLoader):
    """Labeled records in batches of `batch_size`, right-padded (a `data.Batch`: source (B, T) int64,
    padding_mask, target (B,) int64 labels or float32 for regression, num_samples B).

    `shuffle` (training): each epoch a permutation keyed by (seed, epoch); otherwise file order. Every
    record is used (the last batch may be short), except that with world_size > 1 the batches left
    after an even share per rank are not (DDP ranks must take as many steps): evaluate on one rank.
    Records without a label (test splits) get target -1 (classification) or NaN (regression).
    """

    def __init__(self, records: list[dict], batch_size: int, seed: int, *, regression: bool = False,
                 shuffle: bool = True, pad_id: int = PAD, rank: int = 0, world_size: int = 1,
                 max_tokens: Optional[int] = None):
        super().__init__(self._plan, self._collate, seed, rank, world_size)
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1 (got {batch_size})")
        self.records, self.batch_size, self.regression = records, batch_size, regression
        self.shuffle, self.pad_id = shuffle, pad_id
        if max_tokens is not None:
            longest = max((len(r["tokens"]) for r in records), default=0)
            if longest > max_tokens:
                raise DataError(f"a record has {longest} tokens but the model takes at most {max_tokens}; re-run "
                                f"`d2v prepare glue ... --tokens-per-sample {max_tokens}`")

    def _plan(self, epoch: int) -> list[np.ndarray]:
        n = len(self.records)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]

    def _collate(self, indices: np.ndarray, epoch: int, index: int) -> Batch:
        rows = [self.records[int(i)] for i in indices]
        source, padding_mask = pad_sequences([r["tokens"] for r in rows], self.pad_id)
        if self.regression:
            target = torch.tensor([float("nan") if r["label"] is None else float(r["label"]) for r in rows],
                                  dtype=torch.float32)
        else:
            target = torch.tensor([-1 if r["label"] is None else int(r["label"]) for r in rows], dtype=torch.long)
        return Batch(source=source, padding_mask=padding_mask, ids=[str(r["id"]) for r in rows],
                     num_samples=len(rows), target=target, epoch=epoch, index=index)
