"""Integrations: TRL trainers (:mod:`.trl`) and Hugging Face models (:mod:`.hf`).

Imported lazily: ``import pyfused_po.integrations.trl`` needs ``trl``; ``.hf`` needs nothing
beyond torch until called with a Transformers model.
"""
from . import hf_packed  # noqa: F401  (needs only torch; registers the packed form of hf.model_preference_loss)
from . import trl_preference_loss  # noqa: F401  (needs only torch to import; registers use_preference_loss)
from . import trl_plan  # noqa: F401  (needs only torch to import; registers apply's three-GEMM plans)
from . import trl_inline  # noqa: F401  (needs only torch to import; registers apply's switch for TRL 1.9-1.14)
