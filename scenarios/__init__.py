"""twin.scenarios: treatment schedules, scenario files, and the control signals they drive.

    arms = load_scenarios("scenarios/examples/glioma.toml")        # strict YAML / TOML
    events = arms.events_for(last_visit=1.2, history=own_events)   # {arm: [(t, agent, dose)]}
    controls = controls_from_events(list(events.values()), ["temozolomide", "radiotherapy"])
    controls.u(t, k)                                               # drug concentrations (B, n_drugs)
"""

from .control import ControlSchedule, controls_from_events
from .files import Arm, ScenarioSet, load_scenarios
from .schedule import DAY, Course, Dose, Fractions, Schedule, factual_schedule

__all__ = [
    "DAY",
    "Dose",
    "Course",
    "Fractions",
    "Schedule",
    "factual_schedule",
    "Arm",
    "ScenarioSet",
    "load_scenarios",
    "ControlSchedule",
    "controls_from_events",
]
