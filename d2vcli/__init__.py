"""d2vcli: data2vec for speech from the command line.

Pipeline: prepare (manifests, LM) -> pretrain (self-distillation) -> finetune (letter CTC)
-> decode (greedy or lexicon + KenLM beam search) -> evaluate (WER/CER).
"""

__version__ = "0.1.0"
