"""Start and stop a real ``tritonserver`` serving the InstGenIE models: the public entry.

The parts, one concept each:

- :mod:`.triton_install`: which ``tritonserver`` runs (the ``nvidia-pytriton`` wheel's
  files, or ``$INSTGENIE_TRITON_HOME``) and its environment;
- :mod:`.repository`: the model repository, rendered with ``config.pbtxt`` parameters;
- :mod:`.server_process`: one server process: start, readiness, drain, clean stop;
- :mod:`.front`: the public ports, owned by the launcher so a stop can close them;
- :mod:`.leftovers`: what a killed server or launcher leaves, removed at the next start;
- :mod:`.supervisor`: stall and crash detection, restarts, the health endpoint;
- :mod:`.serve`: the ``instgenie serve`` command tying them together.

None of them imports Triton's Python packages or torch, so a CLI imports them cheaply.
"""

from .leftovers import SHM_PREFIX_VARIABLE, remove_leftovers
from .repository import default_model_repository, models_with_parameter, render_repository, set_config_parameters
from .serve import add_serve_command, main, serve_parameters
from .server_process import (
    DRAIN_GAUGES,
    DRAIN_QUIET_S,
    ServerStartError,
    TritonServer,
    free_port,
    process_group_members,
)
from .triton_install import (
    backend_directory,
    pytriton_dir,
    server_environment,
    system_triton_home,
    triton_dir,
    triton_libs_dir,
)

__all__ = [
    "DRAIN_GAUGES",
    "DRAIN_QUIET_S",
    "SHM_PREFIX_VARIABLE",
    "ServerStartError",
    "TritonServer",
    "add_serve_command",
    "backend_directory",
    "default_model_repository",
    "free_port",
    "main",
    "models_with_parameter",
    "process_group_members",
    "pytriton_dir",
    "remove_leftovers",
    "render_repository",
    "serve_parameters",
    "server_environment",
    "set_config_parameters",
    "system_triton_home",
    "triton_dir",
    "triton_libs_dir",
]
