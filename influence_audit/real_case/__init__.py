"""The real-model case (``influence-audit demo --real``): chat rows with planted facts (``data/``, made by
``scripts/real_case/make_rows.py``) and the LoRA adapter fine-tuned once on them over SmolLM2-135M-Instruct
(``adapter/``, trained by ``scripts/real_case/train_adapter.py``, with its training log)."""
