"""Twin: a digital-twin engine for longitudinal medical imaging.

    from twin import BiomarkerTwin, TwinConfig, ScanTwin, ScanConfig
    twin = BiomarkerTwin.fit(cohort, TwinConfig(), checkpoint_dir="model")   # biomarkers only
    twin = ScanTwin.fit(cohort, ScanConfig(), checkpoint_dir="model")        # scans (and biomarkers)
    result = twin.forecast(cohort, horizons=[1, 2, 3])      # an xarray Dataset
    ev = evaluate(twin, cohort)                             # held-out scores: ev.metrics (docs/evaluation.md)
"""

import importlib

from .errors import CohortError, InputError, TwinError

__version__ = "0.1.0"
__all__ = ["BiomarkerTwin", "TwinConfig", "ScanTwin", "ScanConfig", "load_twin", "read_requests", "open_result", "write_result", "export_result_table",
           "evaluate", "write_evaluation", "InputError", "CohortError", "TwinError", "__version__"]

# Imported on first use, so `import twin` (and `twin --help`) does not pay for torch.
_LAZY = {"BiomarkerTwin": "biomarker_twin", "TwinConfig": "biomarker_twin", "ScanTwin": "scan_twin",
         "ScanConfig": "scan_twin", "load_twin": "scan_twin", "read_requests": "biomarker_twin",
         "open_result": "results", "write_result": "results", "export_result_table": "results",
         "evaluate": "evaluation", "write_evaluation": "evaluation_report"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'twin' has no attribute {name!r}")
