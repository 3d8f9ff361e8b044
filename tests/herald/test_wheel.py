"""The wheel is the library, and the library works installed from it alone.

The wheel is built from a copy of the working tree (so the build leaves nothing in the checkout),
then installed with ``--no-deps`` into a fresh venv that holds only the locked runtime
dependencies (``requirements/runtime.lock``). Everything after that runs with the repository off
``sys.path``: a process in that venv, in a temporary directory, with ``PYTHONPATH`` naming only a
directory that holds a small domain that is not the chat (``shop.py``). ``herald serve --domain
shop:orders``, the console script of the wheel, serves it as a real process, and the test takes
the path a client takes: ``POST`` → ``202`` → the operation's SSE stream → ``303`` to the order.

The wheel and the venv are built once per session (pip's cache makes the venv quick after the
first run on a machine). A quick test first checks that the locks still match pyproject.toml, since
``scripts/bootstrap`` installs the lock and then Herald with ``--no-deps``: a dependency added to
pyproject.toml but not locked would be missing from every venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from herald.version import __version__
from tests.support.server import ROOT, free_port
from tests.support.sse import sse_connect

slow = pytest.mark.slow
e2e = pytest.mark.e2e
installing = pytest.mark.timeout(900)  # the first run on a machine downloads the locked packages

# Timeouts
BUILD_TIMEOUT = 300.0
INSTALL_TIMEOUT = 600.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
STREAM_TIMEOUT = 10.0

# What the working tree holds that is no input of a build: caches, venvs, earlier builds.
NOT_SOURCE = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist", "test-artifacts")

SHOP = '''
from starlette.responses import JSONResponse

from herald import Context, Domain, Gateway, HTTPProblem

ORDER = {"type": "object", "required": ["item", "qty"],
         "properties": {"item": {"type": "string", "minLength": 1}, "qty": {"type": "integer", "minimum": 1}}}

orders = Domain("orders")


@orders.command("POST", "/orders", event="OrderPlaced", schema=ORDER)
def place(params: dict, body: dict) -> dict:
    return {"item": body["item"], "qty": body["qty"]}


@orders.handler("OrderPlaced")
async def confirm(ctx: Context) -> None:
    order = {"id": ctx.operation_id, **ctx.data}
    await ctx.put_resource(f"/orders/{ctx.operation_id}", order, ttl=3600)
    ctx.stage("OrderConfirmed", order, topics=[f"orders/{ctx.operation_id}"])
    await ctx.succeed(order, location=f"/orders/{ctx.operation_id}")


@orders.route("GET", "/orders/{id}")
async def read(request):
    order = await Gateway.of(request).resource(f"/orders/{request.path_params['id']}")
    if order is None:
        raise HTTPProblem(404, "no such order", kind="order-not-found")
    return JSONResponse(order)


orders.topic("orders/{id}", subscribe="token")
orders.event("OrderConfirmed", schema=ORDER)
'''


def _pins(lock: Path) -> dict[str, Version]:
    """``{name: version}`` of every package a lock pins."""
    pins: dict[str, Version] = {}
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            requirement = Requirement(line.rstrip(" \\"))
            (pin,) = requirement.specifier
            pins[canonicalize_name(requirement.name)] = Version(pin.version)
    return pins


def test_the_locks_pin_every_declared_dependency_within_its_bounds() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime_lock, test_lock = _pins(ROOT / "requirements" / "runtime.lock"), _pins(ROOT / "requirements" / "test.lock")
    runtime = [Requirement(r) for r in project["dependencies"]]
    extras = [Requirement(r) for extra in ("test", "bench") for r in project["optional-dependencies"][extra]]
    for lock, declared in ((runtime_lock, runtime), (test_lock, runtime + extras)):
        for requirement in declared:
            name = canonicalize_name(requirement.name)
            if name == "herald-gateway":
                continue  # the test extra naming the bench extra
            assert name in lock, f"{requirement} is not locked: run scripts/lock"
            assert requirement.specifier.contains(lock[name], prereleases=True), (
                f"the lock pins {name}=={lock[name]}, outside {requirement}: run scripts/lock")
    # a deployment installs the releases the tests ran on
    assert runtime_lock.items() <= test_lock.items(), set(runtime_lock.items()) - set(test_lock.items())


@dataclass(frozen=True)
class Installed:
    """The wheel, and the fresh venv it is installed in."""

    wheel: Path
    venv: Path

    @property
    def bin(self) -> Path:
        """The venv's scripts directory."""
        return self.venv / "bin"

    def site_packages(self) -> Path:
        """The venv's ``site-packages``."""
        (found,) = self.venv.glob("lib/python*/site-packages")
        return found


def _clean_env(extra: Mapping[str, str] | None = None, *, path: str = "/usr/local/bin:/usr/bin:/bin") -> dict[str, str]:
    """The environment without anything that points into the repository or configures Herald."""
    env = {
        k: v for k, v in os.environ.items()
        if str(ROOT) not in v and k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "REDIS_URL"}
        and not k.startswith("HERALD_")
    }
    env["PATH"] = path
    env.update(extra or {})
    return env


def _run(command: list[str | Path], *, timeout: float, cwd: Path, env: Mapping[str, str]
         ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env, check=False)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from a copy of the tree; install it and the locked runtime deps into a fresh venv."""
    base = tmp_path_factory.mktemp("wheel")
    source, dist, venv = base / "source", base / "dist", base / "venv"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    env = _clean_env(path=os.environ.get("PATH", "/usr/bin:/bin"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source],
         timeout=BUILD_TIMEOUT, cwd=base, env=env)
    (wheel,) = dist.glob("herald_gateway-*.whl")
    _run([sys.executable, "-m", "venv", venv], timeout=INSTALL_TIMEOUT, cwd=base, env=env)
    pip: list[str | Path] = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    _run([*pip, "--require-hashes", "-r", ROOT / "requirements" / "runtime.lock"],
         timeout=INSTALL_TIMEOUT, cwd=base, env=env)
    _run([*pip, "--no-deps", wheel], timeout=INSTALL_TIMEOUT, cwd=base, env=env)
    return Installed(wheel, venv)


@slow
@installing
def test_the_wheel_holds_the_library_its_data_licence_and_script(installed: Installed) -> None:
    assert installed.wheel.name.startswith(f"herald_gateway-{__version__}-")
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        dist_info = f"herald_gateway-{__version__}.dist-info"
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert {"herald/__init__.py", "herald/static/herald.js", "herald/py.typed"} <= names
    assert {f"{dist_info}/licenses/LICENSE", f"{dist_info}/LICENSE"} & names, sorted(names)
    assert "[console_scripts]\nherald = herald.cli:main" in entry_points
    assert {name.split("/")[0] for name in names} == {"herald", dist_info}  # no app/, tests/, bench/
    assert "Name: herald-gateway\n" in metadata
    assert "License-Expression: MIT\n" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    runtime = [line for line in requires if "extra ==" not in line]
    assert not [line for line in runtime if "sse-starlette" in line or "pytest" in line], runtime


@slow
@installing
def test_the_installed_herald_is_the_venvs_and_brings_no_app_package(installed: Installed, tmp_path: Path) -> None:
    probe = ("import herald, importlib.util, sys; print(herald.__file__); "
             "print(importlib.util.find_spec('app') is None); print(herald.__version__)")
    done = _run([installed.bin / "python", "-c", probe], timeout=60, cwd=tmp_path, env=_clean_env())
    location, no_app, version = done.stdout.split()
    assert Path(location).is_relative_to(installed.site_packages()), location
    assert not Path(location).is_relative_to(ROOT)
    assert no_app == "True"
    assert version == __version__


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"herald serve exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no /healthz within {START_TIMEOUT}s:\n{log.read_text(errors='replace')}")


@pytest.fixture
def shop(installed: Installed, tmp_path: Path) -> Iterator[str]:
    """``herald serve --domain shop:orders`` from the installed wheel, on a free port; its base URL."""
    domain_dir, workdir = tmp_path / "domain", tmp_path / "run"
    domain_dir.mkdir()
    workdir.mkdir()
    (domain_dir / "shop.py").write_text(textwrap.dedent(SHOP))
    port = free_port()
    command = [str(installed.bin / "herald"), "serve", "--domain", "shop:orders",
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    env = _clean_env({"PYTHONPATH": str(domain_dir)}, path=f"{installed.bin}:/usr/local/bin:/usr/bin:/bin")
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


@slow
@e2e
@installing
async def test_herald_serve_from_the_wheel_accepts_pushes_and_redirects(installed: Installed, shop: str) -> None:
    async with httpx.AsyncClient(base_url=shop, timeout=5.0) as client:
        refused = await client.post("/orders", json={"item": "tea", "qty": 0})
        assert refused.status_code == 422, refused.text

        accepted = await client.post("/orders", json={"item": "tea", "qty": 2})
        assert accepted.status_code == 202, accepted.text
        op = accepted.json()
        assert op["status"] == "pending"
        assert accepted.headers["location"] == op["operation_url"] == f"/operations/{op['id']}"

        async with sse_connect(client, op["subscribe_url"], timeout=STREAM_TIMEOUT) as stream:
            assert stream.response.status_code == 200
            blocks = await stream.until_end(timeout=STREAM_TIMEOUT)
        events = [block.json() for block in blocks if block.is_message]
        order = {"id": op["id"], "item": "tea", "qty": 2}
        assert [e["type"] for e in events][-2:] == ["OrderConfirmed", "herald.operation.succeeded"], events
        assert events[-2]["data"] == order
        assert {e["correlationid"] for e in events} == {op["id"]}

        redirect = await client.get(op["operation_url"])
        assert redirect.status_code == 303, redirect.text
        assert redirect.headers["location"] == f"/orders/{op['id']}"
        read = await client.get(redirect.headers["location"])
        assert read.status_code == 200, read.text
        assert read.json() == order

        script = await client.get("/herald.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        assert script.content == (installed.site_packages() / "herald" / "static" / "herald.js").read_bytes()

        asyncapi = (await client.get("/asyncapi.json")).json()
        assert asyncapi["asyncapi"].startswith("3.")
        assert "OrderConfirmed" in {m["name"] for m in asyncapi["components"]["messages"].values()}
