"""Parameter count of every pretraining preset, with the regression head (matches fairseq's count).

    python benchmarks/param_count.py
"""

from __future__ import annotations

import torch

from d2vcli import config as cfgmod
from d2vcli.models.audio import Data2VecForPretraining, build_backbone, parameter_count


def main() -> None:
    with torch.device("meta"):  # shapes only: no memory, no init time
        for name, (command, _) in cfgmod.PRESETS.items():
            if command != "pretrain":
                continue
            model = Data2VecForPretraining(build_backbone(cfgmod.resolve("pretrain", preset=name).model))
            print(f"{name:<14} {parameter_count(model):>13,} parameters")


if __name__ == "__main__":
    main()
