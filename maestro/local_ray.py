"""A local Ray whose services listen on the loopback interface only: the one way maestro starts one.

`ray.init(_node_ip_address="127.0.0.1")` is not enough in Ray 2.60: Ray replaces a loopback node
address by the machine's routable one, and its GCS, raylet, object manager and workers then listen
on every interface. Ray's single-machine mode (its macOS/Windows default, `LOCAL_ONLY_ENV=0`) keeps
the node address at 127.0.0.1, and every service binds there. Token authentication is Ray 2.60's
default for a local start. Used by the pretraining launcher (`cluster/launch.py`) and by anything
else that starts a local Ray (conversion fan-out).
"""

from __future__ import annotations

import os
from typing import Any

LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start(num_cpus: int, num_gpus: int = 0, **options: Any) -> None:
    """`ray.init` of a local Ray on 127.0.0.1 with no dashboard; `options` go to `ray.init`
    (`object_store_memory`, `log_to_driver`, `_temp_dir`, ...)."""
    import ray
    import ray._private.ray_constants as ray_constants

    os.environ[LOCAL_ONLY_ENV] = "0"  # read when Ray is imported, here and in its child processes
    ray_constants.ENABLE_RAY_CLUSTER = False  # and where Ray was imported before
    # address="local": always a new instance, never a cluster found on the machine (a `ray start`
    # or `ray.cluster_utils.Cluster` head records itself in /tmp/ray and `ray.init()` would join it).
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **options)
