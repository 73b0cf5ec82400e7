"""Starting a local Ray cluster whose workers run at the driver's niceness and never read another cluster's state.

Ray starts its worker processes at niceness 15. On a machine with any other
load at the default niceness (a second job, a busy loop, a browser) such
workers get almost no CPU: the cells' timing starves, and Ray Train jobs miss
their health checks. A cluster specsweep starts itself runs its workers at
niceness 0 instead; a cluster it joins keeps its own setting.

Ray Train's placement-group cleaner asks the State API whether the job's
controller is alive, and without an address the State API reads the cluster
started last on the machine. A cluster specsweep starts has no dashboard, so
no State API of its own: when a second cluster with one started later (a test
suite, another tool), the cleaner asked that cluster, did not find the
controller, and removed the training job's placement group, which killed the
job. A cluster specsweep starts therefore gives its processes a State API
address that answers nothing (``STATE_API_NOWHERE``): the cleaner's queries
fail, and it keeps monitoring, as Ray intends when the State API is down.
"""

from __future__ import annotations

import os
from typing import Any

WORKER_NICENESS = 0
NICENESS_CONFIG = {"worker_niceness": WORKER_NICENESS}  # Ray's _system_config entry that sets it
STATE_API_VARIABLE = "RAY_API_SERVER_ADDRESS"  # read by the State API before RAY_ADDRESS and auto-detection
STATE_API_NOWHERE = "http://127.0.0.1:9"  # the discard port: every query is refused at once


def start_local_ray(num_cpus: int, log_to_driver: bool = True, **options: Any) -> None:
    """Start a new local Ray cluster of ``num_cpus`` CPUs, no dashboard, its workers at ``WORKER_NICENESS``, its
    processes' State API pointed at ``STATE_API_NOWHERE`` (the driver's environment is left as it was)."""
    import ray

    previous = os.environ.get(STATE_API_VARIABLE)
    os.environ[STATE_API_VARIABLE] = STATE_API_NOWHERE  # inherited by the cluster's processes as they start
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                 _system_config=dict(NICENESS_CONFIG), **options)
    finally:
        if previous is None:
            os.environ.pop(STATE_API_VARIABLE, None)
        else:
            os.environ[STATE_API_VARIABLE] = previous
