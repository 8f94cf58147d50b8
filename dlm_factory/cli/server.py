"""``factory server start|stop|status``: a real local Prefect stack for the UI path (``make server``/``make stop``).

``start`` launches, on 127.0.0.1 only, a Prefect server (UI and API, SQLite under
``$FACTORY_HOME/prefect``), creates the ``local`` process work pool, starts a worker on
it, deploys ``prefect.yaml``'s ``local`` deployments and prints the UI address. The
processes' pids go to ``$FACTORY_HOME/server/pids.json``; ``stop`` ends exactly those
(by pid, after checking each is still the process it started) and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dlm_factory.home import factory_home

POOL = "local"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="start/stop a local Prefect server, worker and deployments (the UI path)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=4200, help="API/UI port on 127.0.0.1 (default: 4200)")
    p.add_argument("--no-deploy", action="store_true", help="start server and worker only")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for the server to answer")
    p.set_defaults(func=_server)


def _state_file() -> Path:
    return factory_home() / "server" / "pids.json"


def _env(port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(factory_home(create=True) / "prefect"))
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    env["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
    env["PREFECT_SERVER_API_PORT"] = str(port)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network beyond the object store
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dlm_factory")
    return env


def _prefect() -> str:
    return str(Path(sys.executable).parent / "prefect")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:  # noqa: S310 - loopback
            return r.status == 200
    except OSError:
        return False


def _alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` still runs the process we started (its command line contains ``marker``)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def start(port: int, deploy: bool, timeout: float) -> dict:
    from dlm_factory.dlm.errors import FactoryError

    state = _state_file()
    if state.is_file() and any(_alive(p["pid"], p["marker"]) for p in json.loads(state.read_text())["processes"]):
        raise FactoryError(f"a server started by this FACTORY_HOME is running ({state}); `factory server stop` first")
    if _healthy(port):
        raise FactoryError(f"something already answers on 127.0.0.1:{port}; choose another --port")
    env = _env(port)
    logs = state.parent
    logs.mkdir(parents=True, exist_ok=True)
    procs = []

    def spawn(name: str, args: list[str], marker: str) -> None:
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append({"name": name, "pid": proc.pid, "marker": marker})
        state.write_text(json.dumps({"port": port, "processes": procs}, indent=2))

    spawn("server", [_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)], "server start")
    deadline = time.monotonic() + timeout
    while not _healthy(port):
        if time.monotonic() > deadline:
            stop()
            raise FactoryError(f"the Prefect server did not answer within {timeout:.0f} s (see {logs}/server.log)")
        time.sleep(1)
    subprocess.run([_prefect(), "work-pool", "create", POOL, "--type", "process", "--overwrite"], env=env,
                   check=True, capture_output=True, timeout=120)
    spawn("worker", [_prefect(), "worker", "start", "--pool", POOL, "--type", "process"], "worker start")
    if deploy:
        root = Path(__file__).resolve().parents[2]
        subprocess.run([_prefect(), "--no-prompt", "deploy", "--name", POOL], env=env, cwd=root, check=True,
                       capture_output=True, timeout=300)
    return {"ui": f"http://127.0.0.1:{port}", "api": env["PREFECT_API_URL"], "pool": POOL, "state": str(state)}


def stop() -> list[str]:
    """End the processes this FACTORY_HOME started (worker first), by pid; returns their names."""
    state = _state_file()
    if not state.is_file():
        return []
    stopped = []
    for p in reversed(json.loads(state.read_text())["processes"]):
        if _alive(p["pid"], p["marker"]):
            os.killpg(p["pid"], signal.SIGTERM)  # the process group: prefect server's own children too
            for _ in range(50):
                if not _alive(p["pid"], p["marker"]):
                    break
                time.sleep(0.2)
            else:
                os.killpg(p["pid"], signal.SIGKILL)
            stopped.append(p["name"])
    state.unlink()
    return stopped


def _server(args) -> int:
    if args.action == "start":
        info = start(args.port, not args.no_deploy, args.timeout)
        print(f"Prefect UI: {info['ui']}  (API {info['api']}; work pool '{info['pool']}'; stop: factory server stop)")
    elif args.action == "stop":
        print("stopped: " + (", ".join(stop()) or "nothing was running"))
    else:
        state = _state_file()
        if not state.is_file():
            print("not running")
            return 0
        data = json.loads(state.read_text())
        for p in data["processes"]:
            print(f"{p['name']}: pid {p['pid']} {'running' if _alive(p['pid'], p['marker']) else 'gone'}")
        print(f"API healthy on 127.0.0.1:{data['port']}: {_healthy(data['port'])}")
    return 0
