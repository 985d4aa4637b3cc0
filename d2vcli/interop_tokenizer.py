"""A text checkpoint's tokenizer: the files it carries, a Hugging Face `tokenizer.json` written from our
sentencepiece model, and a tokenizer over the byte-level BPE files of an imported HF model.

    entry = sentencepiece_entry(Path("data/text/spm.model"))   # -> the checkpoint's "tokenizer" entry
    entry = hf_entry(folder)                                    # vocab.json, merges.txt, ... of an HF folder
    tok = tokenizer_of(entry)                                   # text_data.Tokenizer, or HFBPETokenizer
    write_hf_tokenizer(entry, out_dir, bos_id=0, ...)           # what `d2v export hf` writes beside the weights

Two families (docs/text-interop.md, "Tokenizers"):

* Models pretrained here use a sentencepiece model whose ids ARE the model's token ids (0 `<s>`, 1 `<pad>`,
  2 `</s>`, 3 `<unk>`, then the pieces, `<mask>` a user-defined piece). transformers has no tokenizer class
  that loads a sentencepiece file with those ids unchanged (XLMRobertaTokenizer shifts every id by one for
  fairseq's dictionary), so the export builds the equivalent `tokenizers` pipeline (the model's pieces and
  scores, its normalizer, the "▁" word-boundary marker) as a `tokenizer.json` that `AutoTokenizer` loads as a
  PreTrainedTokenizerFast. `tests/test_interop_text.py` checks it gives sentencepiece's ids.
* HF data2vec-text models (facebook/data2vec-text-base) use RoBERTa's byte-level BPE (`vocab.json` +
  `merges.txt`, GPT-2's byte-to-unicode table): those files are kept verbatim and written back on export.

The sentencepiece settings the conversion needs (model type, byte fallback, the normalizer's character
map, dummy prefix, whitespace folding) are not exposed by the sentencepiece Python API without protobuf,
so the few fields are read from the serialized model with a small protobuf wire-format reader
(field numbers from sentencepiece's `src/sentencepiece_model.proto`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Optional

import sentencepiece as spm

from d2vcli.fileio import atomic_write_text
from d2vcli.interop_keys import InteropError
from d2vcli.text_data import MASK_PIECE, Tokenizer

# The files of an HF tokenizer that an import keeps (any that exist) and an export writes back.
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json")
TOKENIZERS_MISSING = ("the `tokenizers` package is needed for this (pip install tokenizers; it comes with "
                      "transformers, e.g. pip install 'd2vcli[test]')")

# sentencepiece_model.proto: ModelProto.trainer_spec = 2, .normalizer_spec = 3;
# TrainerSpec.model_type = 3 (1 unigram, 2 bpe, 3 word, 4 char), .byte_fallback = 35;
# NormalizerSpec.name = 1, .precompiled_charsmap = 2, .add_dummy_prefix = 3, .remove_extra_whitespaces = 4.
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _tokenizers():
    try:
        import tokenizers  # noqa: PLC0415 - optional: only tokenizer conversion needs it
    except ImportError:
        raise InteropError(TOKENIZERS_MISSING) from None
    return tokenizers


# --------------------------------------------------------------------------- checkpoint entries


def sentencepiece_entry(path: Path) -> dict:
    """The checkpoint's "tokenizer" entry for a sentencepiece model file (its bytes, so it travels along);
    a model whose special ids are not the d2v ones is refused (text_data.Tokenizer says why)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InteropError(f"{path} cannot be read ({e})") from None
    try:
        Tokenizer(data, str(path))
    except RuntimeError as e:  # sentencepiece's parse error for a file that is not a model
        raise InteropError(f"{path} cannot be read as a sentencepiece model ({e})") from None
    return {"format": "sentencepiece", "model": data, "sha256": hashlib.sha256(data).hexdigest(), "path": str(path)}


def hf_entry(folder: Path) -> Optional[dict]:
    """The entry for an HF folder's tokenizer files (text, kept verbatim), or None when it has none."""
    files = {}
    for name in HF_TOKENIZER_FILES:
        p = Path(folder) / name
        if p.is_file():
            try:
                files[name] = p.read_text(encoding="utf-8")
                if name.endswith(".json"):
                    json.loads(files[name])
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InteropError(f"{p} cannot be read ({e}); re-download the model folder") from None
    if not files:
        return None
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= set(files):
        raise InteropError(f"{folder}: the tokenizer is incomplete ({', '.join(sorted(files))}): byte-level BPE "
                           f"needs vocab.json and merges.txt (or a tokenizer.json)")
    return {"format": "hf", "files": files}


def special_id(entry: Optional[dict], token: str) -> Optional[int]:
    """The id an HF tokenizer entry gives `token` (e.g. "<mask>"), or None."""
    if not entry or entry.get("format") != "hf":
        return None
    files = entry["files"]
    if "tokenizer.json" in files:
        spec = json.loads(files["tokenizer.json"])
        for added in spec.get("added_tokens", []):
            if added.get("content") == token:
                return int(added["id"])
        vocab = (spec.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    if "vocab.json" in files:
        vocab = json.loads(files["vocab.json"])
        if token in vocab:
            return int(vocab[token])
    if "added_tokens.json" in files:
        added = json.loads(files["added_tokens.json"])
        if token in added:
            return int(added[token])
    return None


# --------------------------------------------------------------------------- tokenizers for encode/decode


class HFBPETokenizer:
    """RoBERTa's byte-level BPE from an imported model's files, with text_data.Tokenizer's interface
    (encode gives the pieces' ids, no `<s>`/`</s>`; the caller adds them as for sentencepiece)."""

    def __init__(self, entry: dict, source: str = "checkpoint"):
        tk = _tokenizers()
        files = entry["files"]
        self.source = source
        self._sha256 = entry_sha256(entry)
        if "tokenizer.json" in files:
            self._tok = tk.Tokenizer.from_str(files["tokenizer.json"])
            self._tok.post_processor = None  # specials are added by the caller
        else:
            bpe = tk.models.BPE(json.loads(files["vocab.json"]), _merges(files["merges.txt"]))
            self._tok = tk.Tokenizer(bpe)
            self._tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
            self._tok.decoder = tk.decoders.ByteLevel()
        ids = {t: self._tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise InteropError(f"the imported tokenizer has no {', '.join(missing)} token")
        self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id = ids.values()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._tok.add_special_tokens(list(ids))  # whole tokens, never split by the BPE

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def sha256(self) -> str:
        """What `d2v prepare glue` records in task.json, so fine-tuning can check the ids are this tokenizer's."""
        return self._sha256


def entry_sha256(entry: dict) -> str:
    """A tokenizer entry's identity: the sentencepiece model's sha256, or that of the HF files' canonical JSON."""
    if entry.get("format") == "sentencepiece":
        return hashlib.sha256(entry["model"]).hexdigest()
    return hashlib.sha256(json.dumps(entry.get("files") or {}, sort_keys=True).encode()).hexdigest()


def _merges(text: str) -> list[tuple[str, str]]:
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#version")]
    return [tuple(ln.split(" ", 1)) for ln in lines]


def tokenizer_of(entry: Optional[dict], source: str = "checkpoint"):
    """A tokenizer for a checkpoint's entry (sentencepiece or HF byte-level BPE)."""
    if not entry:
        raise InteropError(f"{source} carries no tokenizer: pass the sentencepiece model it was trained with")
    if entry.get("format") == "sentencepiece":
        return Tokenizer(entry["model"], entry.get("path", source))
    if entry.get("format") == "hf":
        return HFBPETokenizer(entry, source)
    raise InteropError(f"{source}: unknown tokenizer format {entry.get('format')!r}")


# --------------------------------------------------------------------------- sentencepiece -> tokenizer.json


def _fields(buf: bytes) -> dict[int, list]:
    """A protobuf message's fields: number -> values (varints as ints, length-delimited as bytes)."""
    out: dict[int, list] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            if i >= len(buf):
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n = varint()
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def spm_settings(model: bytes) -> dict:
    """The trainer and normalizer settings of a serialized sentencepiece model that tokenization depends on."""
    top = _fields(model)
    trainer = _fields(top.get(2, [b""])[-1])
    norm = _fields(top.get(3, [b""])[-1])
    flag = lambda fields, n, default: bool(fields[n][-1]) if n in fields else default  # noqa: E731
    return {
        "model_type": _MODEL_TYPES.get(trainer.get(3, [1])[-1], "unknown"),
        "byte_fallback": flag(trainer, 35, False),
        "normalizer": norm.get(1, [b""])[-1].decode("utf-8", "replace"),
        "charsmap": norm.get(2, [b""])[-1],
        "add_dummy_prefix": flag(norm, 3, True),
        "remove_extra_whitespaces": flag(norm, 4, True),
    }


_PIECE_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}


def _spm_pieces(model: bytes) -> list[tuple[str, float, str]]:
    """(piece, score, type) in id order, from ModelProto.pieces = 1 (SentencePiece: piece 1, score 2, type 3)."""
    out = []
    for raw in _fields(model).get(1, []):
        f = _fields(raw)
        score = struct.unpack("<f", f[2][-1])[0] if 2 in f else 0.0
        out.append((f[1][-1].decode("utf-8"), score, _PIECE_TYPES.get(f.get(3, [1])[-1], "normal")))
    return out


def spm_to_tokenizers(model: bytes):
    """A `tokenizers.Tokenizer` that segments text as the sentencepiece model does, with the same ids."""
    tk = _tokenizers()
    sp = spm.SentencePieceProcessor(model_proto=model)
    s = spm_settings(model)
    pieces = _spm_pieces(model)
    unk = sp.unk_id()
    if s["model_type"] == "unigram":
        core = tk.models.Unigram([(p, score) for p, score, _ in pieces], unk_id=unk, byte_fallback=s["byte_fallback"])
    elif s["model_type"] == "bpe":
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        core = tk.models.BPE(vocab, _bpe_merges(pieces, vocab), unk_token=pieces[unk][0], fuse_unk=True,
                             byte_fallback=s["byte_fallback"])
    else:
        raise InteropError(f"a sentencepiece {s['model_type']!r} model cannot be written as a tokenizer.json "
                           f"(bpe and unigram can)")
    tok = tk.Tokenizer(core)
    norms = []
    if s["charsmap"]:
        norms.append(tk.normalizers.Precompiled(s["charsmap"]))
    if s["remove_extra_whitespaces"]:
        # sentencepiece drops leading and trailing spaces and folds runs of spaces into one.
        norms += [tk.normalizers.Replace(tk.Regex(r"\A +| +\z"), ""), tk.normalizers.Replace(tk.Regex(" {2,}"), " ")]
    if norms:
        tok.normalizer = tk.normalizers.Sequence(norms)
    scheme = "always" if s["add_dummy_prefix"] else "never"
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    # Decoding: "▁" back to spaces, byte pieces back to bytes, then the dummy prefix's space dropped.
    steps = [tk.decoders.Replace("▁", " ")] + ([tk.decoders.ByteFallback()] if s["byte_fallback"] else [])
    steps.append(tk.decoders.Fuse())  # one string, so the strip below removes only the first space
    if s["add_dummy_prefix"]:
        steps.append(tk.decoders.Strip(" ", 1, 0))
    tok.decoder = tk.decoders.Sequence(steps)
    # Control pieces (<s>, <pad>, </s>) and user-defined ones (<mask>) are whole tokens, never segmented;
    # sentencepiece matches user-defined pieces in raw text, and so do special added tokens.
    # User-defined pieces are matched after normalization, as sentencepiece does. A model without a <mask>
    # piece gets it as the id after its last piece (text_data.Tokenizer's rule): the next added token's id.
    tok.add_special_tokens([tk.AddedToken(p, special=True, normalized=kind == "user_defined")
                            for p, _, kind in pieces if kind in ("control", "unknown", "user_defined")])
    if all(p != MASK_PIECE for p, _, _ in pieces):
        tok.add_special_tokens([tk.AddedToken(MASK_PIECE, special=True, normalized=True)])
    return tok


def _bpe_merges(pieces: list[tuple[str, float, str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """sentencepiece BPE stores no merge list: every way to split a piece into two pieces of the vocabulary
    is a merge, ranked by the merged piece's score (sentencepiece merges the highest-scoring pair first)."""
    merges = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != "normal" or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, i, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def write_hf_tokenizer(entry: dict, out_dir: Path, *, bos_id: int, pad_id: int, eos_id: int, unk_id: int,
                       mask_id: int, max_length: int) -> list[Path]:
    """The tokenizer files of an export: an HF entry's files as they were, or a tokenizer.json built from a
    sentencepiece entry (with RoBERTa's `<s> A </s>` / `<s> A </s></s> B </s>` framing) and its config."""
    out_dir = Path(out_dir)
    if entry.get("format") == "hf":
        written = []
        for name, text in entry["files"].items():
            atomic_write_text(out_dir / name, text)
            written.append(out_dir / name)
        return written
    if entry.get("format") != "sentencepiece":
        raise InteropError(f"unknown tokenizer format {entry.get('format')!r}")
    tk = _tokenizers()
    tok = spm_to_tokenizers(entry["model"])
    names = {i: tok.id_to_token(i) for i in (bos_id, pad_id, eos_id, unk_id, mask_id)}
    if any(v is None for v in names.values()):
        raise InteropError(f"the sentencepiece model has no piece for the special ids {sorted(names)}")
    bos, pad, eos, unk, mask = (names[i] for i in (bos_id, pad_id, eos_id, unk_id, mask_id))
    tok.post_processor = tk.processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, bos_id), (eos, eos_id)])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # data2vec-text's default (RobertaTokenizer) wants vocab.json
        "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad, "mask_token": mask,
        "cls_token": bos, "sep_token": eos, "model_max_length": max_length,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
    }
    files = {"tokenizer.json": tok.to_str(pretty=False), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
    return [out_dir / name for name in files]
