"""A peer broker binary (nats-server, mosquitto) on a free loopback port, for the adapters."""

from __future__ import annotations

from collections.abc import Callable

from perf import procutil
from perf.systems import BrokerConfig, BrokerHandle


class TcpServerBroker(BrokerHandle):
    """Starts `binary_name` with the argv `argv_for(binary, port)` returns, under `timeout`,
    logging into the run's temp dir, and waits until the port accepts connections."""

    def __init__(
        self,
        config: BrokerConfig,
        binary_name: str,
        scheme: str,
        argv_for: Callable[[str, int], list[str]],
    ) -> None:
        binary = procutil.find_binary(binary_name)
        if binary is None:
            raise RuntimeError(f"{binary_name} not found")
        port = procutil.free_port()
        self.endpoint = f"{scheme}://127.0.0.1:{port}"
        self._proc = procutil.spawn_bounded(
            argv_for(binary, port), config.max_seconds, config.workdir / f"{binary_name}.log"
        )
        try:
            procutil.wait_tcp(port, 15.0, self._proc)
        except Exception:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return procutil.child_pids(self._proc.pid)

    def cpu_groups(self) -> dict[str, list[int]]:
        """One process: the server is the broker."""
        return {"broker": self.pids()}

    def stop(self) -> None:
        procutil.stop_process(self._proc)
