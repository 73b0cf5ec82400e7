"""Starting a local Ray cluster whose workers run at the driver's niceness.

Ray starts its worker processes at niceness 15. On a machine with any other
load at the default niceness (a second job, a busy loop, a browser) such
workers get almost no CPU: the cells' timing starves, and Ray Train jobs miss
their health checks. A cluster specsweep starts itself runs its workers at
niceness 0 instead; a cluster it joins keeps its own setting.
"""

from __future__ import annotations

from typing import Any

WORKER_NICENESS = 0
NICENESS_CONFIG = {"worker_niceness": WORKER_NICENESS}  # Ray's _system_config entry that sets it


def start_local_ray(num_cpus: int, log_to_driver: bool = True, **options: Any) -> None:
    """Start a new local Ray cluster of ``num_cpus`` CPUs, no dashboard, its workers at ``WORKER_NICENESS``."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
             _system_config=dict(NICENESS_CONFIG), **options)
