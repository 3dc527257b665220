"""Sweeps: spec files and their expansion (``spec``), and the learning sweeps' study, a fold of
a sweep's events (``study``), with its sampler (``tpe``) and pruners (``pruners``)."""

from evo.sweeps.spec import (  # noqa: F401 - the spec's API, as evo.sweeps
    Dist, SweepSpec, check, configurations, cost_params, data_fingerprint, expected_cost,
    job_specs, load_sweep, record,
)
