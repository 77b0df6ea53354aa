"""Twin: a digital-twin engine for longitudinal medical imaging."""

from .errors import CohortError, InputError, TwinError

__version__ = "0.1.0"
__all__ = ["InputError", "CohortError", "TwinError", "__version__"]
