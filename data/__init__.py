"""The cohort: its schema on xarray/zarr, importers and exporters, and simulators with ground truth."""

from .accessor import describe  # importing it registers the ds.twin accessor
from .schema import cohort
from .store import append_subjects, open_cohort, write_cohort
from .validate import validate

__all__ = ["cohort", "validate", "open_cohort", "write_cohort", "append_subjects", "describe"]
