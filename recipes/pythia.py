"""Pythia-70M in 6 variants (3 BWSK modes x fine-tune / from scratch), end to end.

    python recipes/pythia.py                         # --preset tiny: offline, a few minutes on a CPU
    python recipes/pythia.py --preset full           # EleutherAI/pythia-70m on WikiText-2 (needs the Hub)
    accelerate launch recipes/pythia.py --preset full --output_dir runs/pythia-70m
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/pythia.py --preset full
    python recipes/pythia.py recipes/pythia_full.yaml
    python recipes/pythia.py --help                  # every flag, incl. all BWSKTrainingArguments fields

Writes ``<output_dir>/{finetune,scratch}-{conventional,bwsk-analyzed,bwsk-reversible}/`` and
``<output_dir>/results.json``, and prints the results tables.
"""

from hf_bwsk.experiments.presets import PYTHIA_PRESETS
from hf_bwsk.recipe import main

if __name__ == "__main__":
    main(PYTHIA_PRESETS)
