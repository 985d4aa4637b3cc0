"""d2vcli: data2vec for speech from the command line, and from Python.

Pipeline: prepare (manifests, LM) -> pretrain (self-distillation) -> finetune (letter CTC)
-> decode (greedy or lexicon + KenLM beam search) -> evaluate (WER/CER).

The Python API is the code the CLI runs:

    import d2vcli
    model = d2vcli.load("finetune-10h")              # a run name, run directory or checkpoint
    print(model.transcribe("a.wav").text)            # greedy; lm="auto" uses the workspace's KenLM
    frames = model.embed("a.wav", layer=8)           # (T, D) hidden states, pretrain or ctc checkpoints

    ws = d2vcli.Workspace.resolve("d2v-work")
    d2vcli.prepare.prepare_librispeech(ws, root="/data/LibriSpeech")     # each `d2v prepare X` command
    d2vcli.pretrain(d2vcli.resolve_config("pretrain", preset="speech-base"), ws, name="base")
    d2vcli.finetune(d2vcli.resolve_config("finetune", preset="finetune-10h",
                                          overrides=["finetune.init=base"]), ws, name="base-10h")

`d2vcli.pretrain` and `d2vcli.finetune` are the modules of those commands and are also callable
as their functions (`d2vcli.pretrain.pretrain`, `d2vcli.finetune.finetune`): a submodule is
bound to its package's attribute whenever it is imported, so the function cannot take the name.
"""

import importlib

__version__ = "0.1.0"

# Public name -> (module, attribute; None = the module itself). Imported on first use (PEP 562
# module __getattr__), not here: `import d2vcli` must stay cheap (no torch), because the CLI's
# `d2v --help` and every tool that only reads `d2vcli.__version__` import this package.
_LAZY = {
    "load": ("d2vcli.api", "load"),
    "Model": ("d2vcli.api", "Model"),
    "Transcript": ("d2vcli.transcribe", "Transcript"),
    "prepare": ("d2vcli.prepare", None),
    "pretrain": ("d2vcli.pretrain", None),
    "finetune": ("d2vcli.finetune", None),
    "Config": ("d2vcli.config", "Config"),
    "resolve_config": ("d2vcli.config", "resolve"),
    "Workspace": ("d2vcli.workspace", "Workspace"),
    "UserError": ("d2vcli.errors", "UserError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'd2vcli' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
