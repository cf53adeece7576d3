"""php-fpm's status page (``status_path``) as the health probe reads it, from a real pool:
what it shows, and that a page that is not php-fpm's is an error on the dashboard, never the
end of the daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.health import probe
from tests.support.daemon import write_config
from tests.support.phpfpm import PhpFpm


async def probe_of(fpm: PhpFpm, tmp_path: Path, status_path: str) -> dict[str, object]:
    config = write_config(
        tmp_path,
        {
            "orders": f"""\
            queue: orders
            topics:
              email:
                backend: fastcgi://127.0.0.1:{fpm.address.port}
                script: {fpm.script("noop.php")}
                status_path: {status_path}
            """
        },
    )
    (topic,) = load_config(config).queues["orders"].topics
    return await probe(topic)


async def test_php_fpms_own_status_page(php_fpm: PhpFpm, tmp_path: Path) -> None:
    health = await probe_of(php_fpm, tmp_path, "/fpm-status")
    assert health["pool"] == "test"
    assert isinstance(health["total_processes"], int) and health["total_processes"] >= 8
    assert isinstance(health["listen_queue"], int)


@pytest.mark.parametrize(
    "answer",
    ["[]", "null", "42", '"ok"', "[" * 100_000 + "]" * 100_000, "<html>not json</html>"],
    ids=["list", "null", "number", "string", "nested too deep", "html"],
)
async def test_a_status_page_that_is_not_php_fpms_is_an_error(
    php_fpm: PhpFpm, tmp_path: Path, answer: str
) -> None:
    # JSON other than an object ended the probe's task with AttributeError (RecursionError
    # when nested deep), and with it the daemon: at start, or within 5 s of a reload.
    page = tmp_path / "status.php"
    page.write_text(f"<?php header('Content-Type: application/json'); echo {answer!r};\n")
    health = await probe_of(php_fpm, tmp_path, str(page))
    assert health == {"error": f"{page} did not answer php-fpm's JSON status"}


async def test_fields_of_the_wrong_type_are_left_out(php_fpm: PhpFpm, tmp_path: Path) -> None:
    page = tmp_path / "status.php"
    page.write_text(
        """<?php echo json_encode(["pool" => ["x"], "active processes" => "many",
        "idle processes" => true, "total processes" => 3]);\n"""
    )
    health = await probe_of(php_fpm, tmp_path, str(page))
    assert health["pool"] is None and health["total_processes"] == 3
    assert health["active_processes"] is None and health["idle_processes"] is None
