"""Throwaway RabbitMQ nodes for fault and TLS tests (a helper module; it holds no tests).

Every node started here is private to the calling test: its own node name
(``fedq-<tag>-<pid>-<n>@localhost``), AMQP port, Erlang distribution port, CLI distribution port range, data
and log directories, config file, enabled plugins file and Erlang cookie (``$HOME/.erlang.cookie`` with
``HOME`` pointing into the node's temporary directory), so it never touches the machine's main broker
(``rabbit@localhost``) nor another engineer's nodes. The server scripts are run directly from
``/usr/lib/rabbitmq/bin`` as the current user (not through the ``/usr/sbin`` wrappers, which switch to the
``rabbitmq`` user and its cookie).

Each node is started in its own process group; ``Node.kill()`` sends SIGKILL to that group only, and every
waiting loop is bounded. ``Node``/``Cluster`` are context managers and also register an ``atexit`` hook, so
what was started is killed even when a test fails or is interrupted.

    with single_node("tls", extra_conf=...) as node:     # one node with extra rabbitmq.conf lines
        node.url                                       # amqp://guest:guest@127.0.0.1:PORT/%2F
    with Cluster("c", size=3) as cluster:                # three nodes joined with rabbitmqctl join_cluster
        cluster.nodes[1].kill()                          # SIGKILL the beam of one member
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

RABBITMQ_BIN = Path(os.environ.get("FEDQ_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
START_TIMEOUT = float(os.environ.get("FEDQ_TEST_BROKER_START_TIMEOUT", "120"))
CTL_TIMEOUT = 90.0

_live: set[Node] = set()
_live_lock = threading.Lock()
_reserved_ports: set[int] = set()


def available() -> str | None:
    """None when throwaway nodes can be started here, else the reason why not (for ``pytest.skip``)."""
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if not (RABBITMQ_BIN / tool).exists():
            return f"{RABBITMQ_BIN / tool} not found"
    if shutil.which("epmd") is None and not Path("/usr/lib/erlang/bin/epmd").exists():
        return "epmd not found"
    return None


def free_port() -> int:
    """A currently free loopback TCP port below 50000 (Erlang adds nothing to it; CLI ranges are set
    explicitly)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _reserved_ports and port < 65000:
            _reserved_ports.add(port)
            return port
    raise RuntimeError("no free port")


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process of group ``pgid`` remains."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


class BrokerError(RuntimeError):
    pass


class Node:
    """One throwaway RabbitMQ node. ``start()`` returns once its AMQP listener accepts connections."""

    def __init__(
        self,
        name: str,
        base: Path,
        *,
        amqp_port: int | None = None,
        extra_conf: str = "",
        plugins: tuple[str, ...] = (),
        cookie: str | None = None,
        memory_watermark_bytes: int | None = None,
        tcp: bool = True,
        ready_port: int | None = None,
    ) -> None:
        self.short = name
        self.nodename = f"{name}@localhost"
        self.base = base
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.amqp_port = amqp_port or free_port()
        self.dist_port = free_port()
        self.ctl_port_min = (
            free_port()
        )  # the CLI picks a port in [min, min+10]; collisions are retried by erl
        self.management_port = free_port() if "rabbitmq_management" in plugins else None
        self.plugins = plugins
        self.extra_conf = extra_conf
        self.memory_watermark_bytes = memory_watermark_bytes
        self.tcp = tcp
        self.ready_port = ready_port or self.amqp_port  # the port whose listener means "booted"
        self.cookie = cookie or os.urandom(16).hex().upper()
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_files()

    # -- files and environment -------------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        return self.base / "home"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    def _write_files(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie_file = self.home / ".erlang.cookie"
        if not cookie_file.exists():
            cookie_file.write_text(self.cookie)
            cookie_file.chmod(0o400)
        else:
            self.cookie = cookie_file.read_text().strip()
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}" if self.tcp else "listeners.tcp = none",
            "loopback_users.guest = true",
            "log.console = false",
            "log.file.level = info",
            # a cluster member that loses its peers keeps serving what it can (we kill one of three on
            # purpose)
            "cluster_partition_handling = ignore",
            "collect_statistics_interval = 5000",
        ]
        if self.memory_watermark_bytes:
            lines.append(f"vm_memory_high_watermark.absolute = {self.memory_watermark_bytes}")
        if self.management_port:
            lines.append(f"management.tcp.port = {self.management_port}")
            lines.append("management.tcp.ip = 127.0.0.1")
        conf = "\n".join(lines) + "\n" + self.extra_conf.strip() + "\n"
        (self.dir / "rabbitmq.conf").write_text(conf)
        (self.dir / "enabled_plugins").write_text("[" + ",".join(self.plugins) + "].\n")
        # an empty env file: the machine's /etc/rabbitmq/rabbitmq-env.conf names the main broker's node
        (self.dir / "rabbitmq-env.conf").write_text("")

    def env(self, *, for_server: bool = False) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("NODENAME", "CONFIG_FILE")
        }
        env.update(
            HOME=str(self.home),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_CTL_DIST_PORT_MIN=str(self.ctl_port_min),
            RABBITMQ_CTL_DIST_PORT_MAX=str(self.ctl_port_min),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        if for_server:
            env.update(
                RABBITMQ_DIST_PORT=str(self.dist_port),
                RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
                RABBITMQ_LOG_BASE=str(self.log_dir),
                RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
                RABBITMQ_PID_FILE=str(self.dir / "rabbit.pid"),
                # keep the nodes light on a shared 2-core machine
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                    "+S 2:2 +A 8 -kernel inet_dist_use_interface {127,0,0,1} "
                    f"-kernel inet_dist_listen_min {self.dist_port} "
                    f"-kernel inet_dist_listen_max {self.dist_port}"
                ),
            )
        return env

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    # -- lifecycle
    # ----------------------------------------------------------------------------------------------

    def launch(self) -> None:
        """Start the node's process (returns at once; see ``wait_ready``)."""
        if self.proc is not None and self.proc.poll() is None:
            raise BrokerError(f"{self.nodename} already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.dir / "server.out", "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self.env(for_server=True),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        with _live_lock:
            _live.add(self)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait (bounded) until the AMQP listener accepts connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerError(f"{self.nodename} exited with {self.proc.returncode}\n{self.log_tail()}")
            if port_open(self.ready_port):
                return
            time.sleep(0.2)
        raise BrokerError(f"{self.nodename} not ready after {timeout:.0f}s\n{self.log_tail()}")

    def wait_down(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not port_open(self.ready_port):
                return
            time.sleep(0.2)
        raise BrokerError(f"{self.nodename}: AMQP port still open after {timeout:.0f}s")

    def start(self, timeout: float = START_TIMEOUT) -> Node:
        self.launch()
        self.wait_ready(timeout)
        return self

    def ctl(
        self, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True, tool: str = "rabbitmqctl"
    ) -> str:
        """Run a RabbitMQ CLI command against this node; return its stdout."""
        cmd = [str(RABBITMQ_BIN / tool), "-n", self.nodename, *args]
        try:
            res = subprocess.run(cmd, env=self.env(), capture_output=True, timeout=timeout, cwd=self.dir)
        except subprocess.TimeoutExpired as e:
            raise BrokerError(f"{' '.join(cmd)} timed out after {timeout}s") from e
        if check and res.returncode != 0:
            raise BrokerError(
                f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout.decode()}\n{res.stderr.decode()}"
            )
        return res.stdout.decode()

    def stop_app(self) -> None:
        self.ctl("stop_app")
        self.wait_down()

    def start_app(self, timeout: float = START_TIMEOUT) -> None:
        self.ctl("start_app", timeout=timeout)
        self.wait_ready(timeout)

    def status(self) -> dict:
        return json.loads(self.ctl("status", "--formatter", "json"))

    def memory(self) -> tuple[int, int]:
        """(memory in use, high watermark) of the node in bytes, as ``rabbitmqctl status`` reports them."""
        st = self.status()
        total = st.get("memory", {}).get("total", {})
        # the broker compares its RSS with the watermark (vm_memory_calculation_strategy = rss)
        used = int(total.get(st.get("vm_memory_calculation_strategy", "rss"), 0) or max(total.values()))
        return used, int(st["vm_memory_high_watermark_limit"])

    def alarms(self) -> list:
        return list(self.status().get("alarms", []))

    @property
    def beam_pid(self) -> int | None:
        """The Erlang VM's pid (the server script execs into it, so this is the launched process)."""
        pid_file = self.dir / "rabbit.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError):
                return int(pid_file.read_text().strip())
        return self.proc.pid if self.proc else None

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL the node's process group (the launcher script, beam and its helpers; epmd is not in it) and
        wait (bounded) until none of them is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the launcher leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with _live_lock:
            _live.discard(self)

    def stop(self, graceful: bool = False) -> None:
        """Stop the node: ``rabbitmqctl stop`` when ``graceful``, then SIGKILL whatever is left."""
        if self.proc is None:
            return
        if graceful and self.proc.poll() is None:
            with contextlib.suppress(BrokerError):
                self.ctl("stop", timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        self.kill()

    def log_tail(self, n: int = 40) -> str:
        parts = []
        for f in [self.dir / "server.out", *sorted(self.log_dir.glob("*.log"))]:
            with contextlib.suppress(OSError):
                lines = f.read_text(errors="replace").splitlines()[-n:]
                parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __hash__(self) -> int:
        return id(self)


def _make_base(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"fedq-{tag}-"))


def _node_name(tag: str, i: int) -> str:
    return f"fedq-{tag}-{os.getpid()}-{i}"


@contextlib.contextmanager
def single_node(
    tag: str = "n",
    *,
    extra_conf: str = "",
    plugins: tuple[str, ...] = (),
    memory_watermark_bytes: int | None = None,
    tcp: bool = True,
    ready_port: int | None = None,
    base: Path | None = None,
    keep_dir: bool = False,
) -> Iterator[Node]:
    """A started throwaway node; killed and its directory removed on exit.

    ``extra_conf`` is appended to the generated rabbitmq.conf (e.g. a TLS listener); with ``tcp=False`` the
    node has no plain AMQP listener and ``ready_port`` (e.g. the TLS port) tells when it has booted.
    """
    own_base = base is None
    base = base or _make_base(tag)
    node = Node(
        _node_name(tag, 1),
        base,
        extra_conf=extra_conf,
        plugins=plugins,
        memory_watermark_bytes=memory_watermark_bytes,
        tcp=tcp,
        ready_port=ready_port,
    )
    try:
        node.start()
        yield node
    finally:
        node.stop()
        if own_base and not keep_dir:
            shutil.rmtree(base, ignore_errors=True)


class Cluster:
    """``size`` throwaway nodes joined into one cluster with ``rabbitmqctl
    stop_app/join_cluster/start_app``."""

    def __init__(
        self, tag: str = "c", size: int = 3, *, extra_conf: str = "", keep_dir: bool = False
    ) -> None:
        self.base = _make_base(tag)
        self.keep_dir = keep_dir
        self.nodes = [Node(_node_name(tag, i + 1), self.base, extra_conf=extra_conf) for i in range(size)]
        self.start_seconds: float | None = None

    def start(self) -> Cluster:
        t0 = time.monotonic()
        try:
            for n in self.nodes:  # boot in parallel, join one after another
                n.launch()
            for n in self.nodes:
                n.wait_ready()
            seed = self.nodes[0]
            for n in self.nodes[1:]:
                n.ctl("stop_app")
                n.ctl("join_cluster", seed.nodename)
                n.start_app()
            self.wait_members(len(self.nodes))
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def running_members(self, via: Node | None = None) -> list[str]:
        via = via or next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)
        st = json.loads(via.ctl("cluster_status", "--formatter", "json"))
        return list(st.get("running_nodes", []))

    def wait_members(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        members: list[str] = []
        while time.monotonic() < deadline:
            members = self.running_members()
            if len(members) >= count:
                return
            time.sleep(1)
        raise BrokerError(f"cluster has {members}, wanted {count} running nodes")

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        if not self.keep_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_certs(directory: Path, *, rogue: bool = True) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate it signed (CN
    ``fedq-client``); with ``rogue``, also a second, untrusted CA and a client certificate from it.

    Returns paths: ca, server_cert, server_key, client_cert, client_key[, rogue_ca, rogue_cert, rogue_key].
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        res = subprocess.run(["openssl", *args], cwd=d, capture_output=True, timeout=60)
        if res.returncode != 0:
            raise BrokerError(f"openssl {' '.join(args)}: {res.stderr.decode()}")

    def ca(name: str) -> None:
        ssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )

    def leaf(name: str, cn: str, ca_name: str, ext: str) -> None:
        (d / f"{name}.ext").write_text(ext)
        ssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        ssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{ca_name}.pem",
            "-CAkey",
            f"{ca_name}.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
            "-extfile",
            f"{name}.ext",
        )

    ca("ca")
    leaf(
        "server",
        "localhost",
        "ca",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    leaf("client", "fedq-client", "ca", "extendedKeyUsage=clientAuth\n")
    out = {
        "ca": d / "ca.pem",
        "server_cert": d / "server.pem",
        "server_key": d / "server.key",
        "client_cert": d / "client.pem",
        "client_key": d / "client.key",
    }
    if rogue:
        ca("rogue-ca")
        leaf("rogue", "fedq-client", "rogue-ca", "extendedKeyUsage=clientAuth\n")
        out.update(rogue_ca=d / "rogue-ca.pem", rogue_cert=d / "rogue.pem", rogue_key=d / "rogue.key")
    for p in d.glob("*.key"):
        p.chmod(0o644)  # readable by the broker whatever user it runs as (throwaway keys)
    return out


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        nodes = list(_live)
    for n in nodes:
        with contextlib.suppress(Exception):
            n.kill()
