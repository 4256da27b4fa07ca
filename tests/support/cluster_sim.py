"""A simulated cluster on one Linux machine: network namespaces as hosts, each with its own sshd.

    with SimCluster(2) as cluster:                       # nodes 10.231.0.2 and 10.231.0.3
        cluster.write_hostfile(path, slots=[1, 1])       # "10.231.0.2 slots=1" ...
        proc = cluster.nodes[0].popen(["./launch.sh", "run", ...], env={**os.environ, **cluster.ssh_env()})
        cluster.nodes[1].kill_all()                       # the node is lost (every process, sshd included)
        cluster.nodes[1].cut() / .restore()               # or its link goes down and comes back
        cluster.nodes[1].start_sshd()                     # the node returns

What each simulated node is:
- a network namespace `dpt<id>n<i>` with loopback up and one interface `eth0` (10.231.0.<i+2>/24), the end of a
  veth pair whose other end sits on a bridge in a switch namespace `dpt<id>sw`. Nothing is added to the root
  namespace, and the addresses exist only inside these namespaces, so traffic never leaves them;
- its own sshd (Debian's openssh-server) listening on that address, with a host key generated for the test,
  root login by key only, and one authorized key, also generated for the test, in a temporary directory;
- the machine's filesystem, shared, as cluster nodes share a network filesystem (the deepspeed launcher runs
  every remote rank in the launching directory).

ssh and pdsh reach the nodes through an ssh config file of the test (`ssh -F`): it names the test's key and
known_hosts file, so root's own ~/.ssh is neither read nor written. `ssh_env()` returns the variables that make
pdsh (PDSH_SSH_ARGS_APPEND) and launch.sh use it, and GLOO_SOCKET_IFNAME=eth0: every node shares this
machine's hostname, which resolves to 127.0.0.1, so gloo must be told which interface to bind (as on clusters
whose hostnames do not resolve to the cluster network).

Everything is created under a random id and removed on exit, even when the body raises: the processes of every
node (`ip netns pids`), the namespaces (their veths go with them), the temporary directory, and /run/sshd when
this harness created it. `WriteWatch(dir)` records which process (its RANK, its node) wrote which file under a
directory, through the kernel's fanotify, whatever wrote it (Python, torch's C++ writer, safetensors' Rust).
`missing()` says why a machine cannot host the simulation (not root, no ip / sshd /
pdsh / ssh / ssh-keygen, no namespace support); tests skip with that reason.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import select
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SUBNET = "10.231.0"
IFNAME = "eth0"
TOOLS = ("ip", "sshd", "ssh", "ssh-keygen", "pdsh", "unshare")


def _which(tool: str) -> str | None:
    # sshd lives in /usr/sbin, which a non-login PATH may lack
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def missing() -> str | None:
    """Why this machine cannot simulate a cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the simulated cluster needs root (network namespaces, sshd)"
    absent = [tool for tool in TOOLS if _which(tool) is None]
    if absent:
        return (
            f"the simulated cluster needs {', '.join(absent)} "
            "(Debian: apt-get install -y iproute2 openssh-server openssh-client pdsh util-linux)"
        )
    probe = f"dptprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if made.returncode != 0:
        return f"network namespaces unavailable: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


class Node:
    """One simulated host: a namespace, its address and its sshd."""

    def __init__(self, cluster: SimCluster, index: int):
        self.cluster = cluster
        self.index = index
        self.ns = f"{cluster.prefix}n{index}"
        self.addr = f"{SUBNET}.{index + 2}"
        self.veth = f"{cluster.prefix}v{index}"  # the switch's end of this node's cable
        self.dir = cluster.dir / f"node{index}"
        self.sshd: subprocess.Popen | None = None

    # --- running things "on" the node ------------------------------------------------------------------------
    def cmd(self, argv: list[str]) -> list[str]:
        """The command line that runs `argv` on this node (inside its network namespace)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, argv: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.cmd(argv), timeout=timeout, **kwargs)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(argv), **kwargs)

    def pids(self) -> list[int]:
        """Every process whose network namespace is this node's."""
        out = _ip("netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split() if p.strip().isdigit()]

    def kill_all(self, timeout: float = 10) -> list[int]:
        """SIGKILL every process of the node (the node is lost); returns the pids that were killed."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in self.pids() if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        if self.sshd is not None:
            try:
                self.sshd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.sshd = None
        return killed

    # --- the node's link ---------------------------------------------------------------------------------------
    def cut(self) -> None:
        """Unplug the node: its cable goes down at the switch (no FIN, no RST: packets simply vanish)."""
        _ip("-n", self.cluster.switch, "link", "set", self.veth, "down")

    def restore(self) -> None:
        _ip("-n", self.cluster.switch, "link", "set", self.veth, "up")

    # --- sshd -------------------------------------------------------------------------------------------------
    def start_sshd(self, timeout: float = 20, hide: list[Path] = ()) -> None:
        """Start (or restart after kill_all) the node's sshd and wait until a key login works.

        `hide`: directories this node does not share (an empty tmpfs covers each, in a mount namespace of the
        node's sshd and its sessions only), as on a node missing a network mount."""
        if self.sshd is not None and self.sshd.poll() is None:
            return
        sshd = [_which("sshd"), "-D", "-e", "-f", str(self.dir / "sshd_config")]
        if hide:
            mounts = " && ".join(f"mount -t tmpfs -o size=1m,mode=0700 dptsim {shlex.quote(str(d))}" for d in hide)
            sshd = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"{mounts} && exec {' '.join(shlex.quote(a) for a in sshd)}",
            ]
        log = open(self.dir / "sshd.log", "ab")
        try:
            self.sshd = self.popen(sshd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.sshd.poll() is not None:
                raise RuntimeError(
                    f"sshd of {self.ns} exited {self.sshd.returncode}: {(self.dir / 'sshd.log').read_text()[-2000:]}"
                )
            probe = self.cluster.ssh(self.cluster.nodes[0] if self.index else self, self, ["true"], timeout=10)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd of {self.ns} does not accept the test key: {probe.stderr.strip()}")
            time.sleep(0.2)

    def _configure(self) -> None:
        self.dir.mkdir()
        key = self.dir / "ssh_host_ed25519_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.ns, "-f", str(key)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        (self.dir / "sshd_config").write_text(
            "\n".join(
                [
                    f"ListenAddress {self.addr}",
                    "Port 22",
                    f"HostKey {key}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.cluster.dir / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",  # the key files live under /tmp (world-writable), which strict modes refuse
                    "PrintMotd no",
                    "X11Forwarding no",
                    "AllowTcpForwarding no",
                    # the deepspeed launcher passes its environment inside the remote command line (`export K=V; ...`),
                    # so sshd needs no AcceptEnv / PermitUserEnvironment
                    "PermitUserEnvironment no",
                    "MaxStartups 64:30:128",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )


class SimCluster:
    """A context manager creating `n` simulated nodes; see the module docstring."""

    def __init__(self, n: int = 2):
        if not 1 <= n <= 200:
            raise ValueError(f"1..200 nodes, got {n}")
        self.n = n
        self.prefix = f"dpt{secrets.token_hex(3)}"  # <= 15 characters for every interface name below
        self.switch = f"{self.prefix}sw"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.nodes = [Node(self, i) for i in range(n)]
        self._made_run_sshd = False
        self._namespaces: list[str] = []

    # --- lifecycle --------------------------------------------------------------------------------------------
    def __enter__(self) -> SimCluster:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        reason = missing()
        if reason:
            raise RuntimeError(reason)
        key = self.dir / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.prefix}-client", "-f", str(key)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        (self.dir / "authorized_keys").write_text((self.dir / "id_ed25519.pub").read_text())
        if not os.path.isdir("/run/sshd"):  # sshd's privilege-separation directory
            os.makedirs("/run/sshd", mode=0o755)
            self._made_run_sshd = True

        _ip("netns", "add", self.switch)
        self._namespaces.append(self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        known = []
        for node in self.nodes:
            node._configure()
            _ip("netns", "add", node.ns)
            self._namespaces.append(node.ns)
            _ip("-n", node.ns, "link", "set", "lo", "up")
            # the pair is born in the switch namespace: one end stays on the bridge, the other moves to the node
            _ip(
                "-n",
                self.switch,
                "link",
                "add",
                node.veth,
                "type",
                "veth",
                "peer",
                "name",
                f"{self.prefix}p{node.index}",
            )
            _ip("-n", self.switch, "link", "set", f"{self.prefix}p{node.index}", "netns", node.ns)
            _ip("-n", node.ns, "link", "set", f"{self.prefix}p{node.index}", "name", IFNAME)
            _ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", IFNAME)
            _ip("-n", node.ns, "link", "set", IFNAME, "up")
            _ip("-n", self.switch, "link", "set", node.veth, "master", "br0")
            _ip("-n", self.switch, "link", "set", node.veth, "up")
            host_key = (node.dir / "ssh_host_ed25519_key.pub").read_text().split()
            known.append(f"{node.addr} {host_key[0]} {host_key[1]}")
        (self.dir / "known_hosts").write_text("\n".join(known) + "\n")
        (self.dir / "ssh_config").write_text(
            "\n".join(
                [
                    f"Host {SUBNET}.*",
                    "  User root",
                    f"  IdentityFile {key}",
                    "  IdentitiesOnly yes",
                    f"  UserKnownHostsFile {self.dir / 'known_hosts'}",
                    "  GlobalKnownHostsFile /dev/null",
                    "  StrictHostKeyChecking yes",
                    "  BatchMode yes",
                    "  ConnectTimeout 5",
                    "  ServerAliveInterval 5",
                    "  ServerAliveCountMax 3",
                    "  LogLevel ERROR",
                    "Host *",  # anything else: refuse at once instead of trying root's own keys and config
                    "  BatchMode yes",
                    "  IdentitiesOnly yes",
                    "  IdentityFile /dev/null",
                    "  ConnectTimeout 5",
                    "",
                ]
            )
        )
        for node in self.nodes:
            node.start_sshd()

    def close(self) -> None:
        """Kill every node's processes, delete the namespaces and the temporary directory (idempotent)."""
        for node in self.nodes:
            if node.ns in self._namespaces:
                node.kill_all()
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns, check=False)
        self._namespaces.clear()
        if self._made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
            self._made_run_sshd = False
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- helpers for tests --------------------------------------------------------------------------------------
    def ssh_env(self) -> dict[str, str]:
        """Environment for launch.sh / pdsh on a node: the test's ssh config, gloo's interface."""
        return {"PDSH_SSH_ARGS_APPEND": f"-F {self.dir / 'ssh_config'}", "GLOO_SOCKET_IFNAME": IFNAME}

    def ssh(self, src: Node, dst: Node | str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """Run `argv` on `dst` over ssh from `src` (both simulated nodes)."""
        host = dst.addr if isinstance(dst, Node) else dst
        return src.run(["ssh", "-F", str(self.dir / "ssh_config"), host, "--", *argv], timeout=timeout)

    def write_hostfile(self, path: Path, slots: list[int], names: list[str] | None = None) -> Path:
        lines = [f"{names[i] if names else node.addr} slots={s}" for i, (node, s) in enumerate(zip(self.nodes, slots))]
        Path(path).write_text("\n".join(lines) + "\n")
        return Path(path)

    def namespaces(self) -> list[str]:
        return list(self._namespaces)


# ----------------------------------------------------------------------------------------------- who wrote what
_FAN_CLOEXEC, _FAN_NONBLOCK = 0x1, 0x2
_FAN_MARK_ADD, _FAN_MARK_REMOVE, _FAN_MARK_FILESYSTEM = 0x1, 0x2, 0x100
_FAN_CLOSE_WRITE, _FAN_Q_OVERFLOW = 0x8, 0x4000
_AT_FDCWD = -100
_EVENT = struct.Struct("IBBHQii")  # struct fanotify_event_metadata


class WriteWatch:
    """Every file closed after writing under `root` while the watch runs: (path relative to root, pid, RANK of the
    writing process or None, namespace of the node it ran in or None for the machine's own).

    fanotify watches the whole filesystem holding `root` (a mount mark would miss the nodes' processes, whose
    mount namespaces hold copies of the mounts); events outside `root` are dropped. Needs root.
    """

    def __init__(self, root: Path, nodes: list[Node] = ()):
        self.root = os.path.realpath(root) + os.sep
        self.namespaces = {f"net:[{os.stat(f'/run/netns/{n.ns}').st_ino}]": n.ns for n in nodes}
        self.writes: list[tuple[str, int, str | None, str | None]] = []
        self.overflow = False
        self._stop = threading.Event()
        self._fd = -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> WriteWatch:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.fanotify_init(_FAN_CLOEXEC | _FAN_NONBLOCK, os.O_RDONLY)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init")
        if (
            libc.fanotify_mark(
                self._fd,
                _FAN_MARK_ADD | _FAN_MARK_FILESYSTEM,
                ctypes.c_uint64(_FAN_CLOSE_WRITE),
                _AT_FDCWD,
                self.root.encode(),
            )
            != 0
        ):
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, "fanotify_mark")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)  # events of the last closes
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        os.close(self._fd)

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                if self._stop.is_set():
                    return
                continue
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            offset = 0
            while offset + _EVENT.size <= len(buf):
                length, _, _, _, mask, fd, pid = _EVENT.unpack_from(buf, offset)
                offset += length
                if mask & _FAN_Q_OVERFLOW:
                    self.overflow = True
                if fd < 0:
                    continue
                try:
                    path = os.readlink(f"/proc/self/fd/{fd}")
                finally:
                    os.close(fd)
                if not path.startswith(self.root):
                    continue
                self.writes.append((path[len(self.root) :], pid, *self._who(pid)))

    def _who(self, pid: int) -> tuple[str | None, str | None]:
        rank = ns = None
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), None)
            ns = self.namespaces.get(os.readlink(f"/proc/{pid}/ns/net"))
        except OSError:
            pass
        return rank, ns

    def by_rank(self) -> dict[str | None, set[str]]:
        out: dict[str | None, set[str]] = {}
        for path, _, rank, _ in self.writes:
            out.setdefault(rank, set()).add(path)
        return out
