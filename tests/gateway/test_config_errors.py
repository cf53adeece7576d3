"""Configuration mistakes found by review with real daemons: each is refused with the file
named, and without showing a secret; and what the file writes is what busgate reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adapters.storage.fanout import parse_document
from gateway import cli
from gateway.config import ConfigError, load_config, load_queue, render_effective
from tests.support.daemon import running_daemon, write_config
from tests.support.users import as_unprivileged

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "queue: q\ntopics:\n  t:\n    backend: http://127.0.0.1:9/\n    paused: true\n"


def error_of(config: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(config, {})
    return caught.value


# -- an unreadable conf.d ----------------------------------------------------------------------


def check_config_shut_out_of(
    config: Path, directory: Path, *, may_enter: bool = False
) -> subprocess.CompletedProcess[str]:
    """check-config as the daemon's user meets ``directory``: mode 0700 (0711 if it
    ``may_enter``), another owner.  Root lists anything, so it runs as nobody then;
    otherwise the mode (0300: enter, not list) shuts its owner out."""
    directory.chmod(0o711 if may_enter else 0o700)
    user = as_unprivileged()
    if os.geteuid() != 0:
        directory.chmod(0o300)
    try:
        return subprocess.run(
            [*user, sys.executable, "-m", "gateway.cli", "check-config", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        directory.chmod(0o755)


def test_a_conf_d_the_user_may_not_list_fails_check_config_naming_it(shared_dir: Path) -> None:
    """glob skips a directory it cannot list: this read as a configuration without any
    queue, and a reload removed them all."""
    config = write_config(shared_dir / "etc", {"q": QUEUE})
    conf_d = shared_dir / "etc" / "conf.d"
    done = check_config_shut_out_of(config, conf_d)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == (
        f"busgate: configuration error: {conf_d}: cannot list the directory: Permission denied\n"
    )


def test_every_directory_an_include_pattern_lists_is_checked(shared_dir: Path) -> None:
    config = write_config(shared_dir / "etc", {"q": QUEUE})
    config.write_text(config.read_text().replace("include: conf.d/*.yaml", "include: '*/*.yaml'"))
    other = shared_dir / "etc" / "other"
    other.mkdir()
    assert list(load_config(config, {}).queues) == ["q"]
    done = check_config_shut_out_of(config, other)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == (
        f"busgate: configuration error: {other}: cannot list the directory: Permission denied\n"
    )


def test_a_literal_include_needs_no_listing(shared_dir: Path) -> None:
    # `include: conf.d/q.yaml` names its file: glob looks it up without listing conf.d/,
    # which the check took for a directory it must list.
    config = write_config(shared_dir / "etc", {"q": QUEUE})
    config.write_text(
        config.read_text().replace("include: conf.d/*.yaml", "include: conf.d/q.yaml")
    )
    (shared_dir / "etc").chmod(0o755)
    config.chmod(0o644)
    (shared_dir / "etc" / "conf.d" / "q.yaml").chmod(0o644)
    done = check_config_shut_out_of(config, shared_dir / "etc" / "conf.d", may_enter=True)
    assert done.returncode == 0, done.stderr
    assert "queue: q" in done.stdout


async def test_a_reload_that_cannot_list_conf_d_keeps_every_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root (CI) modes do not stop a listing: the refusal is simulated where glob meets it.
    config = write_config(tmp_path, {"q": QUEUE})
    conf_d = str(tmp_path / "conf.d")
    scandir = os.scandir

    def refused(path: str = ".") -> object:
        if os.fspath(path).rstrip("/") == conf_d:
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    async with running_daemon(config) as app:
        monkeypatch.setattr(os, "scandir", refused)
        assert await cli.reload(app, str(config)) is False
        assert list(app.config.queues) == ["q"]


def test_a_missing_conf_d_is_still_no_queue(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    (tmp_path / "conf.d").rmdir()
    assert load_config(config, {}).queues == {}


# -- secrets in errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "reddis://bg:TOPSECRET@127.0.0.1:6379/0",  # a typo in the scheme
        "valkey://bg:TOPSECRET@127.0.0.1:6379/0",  # another server's scheme
        " redis://bg:TOPSECRET@127.0.0.1:6379/0",  # a stray space (or from ${VAR})
        "redis:/bg:TOPSECRET@127.0.0.1:6379/0",  # a slash short
        "TOPSECRET@127.0.0.1:6379",  # no scheme, a password alone
    ],
)
def test_a_refused_store_url_does_not_show_its_password(tmp_path: Path, url: str) -> None:
    config = write_config(tmp_path, {}, store=f"'{url}'")
    error = error_of(config)
    assert "TOPSECRET" not in str(error) and "********@127.0.0.1:6379" in str(error)


@pytest.mark.parametrize(
    "backend",
    [
        "http://u:TOPSECRET@127.0.0.1:9/a b",  # a space
        "http://u:TOPSECRET@127.0.0.1:9/\x7f",  # a control character
        "htp://u:TOPSECRET@127.0.0.1:9/a",  # an unknown scheme
        " http://u:TOPSECRET@127.0.0.1:9/a",  # a stray space first
    ],
)
def test_a_refused_backend_url_does_not_show_its_password(tmp_path: Path, backend: str) -> None:
    queue = f"queue: q\ntopics:\n  t:\n    backend: {json.dumps(backend)}\n"
    error = error_of(write_config(tmp_path, {"q": queue}))
    assert error.key == "topics.t.backend"
    assert "TOPSECRET" not in str(error) and "u:********@127.0.0.1:9" in str(error)


# -- printed as read ---------------------------------------------------------------------------


def test_a_filter_field_with_dollars_reads_back_as_printed(tmp_path: Path) -> None:
    """Keys are not substituted (``$$x`` names the field ``$$x``), so none is escaped."""
    queue = QUEUE + '    filter: {"$$x": 1, "${y}": 2, "$": "$${v}"}\n'
    config = load_config(write_config(tmp_path, {"q": queue}), {})
    (printed,) = yaml.safe_load(render_effective(config))["queues"]
    assert printed["topics"]["t"]["filter"] == {"$$x": 1, "${y}": 2, "$": "$${v}"}
    del printed["source"], printed["password"]
    (tmp_path / "back.yaml").write_text(yaml.safe_dump(printed, sort_keys=False))
    back = load_queue(str(tmp_path / "back.yaml"), {})
    assert back.topics[0].filter == config.queues["q"].topics[0].filter


# -- numbers -----------------------------------------------------------------------------------


def test_a_filter_matches_integers_of_any_length_a_payload_can_hold(tmp_path: Path) -> None:
    """A payload's numbers are read by Python's json: integers exactly, up to 4,300 digits
    (a longer one is not JSON it reads).  Ids past int64 (or JavaScript's 2**53) included."""
    snowflake, big = 1541815603606036480, int("9" * 40)
    queue = QUEUE + f"    filter: {{id: {snowflake}, big: [{big}, -{big}]}}\n"
    chosen = load_config(write_config(tmp_path, {"q": queue}), {}).queues["q"].topics[0].filter
    assert chosen.matches(parse_document(f'{{"id": {snowflake}, "big": -{big}}}'.encode()))
    assert not chosen.matches(parse_document(f'{{"id": {snowflake + 1}, "big": {big}}}'.encode()))
    longest = "9" * sys.get_int_max_str_digits()
    queue = QUEUE + f"    filter: {{n: {longest}}}\n"
    chosen = load_config(write_config(tmp_path, {"q": queue}), {}).queues["q"].topics[0].filter
    assert chosen.matches(parse_document(f'{{"n": {longest}}}'.encode()))


def test_a_filter_integer_no_payload_can_hold_is_out_of_range(tmp_path: Path) -> None:
    limit = sys.get_int_max_str_digits()
    queue = QUEUE + f"    filter: {{n: {'9' * (limit + 1)}}}\n"
    error = error_of(write_config(tmp_path, {"q": queue}))
    assert error.key == "topics.t.filter.n"
    assert error.message == (
        f"{'9' * 40}… is out of range: a payload's JSON numbers have at most {limit} digits"
    )


def test_an_out_of_range_number_is_shown_whole_when_short(tmp_path: Path) -> None:
    # "…" says that the number was cut: not when it is all there.
    queue = QUEUE + "    concurrency: 1234567890123456789\n"
    error = error_of(write_config(tmp_path, {"q": queue}))
    assert error.message == "1234567890123456789 is out of range"
