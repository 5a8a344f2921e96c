"""How `serve` stops: on SIGTERM it drains (new requests get a quick 503, those in flight finish), on Ctrl+C it
stops at once, and when one of its processes dies it exits 1 with one line, for a supervisor to restart it.

The gate is a plain ASGI middleware in the API server, which LitServe forks from this process: the
drain flag and the count of requests in flight are shared memory made here before the fork.
"""

import json
import multiprocessing
import os
import signal
import sys
import threading
import time

API_SERVER_PREFIX = "LitServer-"  # LitServe's name for its uvicorn processes
DRAIN_MESSAGE = "the server is shutting down; send the request again (to another instance)"


class Drain:
    """Shared by the main process and the API servers it forks: whether to refuse, and how many are in flight."""

    def __init__(self):
        self.draining = multiprocessing.Event()
        self.in_flight = multiprocessing.Value("i", 0)

    def wait_for_in_flight(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.in_flight.value > 0 and time.monotonic() < deadline:
            time.sleep(0.05)


class DrainGate:
    """ASGI middleware: counts the /v1 requests in flight until their last byte is sent; once draining, answers
    new ones 503 in OpenAI's error shape at once, and /health 503 too, so a load balancer stops sending here."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/health" and self.drain.draining.is_set():
            return await answer_503(send, b"draining", b"text/plain")
        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.drain.draining.is_set():
            body = json.dumps({"error": {"message": DRAIN_MESSAGE, "type": "server_error", "param": None, "code": None}})
            return await answer_503(send, body.encode(), b"application/json")
        with self.drain.in_flight.get_lock():
            self.drain.in_flight.value += 1
        try:
            await self.app(scope, receive, send)
        finally:
            with self.drain.in_flight.get_lock():
                self.drain.in_flight.value -= 1


async def answer_503(send, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", content_type), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def run_until_stopped(server, drain: Drain, **run_options) -> None:
    """LitServer.run, stopped by SIGTERM (a drain), Ctrl+C, or the death of one of its processes (exit 1)."""
    stopping = threading.Event()
    drain_on_sigterm(server, stopping, drain)
    exit_when_a_process_dies(stopping)
    try:
        server.run(**run_options)
    except KeyboardInterrupt:  # a SIGTERM during start-up: nothing was in flight
        pass
    except Exception as error:  # noqa: BLE001 - LitServe broke under us (its manager died): the same one line
        if not stopping.is_set():
            stop_everything(f"serve stopped: LitServe failed with {type(error).__name__} (a process of it died?)")
        raise
    finally:
        stopping.set()


def stop_everything(reason: str) -> None:
    """One line, every child process killed, exit 1: what a supervisor needs to start the server again."""
    print(f"error: {reason}; stopping the server so that it can be restarted", file=sys.stderr, flush=True)
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(1)


def exit_when_a_process_dies(stopping: threading.Event, interval: float = 0.2) -> None:
    """If an API server, the inference worker or LitServe's manager dies while serving, stop everything and exit
    1 with one line, so a supervisor restarts the server: never a port that accepts connections no one answers."""
    seen = {}

    def watch():
        while not stopping.wait(interval):
            seen.update({child.pid: child for child in multiprocessing.active_children()})
            dead = next((child for child in seen.values() if child.exitcode is not None), None)
            # a Ctrl+C reaches the whole process group at once: give the main process's handler time to say so
            if dead is not None and not stopping.wait(0.5):
                stop_everything(f"serve's process {dead.name} (pid {dead.pid}) died with exit code {dead.exitcode}")

    threading.Thread(target=watch, name="serve-watchdog", daemon=True).start()


def drain_on_sigterm(server, stopping: threading.Event, drain: Drain) -> None:
    """On SIGTERM: new requests are answered 503 while those in flight finish (up to LitServe's graceful
    timeout), then the API servers stop and LitServe shuts down as for Ctrl+C."""
    main_pid = os.getpid()

    def handle(signum, frame):
        if os.getpid() != main_pid:  # a forked child (LitServe's manager) inherited this handler: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not interrupt the drain
        stopping.set()  # the processes that end from here on are meant to
        drain.draining.set()
        drain.wait_for_in_flight(server.uvicorn_graceful_timeout)
        api_servers = [child for child in multiprocessing.active_children() if child.name.startswith(API_SERVER_PREFIX)]
        for child in api_servers:
            child.terminate()
        for child in api_servers:
            child.join(timeout=server.uvicorn_graceful_timeout + 5)
        raise KeyboardInterrupt  # LitServer.run's own shutdown path: workers stopped, queues closed

    def interrupt(signum, frame):
        if os.getpid() == main_pid:
            stopping.set()  # Ctrl+C: LitServe stops its processes, which the watchdog must not take for a failure
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, interrupt)
