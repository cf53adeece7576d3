"""A real php-fpm master started with a generated pool config.

The pool runs the scripts in tests/php with display_errors off and log_errors on, so PHP
warnings and fatals travel back as FastCGI stderr, the way a production pool sends them to
nginx.  As root php-fpm refuses to start without ``-R``; the fixture passes it.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
from pathlib import Path

from fastcgi.address import Address
from tests.support.ports import free_port, wait_connectable

PHP_DIR = Path(__file__).resolve().parent.parent / "php"


def php_fpm_binary() -> str:
    found = shutil.which("php-fpm") or next(
        iter(sorted(glob.glob("/usr/sbin/php-fpm*"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError("php-fpm is not installed (apt-get install php-fpm); run .ci/run")
    return found


class PhpFpm:
    def __init__(
        self,
        workdir: Path,
        *,
        unix: bool = False,
        max_children: int = 8,
        env: dict[str, str] | None = None,
        extra_pool_lines: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.max_children = max_children
        self.env = env or {}
        self.extra_pool_lines = extra_pool_lines
        if unix:
            self.address = Address(path=str(workdir / "fpm.sock"))
        else:
            self.address = Address(host="127.0.0.1", port=free_port())
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "fpm.log"

    @property
    def script_dir(self) -> Path:
        return PHP_DIR

    def script(self, name: str) -> str:
        return str(PHP_DIR / name)

    def _write_config(self) -> Path:
        listen = self.address.path or f"{self.address.host}:{self.address.port}"
        is_root = os.geteuid() == 0
        user_lines = ["user = root", "group = root"] if is_root else []
        env_lines = [f"env[{key}] = {value}" for key, value in self.env.items()]
        conf = "\n".join(
            [
                "[global]",
                f"pid = {self.workdir / 'fpm.pid'}",
                f"error_log = {self.log_path}",
                "daemonize = no",
                "log_level = notice",
                "[test]",
                f"listen = {listen}",
                "listen.backlog = 511",
                *user_lines,
                "pm = static",
                f"pm.max_children = {self.max_children}",
                "pm.status_path = /fpm-status",
                "catch_workers_output = yes",
                "clear_env = yes",
                "php_admin_flag[log_errors] = on",
                "php_admin_value[display_errors] = off",
                "php_admin_value[error_log] =",
                "php_admin_value[post_max_size] = 64M",
                "php_admin_value[memory_limit] = 256M",
                *env_lines,
                *self.extra_pool_lines,
                "",
            ]
        )
        path = self.workdir / "php-fpm.conf"
        path.write_text(conf)
        return path

    def start(self) -> None:
        assert self.process is None, "already running"
        config = self._write_config()
        args = [php_fpm_binary(), "--nodaemonize", "--fpm-config", str(config), "-n"]
        if os.geteuid() == 0:
            args.append("--allow-to-run-as-root")
        # -n: no php.ini, so the distribution's settings cannot change what tests observe.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        try:
            if self.address.is_unix:
                wait_connectable(self.address.path)
            else:
                wait_connectable(self.address.host, self.address.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"php-fpm did not start:\n{self.log_path.read_text()}") from None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish, sockets close
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        if self.address.is_unix:
            Path(self.address.path).unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()
