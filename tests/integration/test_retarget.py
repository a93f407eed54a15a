"""A stopped VM's next start uses the document it has now (issue 11, failures 6): the embedded
backend kept a supervisor's first paths and runner settings for ever, so a ``runner:`` setting
added by ``apply`` (the boot marker here; the emulator, the display secret's place) never took
effect on a restart, and a document's ``runner.bootMarker`` was ignored under the manager."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.harness import MARKER
from tests.integration.test_manager import BOOT, Box, box, tiny, until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

__all__ = ["box"]


def _booted(b: Box, name: str) -> dict[str, Any]:
    return dict(b.status(name).get("conditions", {}).get("Booted", {}))


@pytest.mark.timeout(600)
async def test_runner_settings_applied_while_stopped_count_on_the_next_start(
    box: Box, tiny_guest: Any
) -> None:
    m = await box.open()
    doc = tiny(tiny_guest, "rt1", guestAgent=False)
    doc["runner"] = {"bootMarker": "THIS-TEXT-NEVER-SHOWS"}
    await m.create(doc)
    await m.start("rt1", wait=BOOT)
    # the guest prints its marker within seconds of Running; the wrong one never matches
    console = box.root / "run" / "rt1" / "console.log"
    await until(lambda: console.exists() and MARKER in console.read_text("utf-8", "replace"),
                BOOT, "the guest's own marker on the console")  # fmt: skip
    assert _booted(box, "rt1").get("status") is not True

    await m.stop("rt1", wait=60)
    doc["runner"] = {"bootMarker": MARKER}
    await m.apply(doc)
    await m.start("rt1", wait=BOOT)
    await until(lambda: _booted(box, "rt1").get("status") is True, BOOT, "Booted by the marker")
    assert _booted(box, "rt1").get("reason") == "SerialMarker"
    await m.stop("rt1", wait=60)
