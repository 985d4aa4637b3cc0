"""Decoding: CTC emissions computed once and cached, then greedy and lexicon + KenLM beam search.

    d2v decode [RUN_OR_CKPT] [--splits dev-clean dev-other] [--lm 4gram.bin] [--tune] [--workers N]
    from d2vcli.decode.run import decode; result = decode(ws, cfg.decode, lm="4gram.bin")

The modules, in pipeline order:

    emissions.py  the acoustic model pass and the emissions cache
    search.py     greedy decoding, flashlight-text beam search, the beam-search worker pool
    tuning.py     LM-weight tuning on cached emissions
    run.py        the `decode()` command: validation up front, outputs per split
    timings.py    word times from a CTC path (`d2v transcribe --timestamps`)
    simulate.py   constructed emissions for checks without a model (doctor, tests, benchmarks)
    errors.py     DecodeError, MissingDependency

Pipeline, and the reasons for it:

1. **Emissions, once.** The acoustic model runs over each split in length-sorted batches (on
   the GPU when there is one), with the waveform normalization stored in the checkpoint
   (never a flag the user can get wrong). The log-probabilities are written as one float16
   (frames, V) array per split (`decode/<run>/emissions-<split>-<key>.npy`, utterances back
   to back) plus a JSON index. The key hashes the checkpoint's bytes and the manifest's, so
   any later decode, tuning run or `d2v evaluate` with other LM settings reads the cache and
   never reruns the model; a new checkpoint or manifest recomputes.
2. **Greedy** (always, tag "greedy"): per-frame argmax, repeats collapsed, blanks dropped.
   Pure numpy: it needs neither flashlight nor KenLM.
3. **Beam search** (tag "lm"): flashlight-text's `LexiconDecoder` (CTC criterion, max not
   log-add, a trie of lexicon spellings smeared with each word's unigram score, as fairseq's
   `W2lKenLMDecoder`), with KenLM through `flashlight.lib.text.decoder.kenlm.KenLM`. Options
   (config section `decode`) default to fairseq's: beam 50, beam threshold 50, beam_size_token
   = vocabulary size, lm_weight 2, word_score -1, sil_weight 0, unk_weight -inf. Blank is
   index 0 (`<s>`), silence is `|`.
   A letter-level KenLM (`d2v prepare lm --unit letter`, vocabulary of letters and `|`) selects
   `LexiconFreeDecoder`, which can spell words outside any lexicon; `--lexicon-free` without an
   LM runs the same search with flashlight's `ZeroLM` (tag "beam"): a CTC prefix beam search
   whose result is close to greedy. A word LM cannot be used lexicon-free (the lexicon-free
   decoder queries the LM once per letter), which is an error that says so.
4. **Parallel workers.** Beam search is single-threaded C++, so `decode.workers` processes
   (default: one per core) each build the decoder once and take chunks of utterances. Workers
   get only (offset, length) rows and read the float16 cache through a memory map, so memory
   stays flat however large the split; results (words and a score) are small.
5. **Tuning** (`--tune`): lm_weight, word_score and sil_weight are searched on a dev split
   (default dev-other) over the cached emissions, all trials in parallel, with a smaller
   beam (`decode.tune_beam`); the default setting is always trial 0, so tuning never picks
   something worse than the default on the tuning split. The result goes to
   `decode/<run>/tuned.json` and later decodes with the same LM use it (and say so).

**Emissions fed to flashlight are log-probabilities** (log_softmax), as in fairseq's
training-time KenLM validation (fairseq `fairseq/criterions/ctc.py`). fairseq's offline
infer.py feeds raw logits instead (fairseq `examples/speech_recognition/w2l_decoder.py`,
`W2lDecoder.get_emissions`), so its tuned LM weights do not carry over exactly: the logits differ
from log-probs by a per-frame constant, which the beam search's threshold and the LM weight
both see. Log-probs make the acoustic and LM scores commensurable and the scores per-frame
normalized, which is what the LM weight is meant to balance.

`sil_weight` is honoured (fairseq's training-time decoding in `fairseq/criterions/ctc.py`
overwrites it with 0).

Outputs per split in <workdir>/decode/<run>/: `ref-<split>.txt`, `hyp-<split>-<tag>.txt`
(sclite trn format, `TEXT (utterance-id)`: `sclite -r ref-X.txt -h hyp-X-lm.txt -i rm`) and
`scores-<split>-<tag>.tsv` (id, decoder score, reference words, word errors).
"""
