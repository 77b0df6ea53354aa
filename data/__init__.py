"""The cohort: its schema on xarray/zarr, importers and exporters, and simulators with ground truth."""

from .accessor import describe  # importing it registers the ds.twin accessor
from .bids import import_bids
from .export import export_nifti
from .schema import cohort
from .simulate import simulate
from .store import append_subjects, open_cohort, write_cohort
from .table import export_table, import_table
from .validate import validate

__all__ = [
    "cohort", "validate", "open_cohort", "write_cohort", "append_subjects", "describe",
    "simulate", "import_bids", "import_table", "export_table", "export_nifti",
]
