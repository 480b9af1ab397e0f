"""The Pythia recipe on a test-size tiny preset, runnable as a script (for tests that kill it).

    python tests/tiny_recipe.py --output_dir OUT [flags]
"""

import dataclasses
import sys

from hf_bwsk.experiments.data import TinyCorpus
from hf_bwsk.experiments.presets import PYTHIA_PRESETS
from hf_bwsk.recipe import main

TEST_PRESETS = {
    "tiny": dataclasses.replace(
        PYTHIA_PRESETS["tiny"], data=TinyCorpus(max_chars=30_000), block_size=32, max_epochs=2, logging_steps=5
    ),
}

if __name__ == "__main__":
    main(TEST_PRESETS, sys.argv[1:])
