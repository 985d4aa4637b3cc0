"""The data2vec objective, independent of the modality: masking, EMA teacher, targets, loss, monitors.

Only torch, numpy, `d2vcli.distributed` (for all-reduce) and `d2vcli.errors` (the user-error base)
are imported here, never a model, a data source or the engine: a modality supplies those and wires them to this core (the audio
task is `d2vcli.pretrain.PretrainTask`).
"""
