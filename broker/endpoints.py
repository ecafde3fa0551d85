"""Where the bus, the event stream and the store listen: ipc paths, or loopback TCP ports.

On ipc (the default where libzmq has it) each endpoint is a socket file in the run dir,
named by `PlatformPaths`. On TCP (`[broker] transport = "tcp"`, or a libzmq without ipc)
the supervisor opens three listening sockets on 127.0.0.1 once, at platform start, and
holds them for the platform's life: each service binds its ZeroMQ socket on the
descriptor it inherits (libzmq's ZMQ_USE_FD), so the port is known before any service
runs, a restarted broker or store gets the same port back (apps keep the PLEXUS_ENDPOINT
they were started with), and no other process can take the port in between.

A service learns its endpoints from its environment: `PLEXUS_ENDPOINT`,
`PLEXUS_EVENTS_ENDPOINT`, `PLEXUS_STORE_ENDPOINT`, and `PLEXUS_LISTEN_FDS`
(`bus=5,events=6,store=7`) for the descriptors to bind on; without them, the ipc paths.
Over TCP every connection is CurveZMQ as over ipc (`security.credentials`); a libzmq built
without CURVE cannot serve it, and `require_curve` refuses to start.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import zmq

from broker.paths import PlatformPaths

LOOPBACK = "127.0.0.1"
LISTEN_FDS_VARIABLE = "PLEXUS_LISTEN_FDS"
BUS_VARIABLE = "PLEXUS_ENDPOINT"
EVENTS_VARIABLE = "PLEXUS_EVENTS_ENDPOINT"
STORE_VARIABLE = "PLEXUS_STORE_ENDPOINT"
NAMES = ("bus", "events", "store")
LISTEN_BACKLOG = 512
"""Connections the kernel queues while a restarted service is not yet accepting."""


class Transport(StrEnum):
    IPC = "ipc"
    TCP = "tcp"


class EndpointError(Exception):
    """The endpoints cannot be set up; the message says what to do."""


def effective_transport(configured: str) -> Transport:
    """The transport the platform runs on: the configured one, TCP where there is no ipc."""
    if configured == Transport.IPC and zmq.has("ipc"):
        return Transport.IPC
    return Transport.TCP


def require_curve() -> None:
    """EndpointError when this libzmq cannot be a CurveZMQ server (never serve without it)."""
    if not zmq.has("curve"):
        raise EndpointError(
            "this libzmq has no CURVE security; the platform never serves without it: "
            "install a pyzmq wheel (it bundles libzmq with CURVE)"
        )


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The three endpoints of one platform (connect strings, ports resolved)."""

    bus: str
    events: str
    store: str

    @classmethod
    def ipc(cls, paths: PlatformPaths) -> Endpoints:
        return cls(paths.bus_endpoint(), paths.events_endpoint(), paths.store_endpoint())

    @classmethod
    def from_environment(
        cls, paths: PlatformPaths, environ: Mapping[str, str] | None = None
    ) -> Endpoints:
        """What the supervisor named in the environment; the ipc paths of `paths` without."""
        env = os.environ if environ is None else environ
        named = [env.get(v, "") for v in (BUS_VARIABLE, EVENTS_VARIABLE, STORE_VARIABLE)]
        if not any(named):
            return cls.ipc(paths)
        if not all(named):
            raise EndpointError(
                f"{BUS_VARIABLE}, {EVENTS_VARIABLE} and {STORE_VARIABLE} name the endpoints "
                "together; set all three (the supervisor does) or none"
            )
        return cls(*named)

    @property
    def transport(self) -> Transport:
        return Transport.TCP if self.bus.startswith("tcp://") else Transport.IPC

    def environment(self) -> dict[str, str]:
        """The variables that hand these endpoints to a service."""
        return {BUS_VARIABLE: self.bus, EVENTS_VARIABLE: self.events, STORE_VARIABLE: self.store}


def parse_listen_fds(text: str) -> dict[str, int]:
    """`bus=5,events=6` -> {"bus": 5, "events": 6}; EndpointError naming what is wrong."""
    fds: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        name, _, number = item.partition("=")
        if name not in NAMES or not number.isdigit():
            raise EndpointError(
                f"{LISTEN_FDS_VARIABLE}={text!r}: each item is NAME=FD with NAME one of "
                f"{', '.join(NAMES)}"
            )
        fds[name] = int(number)
    return fds


def listen_fds_from_environment(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    env = os.environ if environ is None else environ
    return parse_listen_fds(env.get(LISTEN_FDS_VARIABLE, ""))


def bind(sock: zmq.Socket[bytes], name: str, endpoint: str, listen_fds: Mapping[str, int]) -> str:
    """Bind `sock` at `endpoint`, on the inherited listening descriptor of `name` when
    there is one; returns the endpoint libzmq reports."""
    fd = listen_fds.get(name)
    if fd is not None:
        sock.setsockopt(zmq.USE_FD, fd)
    sock.bind(endpoint)
    bound: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return bound


class Listeners:
    """The supervisor's listening TCP sockets, one per endpoint, held for the platform's
    life so each port outlives the service that accepts on it."""

    def __init__(self, sockets: Mapping[str, socket.socket]) -> None:
        self._sockets = dict(sockets)

    @classmethod
    def open(cls, host: str = LOOPBACK) -> Listeners:
        opened: dict[str, socket.socket] = {}
        try:
            for name in NAMES:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                opened[name] = sock
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, 0))
                sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            for sock in opened.values():
                sock.close()
            raise EndpointError(f"cannot listen on {host}: {exc.strerror}") from None
        return cls(opened)

    @property
    def endpoints(self) -> Endpoints:
        def url(name: str) -> str:
            host, port = self._sockets[name].getsockname()[:2]
            return f"tcp://{host}:{port}"

        return Endpoints(url("bus"), url("events"), url("store"))

    def fds(self, *names: str) -> dict[str, int]:
        """The descriptors of `names`, for a child to inherit (pass them to the spawner)."""
        return {name: self._sockets[name].fileno() for name in names}

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


def listen_fds_variable(fds: Mapping[str, int]) -> str:
    return ",".join(f"{name}={fd}" for name, fd in fds.items())
