"""The dashboard's Content-Security-Policy lets the page reach its own daemon only.

Its live feed is a WebSocket to the page's own origin; a script injected into the page (a
job's payload shown unescaped, say) must not be able to send what it reads anywhere else,
a WebSocket to another host included.
"""

from __future__ import annotations

from pathlib import Path

import trio

from gateway.app import App
from tests.support.daemon import running_daemon
from tests.support.ports import free_port
from tests.ui.test_dashboard import daemon_config, dashboard, sign_in

QUEUE = """\
    queue: jobs
    topics:
      work:
        backend: fastcgi://127.0.0.1:9
        script: /srv/app/work.php
        paused: true
    """

#: Opens a WebSocket and a fetch to ``url``'s host; resolves with the CSP directives that
#: refused them (none if the policy let them go).
REACH_OUT = """async ([ws, http]) => {
    const refused = [];
    document.addEventListener("securitypolicyviolation", (event) => {
        refused.push(`${event.effectiveDirective} ${event.blockedURI}`);
    });
    try { new WebSocket(ws); } catch (error) { refused.push(`thrown ${error.name}`); }
    try { await fetch(http); } catch (error) { /* refused or unanswered: the event says */ }
    await new Promise((resolve) => setTimeout(resolve, 500));
    return refused;
}"""


async def test_the_page_reaches_its_own_daemon_and_no_other_host(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, {"jobs": QUEUE})
    elsewhere = f"127.0.0.2:{free_port()}"  # another origin: another host and port

    def session(app: App) -> list[str]:
        with dashboard(app) as (page, _errors):
            sign_in(page)  # the live feed, a WebSocket to the page's origin, is up
            refused: list[str] = page.evaluate(
                REACH_OUT, [f"ws://{elsewhere}/exfiltrate", f"http://{elsewhere}/exfiltrate"]
            )
            assert page.locator("#live-state").get_attribute("data-state") == "live"
            return refused

    async with running_daemon(config) as app:
        refused = await trio.to_thread.run_sync(session, app)
    assert sorted(refused) == [
        f"connect-src http://{elsewhere}/exfiltrate",
        f"connect-src ws://{elsewhere}/exfiltrate",
    ], refused
