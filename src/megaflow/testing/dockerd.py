"""A private ``dockerd`` for tests and benchmarks, and a busybox image built offline.

    with Dockerd() as daemon:                      # ~0.3-0.6 s until /_ping answers
        build_busybox_image(daemon.client(), "megaflow-busybox:test")
        ...

:class:`Dockerd` installs nothing (``./dev`` installs ``docker.io``, ``runsc`` and
``busybox-static``). It runs one daemon with its own data root, exec root and socket
in a temporary folder (its own containerd too), registers gVisor as runtime
``runsc`` when ``/usr/bin/runsc`` exists (ptrace platform, no network: the KVM
platform hangs here), trusts plain-HTTP registries on loopback, and on :meth:`stop`
removes its containers, ends the daemon by PID (SIGTERM, then SIGKILL of its group), kills
what is left in its cgroups (the local backend's cgroup helpers) and any process still
running from its folder, unmounts what it mounted and deletes the folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]

from megaflow.core.errors import SandboxError
from megaflow.env.docker.engine import DockerEngine
from megaflow.env.local import procs
from megaflow.env.local.cgroups import cgroup_hierarchies, cgroup_pids, remove_cgroup_dirs
from megaflow.env.local.freezer import thaw_if_frozen
from megaflow.testing.mounts import unmount_all
from megaflow.testing.processes import pids_mentioning, spawn_logged, stop_group

RUNSC = Path("/usr/bin/runsc")
BUSYBOX = Path("/bin/busybox")


def dockerd_available() -> str | None:
    """None if a private dockerd can run here, else why not."""
    if shutil.which("dockerd") is None:
        return "dockerd is not installed (Debian package docker.io; ./dev installs it)"
    if os.geteuid() != 0:
        return "dockerd needs root"
    return None


class Dockerd:
    """One private Docker daemon; ``base_url`` is ``unix://<folder>/docker.sock``."""

    def __init__(self, parent: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mf-dockerd-", dir=parent or "/tmp"))
        self.socket_path = str(self.dir / "docker.sock")
        self.base_url = f"unix://{self.socket_path}"
        self.runsc = RUNSC.exists()
        """Whether the ``runsc`` (gVisor) runtime is registered."""
        self.cgroup_parent = f"megaflow-{self.dir.name}"
        """Cgroup (under each hierarchy) holding this daemon's containers."""
        self.start_s = 0.0
        """Seconds from spawn until ``/_ping`` answered."""
        self._proc: subprocess.Popen[bytes] | None = None

    # -- life ------------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> Dockerd:
        """Spawn dockerd and wait (at most ``timeout_s``) until ``/_ping`` answers OK."""
        config: dict[str, Any] = {"insecure-registries": ["127.0.0.0/8"]}
        if self.runsc:
            runsc = {"path": str(RUNSC), "runtimeArgs": ["--platform=ptrace", "--network=none"]}
            config["runtimes"] = {"runsc": runsc}
        (self.dir / "daemon.json").write_text(json.dumps(config))
        argv = [
            "dockerd",
            "--config-file", str(self.dir / "daemon.json"),
            "--data-root", str(self.dir / "data"),
            "--exec-root", str(self.dir / "exec"),
            "--pidfile", str(self.dir / "docker.pid"),
            "-H", self.base_url,
            "--storage-driver=overlay2",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            f"--cgroup-parent={self.cgroup_parent}",
        ]  # fmt: skip
        started = time.perf_counter()
        self._proc = spawn_logged(argv, self.dir / "dockerd.log")
        deadline = time.monotonic() + timeout_s
        while not self._ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd did not become ready:\n{self.log()[-4000:]}")
            time.sleep(0.02)
        self.start_s = time.perf_counter() - started
        return self

    def stop(self, grace_s: float = 20.0) -> None:
        """Remove containers, stop the daemon by PID, unmount and delete its folder."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                self._remove_containers()
        stop_group(proc, grace_s)
        cgroups = self.cgroup_dirs()
        self._kill_cgroup_members(cgroups)  # containers survive their killed shims
        self._kill_leftovers()
        unmount_all(self.dir)
        for root in cgroups:
            for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
                with contextlib.suppress(SandboxError):
                    remove_cgroup_dirs([Path(folder)], timeout_s=0.1)
        shutil.rmtree(self.dir, ignore_errors=True)

    def crash(self) -> None:
        """SIGKILL the daemon alone and wait until it is gone (its containers stay): a
        fault injected on purpose, not a way to stop it (:meth:`stop` ends its group)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def __enter__(self) -> Dockerd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------

    def client(self, timeout_s: int = 60) -> docker.DockerClient:
        """A ``docker`` client for this daemon."""
        return docker.DockerClient(base_url=self.base_url, version="auto", timeout=timeout_s)

    def api(self, timeout_s: int = 60) -> docker.APIClient:
        """A low-level ``docker`` client for this daemon (usable as a context manager)."""
        return docker.APIClient(base_url=self.base_url, version="auto", timeout=timeout_s)

    def engine(self) -> DockerEngine:
        """A :class:`DockerEngine` (what sandboxes use) for this daemon."""
        return DockerEngine(self.base_url)

    def cli_env(self) -> dict[str, str]:
        """Environment for the ``docker`` CLI to talk to this daemon."""
        return {**os.environ, "DOCKER_HOST": self.base_url}

    def log(self) -> str:
        try:
            return (self.dir / "dockerd.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- internals ---------------------------------------------------------------------

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(self.socket_path)
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                answer = sock.recv(4096)
        except OSError:
            return False
        return answer.startswith(b"HTTP/1.") and answer.rstrip().endswith(b"OK")

    def _remove_containers(self) -> None:
        api = self.api(timeout_s=30)
        try:
            for container in api.containers(all=True):
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_container(container["Id"], force=True)
        finally:
            api.close()

    def cgroup_dirs(self) -> list[Path]:
        """This daemon's parent cgroup in every mounted hierarchy (v1 or v2): at the
        hierarchy's root, or below this process's own cgroup there (where dockerd puts
        a relative parent in a hierarchy this process is not at the root of)."""
        found = []
        for root, own in cgroup_hierarchies():
            for base in (root, own):
                folder = base / self.cgroup_parent if base is not None else None
                if folder is not None and folder.is_dir() and folder not in found:
                    found.append(folder)
        return found

    @staticmethod
    def _kill_cgroup_members(roots: list[Path], timeout_s: float = 10.0) -> None:
        """Thaw, then SIGKILL every process in ``roots`` until they are empty."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            folders = [Path(folder) for root in roots for folder, _, _ in os.walk(root)]
            for folder in folders:
                thaw_if_frozen([folder])
            pids = cgroup_pids(folders) - {os.getpid()}
            if not pids:
                return
            procs.kill(pids)
            time.sleep(0.02)

    def _kill_leftovers(self) -> None:
        """SIGKILL processes (containerd, shims) whose command line names our folder."""
        for _ in range(50):
            found = pids_mentioning(str(self.dir))
            if not found:
                return
            procs.kill(found)
            time.sleep(0.05)


def is_static_elf(path: Path) -> bool:
    """Whether ``path`` is an ELF executable without a program interpreter (static)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    order: Literal["little", "big"] = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[0x20:0x28], order)
    phentsize = int.from_bytes(data[0x36:0x38], order)
    phnum = int.from_bytes(data[0x38:0x3A], order)
    for i in range(phnum):
        start = phoff + i * phentsize
        if int.from_bytes(data[start : start + 4], order) == 3:  # PT_INTERP
            return False
    return True


def busybox_rootfs_tar(busybox: Path = BUSYBOX) -> bytes:
    """A root filesystem: static busybox, a symlink per applet, the usual folders."""
    if not busybox.exists() or not is_static_elf(busybox):
        raise RuntimeError(
            f"{busybox} is missing or not statically linked (Debian package busybox-static)"
        )
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for folder, mode in [
            ("bin", 0o755), ("sbin", 0o755), ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777),
            ("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("workspace", 0o755),
            ("usr", 0o755), ("usr/bin", 0o755),
        ]:  # fmt: skip
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for name, text in [
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ]:
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(raw), 0o644
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def build_busybox_image(client: docker.DockerClient | docker.APIClient, tag: str) -> str:
    """``docker import`` a busybox root filesystem as ``tag``; returns the image id."""
    api = client.api if isinstance(client, docker.DockerClient) else client
    repository, _, version = tag.rpartition(":") if ":" in tag else (tag, "", "latest")
    api.import_image_from_data(
        busybox_rootfs_tar(),
        repository=repository,
        tag=version,
        changes=['CMD ["/bin/sh"]', "ENV PATH=/usr/local/bin:/usr/bin:/bin:/sbin"],
    )
    return str(api.inspect_image(tag)["Id"])


@contextlib.contextmanager
def prepared_dockerd(prepare: Callable[[docker.DockerClient], object]) -> Iterator[Dockerd]:
    """A started private dockerd on which `prepare(client)` has run (e.g. building the
    tests' image); stopped, its containers removed, on exit."""
    daemon = Dockerd().start()
    try:
        client = daemon.client()
        try:
            prepare(client)
        finally:
            client.close()
        yield daemon
    finally:
        daemon.stop()
