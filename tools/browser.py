"""Playwright helpers for driving the app in Debian's Chromium, shared by tools/screenshots.py and the browser test.

Never downloads a browser: Chromium comes from Debian (`apt-get install chromium`).
"""
from __future__ import annotations

import re

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def pick(page, dropdown_id: str, option_text: str) -> None:
    """Choose the first option of a Gradio dropdown whose label contains option_text."""
    page.locator(f"#{dropdown_id} input").click()
    page.get_by_role("option", name=re.compile(re.escape(option_text))).first.click()


def options(page, dropdown_id: str) -> list[str]:
    """The labels a Gradio dropdown offers now (it is opened and closed again)."""
    page.locator(f"#{dropdown_id} input").click()
    labels = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    return labels


def set_number(page, elem_id: str, value) -> None:
    """Type into a Gradio number box and leave it, so its change event fires."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")
