"""twin.priors: what physiology allows, as model terms, as training penalties and as output checks.

Physiological part: growth laws (`growth`), monotone neurodegeneration (`neurodegeneration`),
one-compartment pharmacokinetics with an Emax effect (`pharmacology`), linear-quadratic
radiotherapy (`radiotherapy`), each a term f_prior(d, theta) of dd/dt for `dynamics.ode.solve`
with its closed form beside it; `penalties` for training; `plausibility` flags on outputs.
Anatomical part: change as a diffeomorphic deformation (`deformation`: velocity fields integrated
by scaling and squaring, Jacobians, masked change, folding and smoothness penalties).
Pure tensor maths: no files, no xarray.
"""

from .deformation import integrate_velocity, jacobian_determinant, masked_change, volume_ratio, warp
from .growth import gompertz, logistic
from .neurodegeneration import progression
from .pharmacology import concentration, emax
from .plausibility import Limits, check_trajectory, reasons
from .radiotherapy import lq_jump

__all__ = [
    "logistic",
    "gompertz",
    "progression",
    "concentration",
    "emax",
    "lq_jump",
    "Limits",
    "check_trajectory",
    "reasons",
    "warp",
    "integrate_velocity",
    "jacobian_determinant",
    "volume_ratio",
    "masked_change",
]
