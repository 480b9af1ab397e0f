"""Mamba-130M in 6 variants (3 BWSK modes x fine-tune / from scratch), end to end.

    python recipes/mamba.py                          # --preset tiny: offline, a few minutes on a CPU
    python recipes/mamba.py --preset full            # state-spaces/mamba-130m-hf on WikiText-2 (needs the Hub)
    accelerate launch recipes/mamba.py --preset full --output_dir runs/mamba-130m
    python recipes/mamba.py recipes/mamba_full.yaml
    python recipes/mamba.py --help                   # every flag, incl. all BWSKTrainingArguments fields

Without the mamba-ssm / causal-conv1d CUDA kernels transformers runs Mamba's reference scan: it
trains correctly, only slower.
"""

from hf_bwsk.experiments.presets import MAMBA_PRESETS
from hf_bwsk.recipe import main

if __name__ == "__main__":
    main(MAMBA_PRESETS)
