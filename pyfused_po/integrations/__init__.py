"""Integrations: TRL trainers (:mod:`.trl`) and Hugging Face models (:mod:`.hf`).

Imported lazily: ``import pyfused_po.integrations.trl`` needs ``trl``; ``.hf`` needs nothing
beyond torch until called with a Transformers model.
"""

