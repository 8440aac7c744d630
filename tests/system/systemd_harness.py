"""Boot a real systemd as PID 1 of a throwaway PID + mount + cgroup namespace.

The system tests need the real service manager (Type=notify, the watchdog,
RestartPreventExitStatus=, KillMode=, the sandboxing) but this machine's PID 1 is
not systemd, and even where it is, tests must not install units on the host. So a
test module boots its own systemd (0.2-0.4 s here):

    unshare --pid --fork --kill-child --mount --propagation private --mount-proc
      └─ sh: join a fresh cgroup2 sub-cgroup, then `exec unshare --cgroup`
         └─ python <this file> --init SPEC   (still PID 1: every step execs)
              builds a private world (below), then execs /lib/systemd/systemd

What ``--init`` mounts before systemd starts, and why:

* ``/tmp``, ``/var/tmp``, ``/run``: fresh tmpfs. HAZARD seen on this machine:
  systemd's boot-time systemd-tmpfiles empties the shared ``/tmp``. Besides
  the private ``/tmp``, the unit search path holds no tmpfiles unit (they are
  masked there too) and only a minimal target is booted.
* ``/var/lib``, ``/var/cache``, ``/var/log``: tmpfs, so StateDirectory=,
  CacheDirectory= and systemd's own state never touch the host. The host reads
  them through ``/proc/PID1/root`` (:meth:`NamespacedSystemd.path`).
* ``/etc``: an overlay whose upper layer lives in the workspace. It gets a
  ``trainwarden`` system user in passwd/group (the shipped unit runs under its
  real User=), ``/etc/trainwarden/`` for job files at their real path, and a
  ``system.conf`` for the manager. The host's ``/etc`` is never written.
* ``/``: remounted read-only. This is a *bind* remount, a per-mount flag that
  only this namespace sees. Mount namespaces isolate mounts, not file contents,
  so this is what stops the namespaced systemd from writing to the host.
* ``/dev``: a tmpfs with the usual pseudo devices plus fake NVIDIA nodes
  (``/dev/nvidiactl`` c 195:255 ...) and one node no unit may open. Nothing
  drives those majors here, so opening an allowed node fails with ENXIO while
  one the device policy refuses fails with EPERM: that difference proves
  DevicePolicy=/DeviceAllow= without a GPU. ``/dev/console`` is a pty slave
  whose master is copied into ``systemd.log`` (see below).
* ``shared`` (pytest's base temp directory, which lives under the host's
  ``/tmp``) is bind-mounted back at the same path on top of the private ``/tmp``,
  so a test's ``tmp_path`` means the same inside and out. Units with
  PrivateTmp=yes do not see it; give them paths under ``/var/lib`` instead.
* cgroups. The host is cgroup v1, hybrid: v1 controllers plus an empty cgroup2
  at ``/sys/fs/cgroup/unified``. What works here: make a sub-cgroup of the
  host's cgroup2 hierarchy, move PID 1 into it, ``unshare --cgroup`` (so that
  sub-cgroup is ``/`` inside), and mount ``cgroup2`` on ``/sys/fs/cgroup``.
  systemd then runs in pure unified mode, as in an nspawn container, and never
  touches the host's v1 hierarchies (the machinery running these tests keeps
  its processes in a v1 memory cgroup; systemd in hybrid mode would move them
  out). Unified mode gives reliable cgroup-empty notifications and enforces
  DeviceAllow= with BPF programs on cgroup2, which works although the v1
  devices controller is bound elsewhere. No controllers are available in that
  cgroup2 (v1 owns them), so MemoryMax= and friends are not enforced; nothing
  here needs them. The ``systemd.unified_cgroup_hierarchy=`` switch does not
  matter: systemd only reads it when it mounts ``/sys/fs/cgroup`` itself.
* ``container=trainwarden-test`` in PID 1's environment: systemd behaves as in
  a container (loads no kernel modules, skips hardware setup, does not parse
  the host's kernel command line).

systemd runs with ``SYSTEMD_UNIT_PATH`` set to the workspace's unit directory
only, so it sees the stub targets written here and the units a test installs,
nothing from ``/lib/systemd/system``. There is no journald: systemd logs to
``/dev/console`` and ``DefaultStandardOutput=tty`` sends every service's output
there too. That console is a pty; a ``cat`` child copies its master into
``systemd.log`` (no thread in the test process); :meth:`log_tail` shows it.
The settings live in ``system.conf``, not argv, because daemon-reload re-reads
``system.conf`` and forgets command-line settings.

Talk to the manager with ``systemctl`` run inside its mount + PID namespaces via
``nsenter`` (:meth:`systemctl`): systemctl then finds ``/run/systemd/private``
(root uses the private socket; there is no D-Bus here).

Teardown SIGKILLs the namespace's PID 1 by its host PID, which makes the kernel
kill every process in the PID namespace, waits for it, then removes the
sub-cgroups. The outer ``unshare`` has ``--kill-child`` and a parent-death
signal, so even a SIGKILLed pytest takes the whole namespace with it.

Requires root, util-linux ``unshare``/``nsenter``, ``/lib/systemd/systemd``,
overlayfs and a cgroup2 mount on the host (pure v2 or hybrid).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tty
from collections.abc import Callable, Iterable
from pathlib import Path

SYSTEMD_BINARY = Path("/lib/systemd/systemd")
BOOT_TARGET = "trainwarden-test.target"
SERVICE_USER = "trainwarden"

# Fake NVIDIA nodes (major, minor). 195 is the NVIDIA driver's fixed major; the
# UVM major is dynamic, 235 stands in for it. Nothing drives them on this host.
FAKE_NVIDIA_NODES = {
    "nvidiactl": (195, 255),
    "nvidia0": (195, 0),
    "nvidia-modeset": (195, 254),
    "nvidia-uvm": (235, 0),
    "nvidia-uvm-tools": (235, 1),
}
# A node the device policy must refuse: 240 is a "local/experimental" major.
FORBIDDEN_NODE = ("not-allowed", (240, 0))

# Targets a service's default dependencies name (Requires=sysinit.target, ...).
# Empty stubs: the real ones pull in tmpfiles, udev, journald and the rest of a boot.
_STUB_TARGETS = (
    "sysinit.target",
    "basic.target",
    "shutdown.target",
    "network.target",
    "network-online.target",
    "multi-user.target",
    "sockets.target",
    "timers.target",
    "paths.target",
    "local-fs.target",
)
# Not in the unit path anyway; masked so adding a search path later cannot bring
# back the tmpfiles run that wipes /tmp.
_MASKED = (
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-setup-dev-early.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-journald.service",
    "systemd-journald.socket",
)
_SYSTEM_CONF = """[Manager]
LogTarget=console
LogColor=no
ShowStatus=no
DefaultStandardOutput=tty
DefaultStandardError=tty
"""

_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_PR_SET_PDEATHSIG = 1


class HarnessError(RuntimeError):
    """The namespaced systemd could not be booted or did not answer."""


def missing_capability() -> str | None:
    """Return what this machine lacks to boot a namespaced systemd, or None if nothing.

    Only facts of the machine count: a namespace that fails to start on a
    machine that has all of these is a test failure, not a reason to skip.
    """
    if os.geteuid() != 0:
        return "needs root: boots systemd in its own PID/mount/cgroup namespaces"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"util-linux `{tool}` is not installed"
    if not SYSTEMD_BINARY.exists():
        return f"{SYSTEMD_BINARY} is not installed"
    if _cgroup2_mount() is None:
        return "no cgroup2 hierarchy mounted on the host (see /proc/self/mountinfo)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs (needed for the namespace's /etc)"
    return None


def _cgroup2_mount() -> Path | None:
    """Return where the host's cgroup2 hierarchy is mounted (pure v2 or hybrid)."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return Path(fields[4])
    return None


class NamespacedSystemd:
    """One systemd booted as PID 1 of its own namespaces, owned by a test module."""

    def __init__(
        self, workspace: Path, *, shared: Path | None = None, fake_nvidia: bool = True
    ) -> None:
        """Prepare (not boot) a manager keeping its files in ``workspace``.

        ``shared`` (default: the workspace) is the host directory that stays
        visible at the same path inside, e.g. pytest's base temp directory so
        every test's ``tmp_path`` can be handed to a unit.
        """
        self.workspace = workspace.resolve()
        self.shared = (shared or workspace).resolve()
        if not self.workspace.is_relative_to(self.shared):
            raise ValueError(f"{workspace} must be inside {self.shared}")
        self.unit_dir = self.workspace / "units"
        self.log_path = self.workspace / "systemd.log"
        self.fake_nvidia = fake_nvidia
        self.service_uid = self.service_gid = _free_id()
        self.pid1: int | None = None
        self.cgroup: Path | None = None
        self.boot_seconds: float | None = None
        self._outer: subprocess.Popen[bytes] | None = None
        self._log_pump: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------- boot
    def boot(self, timeout: float = 30.0) -> None:
        """Start the namespace and wait until systemd has reached the boot target."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        self._write_unit_dir()
        cgroup_root = _cgroup2_mount()
        if cgroup_root is None:
            raise HarnessError("no cgroup2 hierarchy on the host")
        _remove_stale_cgroups(cgroup_root)
        # Directly under the cgroup2 root: on this host nothing else lives there,
        # on a pure-v2 host it keeps clear of the host systemd's slices.
        self.cgroup = cgroup_root / f"trainwarden-test-{os.getpid()}-{time.monotonic_ns()}"
        self.cgroup.mkdir()
        etc = self.workspace / "etc-overlay"
        (etc / "upper").mkdir(parents=True, exist_ok=True)
        (etc / "work").mkdir(parents=True, exist_ok=True)
        master, console = os.openpty()
        tty.setraw(console)
        spec = {
            "console_fd": console,
            "shared": str(self.shared),
            "unit_dir": str(self.unit_dir),
            "etc_upper": str(etc / "upper"),
            "etc_work": str(etc / "work"),
            "passwd_line": f"{SERVICE_USER}:x:{self.service_uid}:{self.service_gid}:"
            "trainwarden:/var/lib/trainwarden:/usr/sbin/nologin",
            "group_line": f"{SERVICE_USER}:x:{self.service_gid}:",
            "fake_nvidia": self.fake_nvidia,
        }
        spec_path = self.workspace / "init-spec.json"
        spec_path.write_text(json.dumps(spec))
        # The shell joins the sub-cgroup *before* `unshare --cgroup`, so that
        # cgroup becomes the namespace's root; the outer unshare stays outside.
        inner = (
            f'echo $$ > "{self.cgroup}/cgroup.procs" && '
            f'exec unshare --cgroup -- "{sys.executable}" "{Path(__file__).resolve()}" '
            f'--init "{spec_path}"'
        )
        started = time.monotonic()
        try:
            with open(self.log_path, "ab") as log:
                self._log_pump = subprocess.Popen(
                    ["cat"], stdin=master, stdout=log, stderr=subprocess.DEVNULL
                )
                self._outer = subprocess.Popen(
                    [
                        "unshare",
                        "--pid",
                        "--fork",
                        "--kill-child",
                        "--mount",
                        "--propagation",
                        "private",
                        "--mount-proc",
                        "--",
                        "/bin/sh",
                        "-c",
                        inner,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # The outer unshare keeps the console open until the namespace
                    # is gone; then cat reads EIO from the master and exits.
                    pass_fds=(console,),
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads of ours here
                )
            self.pid1 = self._find_pid1(timeout=10.0)
            self._wait_booted(started + timeout)
        except BaseException:
            self.shutdown()
            raise
        finally:
            os.close(master)
            os.close(console)
        self.boot_seconds = time.monotonic() - started

    def _find_pid1(self, timeout: float) -> int:
        """Return the host PID of the namespace's PID 1 (the outer unshare's child)."""
        assert self._outer is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in _all_pids():
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    if f"\nPPid:\t{self._outer.pid}\n" in status:
                        return pid
            if self._outer.poll() is not None:
                raise HarnessError(f"namespace exited early:\n{self.log_tail()}")
            time.sleep(0.01)
        raise HarnessError("the namespace's PID 1 never appeared")

    def _wait_booted(self, deadline: float) -> None:
        assert self._outer is not None
        while time.monotonic() < deadline:
            if self._outer.poll() is not None:
                raise HarnessError(f"systemd exited during boot:\n{self.log_tail()}")
            result = self.systemctl("is-active", BOOT_TARGET, check=False, timeout=5)
            if result.stdout.strip() == "active":
                return
            time.sleep(0.05)
        raise HarnessError(f"systemd did not reach {BOOT_TARGET}:\n{self.log_tail()}")

    def _write_unit_dir(self) -> None:
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        (self.unit_dir / BOOT_TARGET).write_text(
            "[Unit]\nDescription=trainwarden system-test boot target\n"
        )
        for name in _STUB_TARGETS:
            (self.unit_dir / name).write_text(f"[Unit]\nDescription=stub {name}\n")
        for name in _MASKED:
            link = self.unit_dir / name
            if not link.is_symlink():
                link.symlink_to("/dev/null")

    # ------------------------------------------------------------- commands
    def run(
        self, argv: list[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace's mount and PID namespaces."""
        if self.pid1 is None:
            raise HarnessError("not booted")
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-m", "-p", "--", *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"{argv} failed ({result.returncode}): {result.stderr.strip()}\n{self.log_tail()}"
            )
        return result

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run systemctl against the namespaced manager."""
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """Return ``systemctl show -p ...`` as a dict."""
        out = self.systemctl("show", unit, "-p", ",".join(properties)).stdout
        values: dict[str, str] = {}
        for line in out.splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values

    def path(self, inside: str | Path) -> Path:
        """Return the host path of ``inside`` (a path as the namespace sees it)."""
        if self.pid1 is None:
            raise HarnessError("not booted")
        return Path(f"/proc/{self.pid1}/root") / Path(inside).relative_to("/")

    def install(self, name: str, text: str) -> Path:
        """Write a unit file into the manager's only unit directory."""
        path = self.unit_dir / name
        path.write_text(text)
        return path

    def drop_in(self, unit: str, name: str, text: str) -> Path:
        """Write ``unit.d/name.conf``."""
        directory = self.unit_dir / f"{unit}.d"
        directory.mkdir(exist_ok=True)
        path = directory / f"{name}.conf"
        path.write_text(text)
        return path

    def daemon_reload(self) -> None:
        """Make the manager re-read the unit directory."""
        self.systemctl("daemon-reload")

    def wait_for(
        self,
        unit: str,
        predicate: Callable[[dict[str, str]], bool],
        *,
        timeout: float,
        properties: Iterable[str] = (
            "ActiveState",
            "SubState",
            "Result",
            "StatusText",
            "ExecMainStatus",
            "ExecMainCode",
            "NRestarts",
            "MainPID",
        ),
        interval: float = 0.1,
    ) -> dict[str, str]:
        """Poll ``systemctl show`` until ``predicate`` holds; fail with the last state."""
        props = tuple(properties)
        deadline = time.monotonic() + timeout
        state = self.show(unit, *props)
        while not predicate(state):
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{unit}: timed out after {timeout}s in {state}\n{self.log_tail()}"
                )
            time.sleep(interval)
            state = self.show(unit, *props)
        return state

    def host_pid(self, ns_pid: int) -> int:
        """Translate a PID seen inside the namespace (MainPID=) to the host's."""
        if self.pid1 is None:
            raise HarnessError("not booted")
        our_ns = os.readlink(f"/proc/{self.pid1}/ns/pid")
        for pid in _all_pids():
            with contextlib.suppress(OSError):
                nspid = next(
                    line.split()[1:]
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("NSpid:")
                )
                if int(nspid[-1]) == ns_pid and os.readlink(f"/proc/{pid}/ns/pid") == our_ns:
                    return pid
        raise HarnessError(f"no host process for namespace PID {ns_pid}")

    def log_tail(self, lines: int = 80) -> str:
        """Return the end of systemd's and the services' combined output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        # The console is a tty: systemd's lines end in \r\r\n; drop the empties.
        kept = [line for line in text.splitlines() if line.strip()]
        return "\n".join(kept[-lines:])

    # ------------------------------------------------------------- teardown
    def shutdown(self) -> None:
        """SIGKILL the namespace's PID 1 (killing every process in it) and clean up."""
        if self.pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
        for proc in (self._outer, self._log_pump):
            if proc is None:
                continue
            if self.pid1 is None:
                proc.kill()  # PID 1 never appeared: nothing else will end them
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.cgroup is not None:
            _remove_cgroup_tree(self.cgroup, timeout=10.0)
        self.pid1 = None
        self._outer = None
        self._log_pump = None
        self.cgroup = None


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _free_id(start: int = 61000) -> int:
    """Return an id unused as both a UID and a GID on the host."""
    used: set[int] = set()
    for path in ("/etc/passwd", "/etc/group"):
        for line in Path(path).read_text().splitlines():
            parts = line.split(":")
            if len(parts) > 2 and parts[2].isdigit():
                used.add(int(parts[2]))
    candidate = start
    while candidate in used:
        candidate += 1
    return candidate


def _die_with_parent() -> None:
    """Have the kernel SIGKILL the outer unshare if pytest dies (it then kills PID 1)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _remove_stale_cgroups(cgroup_root: Path) -> None:
    """Remove sub-cgroups left by a harness whose pytest was SIGKILLed.

    The kernel still killed that namespace (parent-death signals), but nobody
    was left to rmdir its cgroups. The name carries the creator's PID.
    """
    for stale in cgroup_root.glob("trainwarden-test-*-*"):
        creator = stale.name.split("-")[2]
        if creator.isdigit() and not Path(f"/proc/{creator}").exists():
            with contextlib.suppress(HarnessError, OSError):
                _remove_cgroup_tree(stale, timeout=1.0)


def _remove_cgroup_tree(root: Path, timeout: float) -> None:
    """Remove a cgroup2 subtree once its processes are gone (children first)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for directory, _, _ in os.walk(root, topdown=False):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                continue
            except OSError:
                busy.append(directory)
        if not busy:
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"cgroups still busy after teardown: {busy}")
        time.sleep(0.05)


# ------------------------------------------------------------------ init side
def _mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        ctypes.c_ulong(flags),
        data.encode() if data is not None else None,
    )
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target} ({fstype}): {os.strerror(errno)}")


def _private_dev(fake_nvidia: bool, console_fd: int) -> None:
    """Give the namespace a /dev of its own; systemd would write to the host's."""
    # The inherited fd belongs to the host's mount namespace, which a bind mount
    # refuses (EINVAL); reopen the same pty by path from in here, before /dev is hidden.
    console = os.open(os.ttyname(console_fd), os.O_PATH | os.O_NOCTTY)
    _mount("tmpfs", "/dev", "tmpfs", _MS_NOSUID, "mode=755,size=4m")
    nodes = {
        "null": (1, 3),
        "zero": (1, 5),
        "full": (1, 7),
        "random": (1, 8),
        "urandom": (1, 9),
        "tty": (5, 0),
    }
    if fake_nvidia:
        nodes.update(FAKE_NVIDIA_NODES)
        nodes[FORBIDDEN_NODE[0]] = FORBIDDEN_NODE[1]
    for name, (major, minor) in nodes.items():
        path = f"/dev/{name}"
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(path, 0o666)  # mknod honours the umask
    for name, target in {
        "fd": "/proc/self/fd",
        "stdin": "/proc/self/fd/0",
        "stdout": "/proc/self/fd/1",
        "stderr": "/proc/self/fd/2",
        "ptmx": "pts/ptmx",
    }.items():
        os.symlink(target, f"/dev/{name}")
    for name in ("pts", "shm", "mqueue"):
        os.mkdir(f"/dev/{name}")
    _mount("devpts", "/dev/pts", "devpts", _MS_NOSUID | _MS_NOEXEC, "newinstance,ptmxmode=0666")
    _mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
    Path("/dev/console").touch(mode=0o600)
    _mount(f"/proc/self/fd/{console}", "/dev/console", None, _MS_BIND)
    os.close(console)


def _private_etc(spec: dict[str, str]) -> None:
    """Overlay /etc so the namespace can add a user and job files without touching the host."""
    options = f"lowerdir=/etc,upperdir={spec['etc_upper']},workdir={spec['etc_work']}"
    _mount("overlay", "/etc", "overlay", 0, options)
    with open("/etc/passwd", "a") as passwd:
        passwd.write(spec["passwd_line"] + "\n")
    with open("/etc/group", "a") as group:
        group.write(spec["group_line"] + "\n")
    Path("/etc/systemd/system.conf").write_text(_SYSTEM_CONF)
    Path("/etc/trainwarden").mkdir(mode=0o755, exist_ok=True)


def namespace_init(spec_path: str) -> None:
    """Build the private world inside the fresh namespaces, then exec systemd as PID 1."""
    spec = json.loads(Path(spec_path).read_text())
    shared = spec["shared"]
    # Hold the shared directory open: the private /tmp mounted next hides its path.
    shared_fd = os.open(shared, os.O_PATH | os.O_DIRECTORY)
    for path, mode in (
        ("/tmp", "1777"),
        ("/var/tmp", "1777"),
        ("/run", "755"),
        ("/var/lib", "755"),
        ("/var/cache", "755"),
        ("/var/log", "755"),
    ):
        _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode={mode}")
    os.makedirs(shared, exist_ok=True)
    _mount(f"/proc/self/fd/{shared_fd}", shared, None, _MS_BIND)
    os.close(shared_fd)
    _private_dev(bool(spec["fake_nvidia"]), int(spec["console_fd"]))
    os.close(int(spec["console_fd"]))
    _private_etc(spec)
    # The cgroupns root is the sub-cgroup the shell joined; systemd sees it as "/".
    _mount("cgroup2", "/sys/fs/cgroup", "cgroup2", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    # MS_BIND makes this a per-mount flag change, local to this namespace; without
    # it the remount would turn the host's root filesystem read-only.
    _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
    env = {
        "container": "trainwarden-test",
        "SYSTEMD_UNIT_PATH": spec["unit_dir"],
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    os.execve(str(SYSTEMD_BINARY), [str(SYSTEMD_BINARY), f"--unit={BOOT_TARGET}"], env)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--init":
        namespace_init(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} --init SPEC.json (NamespacedSystemd.boot runs this)")
