"""Backend addresses: ``fastcgi://host:port`` and ``fastcgi+unix:///path/to.sock``."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Address:
    """Where a FastCGI server listens: a TCP host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.host):
            raise ValueError("an address is either host:port or a unix socket path")
        if self.host and not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} out of range")

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"fastcgi+unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"fastcgi://{host}:{self.port}"


def parse_address(url: str) -> Address:
    """Parse a backend URL; raises ``ValueError`` with a message fit for a config error."""
    parts = urlsplit(url)
    if parts.scheme == "fastcgi+unix":
        path = parts.netloc + parts.path if parts.netloc else parts.path
        if not path.startswith("/"):
            raise ValueError(f"{url!r}: a unix socket path must be absolute")
        return Address(path=path)
    if parts.scheme == "fastcgi":
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        if not parts.hostname or port is None:
            raise ValueError(f"{url!r}: expected fastcgi://host:port")
        if parts.path not in ("", "/"):
            raise ValueError(f"{url!r}: a fastcgi:// address takes no path (set `script`)")
        return Address(host=parts.hostname, port=port)
    raise ValueError(f"{url!r}: expected fastcgi://host:port or fastcgi+unix:///path")
