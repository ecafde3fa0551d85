"""The supervisor: launches the broker and every app, each in its own process, and stops them.

`spawner` is the one seam to the OS (spawn, signal, wait); `launch` builds an app's
environment and credential; `supervisor` runs the platform; `config` reads `--config`;
`app_output` pumps the apps' stdout and stderr into `HOME/logs` (`log_lines`, `log_files`)
and onto the terminal.
"""
