"""The engine that reads models, SAEs and gradients: loading (`models`, `saes`), generation,
feature statistics (`extract`, `stats`, `mixture`), the LoRA fine-tuning recipe (`finetuning`)
and evaluation of a model on questions (`evaluation`), the LoRA gradient sides (`gradients`,
`per_example`), the run's first steps (`lookahead`) and SAE training (`train_sae`). Fine-tuning
and evaluation sit here, not under validation, because the gradient and lookahead scores run the
same recipe and losses.
"""
