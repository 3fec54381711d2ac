"""Separate hosts on one machine: network namespaces joined by veth links, for tests of a pilot across a network.

Topology (every address on a link this module creates, inside namespaces it
creates; nothing is sent anywhere else)::

    root namespace (the coordinator: flwr run/ls/log)
      | coordinator link  10.213.K.1/30 (root) -- 10.213.K.2/30 (hub): the SuperLink's address
    hub namespace (the SuperLink host)
      | site i's link     10.213.K.(4i+1)/30 (hub) -- 10.213.K.(4i+2)/30 (site i)
    site i's namespace (its SuperNode), default route via its hub end

A site reaches the SuperLink at its real address on the hub (routed over its
own link, not loopback); cutting a site's link (``ip link set <hub end> down``)
is a switch port going dark. ``K`` is picked per instance so that two test
sessions do not collide. :meth:`Topology.close` deletes the namespaces (and
with them every link) and the root end of the coordinator link; it runs even
when the set-up failed half way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

PREFIX = "fedcl"


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here; the message says exactly why (the test skips with it)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise RuntimeError with its stderr if it fails and ``check``."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def why_unavailable() -> str | None:
    """None if this process can make network namespaces and veth links; else the reason, in one sentence."""
    if os.geteuid() != 0:
        return f"network namespaces need root (this test runs as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return f"`ip netns add` was refused: {done.stderr.strip() or done.returncode}"
    try:
        veth = subprocess.run(
            ["ip", "-n", probe, "link", "add", "pv0", "type", "veth", "peer", "name", "pv1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if veth.returncode != 0:
            return f"a veth pair cannot be made in a namespace: {veth.stderr.strip() or veth.returncode}"
        inside = subprocess.run(["ip", "netns", "exec", probe, "true"], capture_output=True, text=True, timeout=30)
        if inside.returncode != 0:
            return f"`ip netns exec` cannot run a command in a namespace: {inside.stderr.strip() or inside.returncode}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@dataclass
class Topology:
    """A hub namespace (the SuperLink host) with a link to the root namespace and one link per site namespace."""

    sites: list[str]
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000:05d}")
    namespaces: list[str] = field(default_factory=list)
    root_links: list[str] = field(default_factory=list)

    @property
    def subnet(self) -> int:
        """The third octet K of this instance's 10.213.K.0/24 (from the tag)."""
        return 1 + int(self.tag) % 250

    @property
    def hub(self) -> str:
        """The SuperLink host's namespace."""
        return f"{PREFIX}-{self.tag}-hub"

    @property
    def superlink_address(self) -> str:
        """The SuperLink's address: the hub's end of the coordinator link."""
        return f"10.213.{self.subnet}.2"

    def site_namespace(self, site: str) -> str:
        """Site ``site``'s namespace."""
        return f"{PREFIX}-{self.tag}-{site}"

    def site_address(self, site: str) -> str:
        """Site ``site``'s own address (its end of its link)."""
        return f"10.213.{self.subnet}.{4 * (self.sites.index(site) + 1) + 2}"

    def hub_end(self, site: str) -> str:
        """The hub's end of site ``site``'s link (what :meth:`cut` turns off)."""
        return f"fc{self.tag}h{self.sites.index(site) + 1}"

    def prefix(self, namespace: str) -> tuple[str, ...]:
        """The command prefix that runs a program in ``namespace``."""
        return ("ip", "netns", "exec", namespace)

    def open(self) -> Topology:
        """Make the namespaces and links, bring them up; raises RuntimeError (and cleans up) if a step fails."""
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        for namespace in [self.hub, *(self.site_namespace(site) for site in self.sites)]:
            ip("netns", "add", namespace)
            self.namespaces.append(namespace)
            ip("-n", namespace, "link", "set", "lo", "up")
        root_end, hub_end = f"fc{self.tag}c0", f"fc{self.tag}c1"
        ip("link", "add", root_end, "type", "veth", "peer", "name", hub_end, "netns", self.hub)
        self.root_links.append(root_end)
        ip("addr", "add", f"10.213.{self.subnet}.1/30", "dev", root_end)
        ip("link", "set", root_end, "up")
        ip("-n", self.hub, "addr", "add", f"{self.superlink_address}/30", "dev", hub_end)
        ip("-n", self.hub, "link", "set", hub_end, "up")
        for index, site in enumerate(self.sites, start=1):
            namespace, hub_side, site_side = self.site_namespace(site), self.hub_end(site), f"fc{self.tag}s{index}"
            ip("-n", self.hub, "link", "add", hub_side, "type", "veth", "peer", "name", site_side, "netns", namespace)
            ip("-n", self.hub, "addr", "add", f"10.213.{self.subnet}.{4 * index + 1}/30", "dev", hub_side)
            ip("-n", namespace, "addr", "add", f"{self.site_address(site)}/30", "dev", site_side)
            ip("-n", self.hub, "link", "set", hub_side, "up")
            ip("-n", namespace, "link", "set", site_side, "up")
            ip("-n", namespace, "route", "add", "default", "via", f"10.213.{self.subnet}.{4 * index + 1}")

    def cut(self, site: str) -> None:
        """Turn site ``site``'s link off at the hub (nothing passes either way until :meth:`restore`)."""
        ip("-n", self.hub, "link", "set", self.hub_end(site), "down")

    def restore(self, site: str) -> None:
        """Turn site ``site``'s link on again (the site's default route comes back with it)."""
        ip("-n", self.hub, "link", "set", self.hub_end(site), "up")
        index = self.sites.index(site) + 1
        deadline = time.monotonic() + 10
        namespace = self.site_namespace(site)
        while "default" not in ip("-n", namespace, "route", "show").stdout and time.monotonic() < deadline:
            time.sleep(0.2)
        if "default" not in ip("-n", namespace, "route", "show").stdout:  # dropped while the carrier was off
            ip("-n", namespace, "route", "replace", "default", "via", f"10.213.{self.subnet}.{4 * index + 1}")

    def namespace_of(self, pid: int) -> str:
        """The name of the namespace process ``pid`` runs in ('' for the root namespace)."""
        return ip("netns", "identify", str(pid), check=False).stdout.strip()

    def close(self) -> None:
        """Delete every namespace made (their links go with them) and the root end of the coordinator link."""
        for link in self.root_links:
            ip("link", "del", link, check=False)
        for namespace in reversed(self.namespaces):
            ip("netns", "del", namespace, check=False)
        self.root_links.clear()
        self.namespaces.clear()

    def leftovers(self) -> list[str]:
        """Namespaces or root links of this instance that still exist (empty after :meth:`close`)."""
        names = ip("netns", "list", check=False).stdout
        links = ip("-o", "link", "show", check=False).stdout
        return [line.split()[0] for line in names.splitlines() if f"{PREFIX}-{self.tag}-" in line] + [
            f"link fc{self.tag}c0" for _ in [0] if f"fc{self.tag}c0" in links
        ]
