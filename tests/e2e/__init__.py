"""Real processes: `sidecar` verbs and daemons as subprocesses, kill -9, JupyterLab."""
