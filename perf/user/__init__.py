"""The benchmark a user would run: Plexus through its own client against NATS through its.

`python -m perf.bench_user` (entry point kept tiny for multiprocessing's spawn; the work is
in `perf.user.cli`). Modules, one job each:

- `platform`  a real Plexus platform (`python -m plexus run`), its manifests and credentials
- `systems/`  harness adapters: `plexus_bus` (Bus, persistence off), `plexus_stored` (on),
              `jetstream` (nats-server -js, file stream, acked push consumers)
- `confirms`  one publisher confirming each message, and pipelined confirms
- `matrix`    which cells run, in which interleaved order
- `table`     medians and the one table of ratios (pure)
- `plot`      the PNG: throughput and p99 against the number of apps
- `cli`       options, progress, JSON
"""
