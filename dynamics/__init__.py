"""twin.dynamics: how a patient's state evolves, and how a history of visits is read.

- `selective_scan`: the Mamba recurrence, with mamba-ssm's signature; CUDA kernels or a chunked
  pure-PyTorch scan, tested against each other and mamba-ssm's reference.
- `HistoryEncoder`: time-aware Mamba blocks over visit tokens -> a Gaussian posterior.
- `solve`: batched ODE solve, exact at dose times and state jumps (torchdiffeq).
- `Progression`: the biomarker twin's latent disease course, a controlled neural ODE.
"""

from .mamba import HistoryEncoder, Posterior, TimeAwareMambaBlock
from .ode import Solver, StateJumps, solve
from .progression import Exposure, Progression
from .selective_scan import selective_scan

__all__ = ["selective_scan", "TimeAwareMambaBlock", "HistoryEncoder", "Posterior", "Solver", "StateJumps", "solve",
           "Exposure", "Progression"]
