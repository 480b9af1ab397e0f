"""The training layer: `args.BWSKTrainingArguments`, `mixin.BWSKMixin` (the modes for any Trainer subclass),
`trainer.BWSKTrainer`, `callback.BWSKCallback`, and
`model_card` (the card of one trained run).

Nothing is imported here, so the card code can be used without importing `transformers.Trainer`
(which imports `datasets`); the public names are re-exported from `hf_bwsk`.
"""
