"""Language-model resources for beam-search decoding: the KenLM binary, the letter lexicon, the
KenLM tools that build them, and the checks that stop the classic silent 100 % WER.

    formats.py      the files in <workdir>/lm/ (ARPA, lexicon, KenLM binary): reading, case checks, lookup
    kenlm_tools.py  lmplz and build_binary: found on PATH or in the cache, else built there
    prepare.py      `d2v prepare lm`: build the binary and the lexicon, and the validation report
"""
