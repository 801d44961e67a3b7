"""Playwright helpers for driving the app's Gradio widgets, shared by the browser test and tools/screenshots.py."""
from __future__ import annotations

import re


def pick(page, dropdown_id: str, option_text: str) -> None:
    """Choose the first option of a Gradio dropdown whose label contains option_text."""
    page.locator(f"#{dropdown_id} input").click()
    page.get_by_role("option", name=re.compile(re.escape(option_text))).first.click()


def set_number(page, elem_id: str, value) -> None:
    """Type into a Gradio number box and leave it, so its change event fires."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")
