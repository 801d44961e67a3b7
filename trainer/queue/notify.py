"""When a queued job ends: a small JSON POST to a webhook and/or a desktop notification. Neither may fail the queue:
a webhook that cannot be reached is one warning line; a desktop without a notifier is skipped silently. Stdlib only.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import urllib.error
import urllib.request

WEBHOOK_TIMEOUT_S = 5.0  # a slow or dead endpoint delays the next job by at most this
DESKTOP_TIMEOUT_S = 10.0


def notify_end(payload: dict, webhooks: list[str], desktop: bool) -> list[str]:
    """Send `payload` ({run, state, adapter, best_val_loss}) to each webhook and, if asked, to the desktop;
    returns the warning lines (empty when all went well or nothing was asked)."""
    warnings = []
    for url in dict.fromkeys(u for u in webhooks if u):  # each URL once, in order
        problem = post_json(url, payload)
        if problem:
            warnings.append(f"warning: notify.webhook_url {url}: {problem} (the queue goes on)")
    if desktop:
        problem = desktop_notification("loradesk: " + str(payload.get("state", "")), _summary(payload))
        if problem:
            warnings.append(f"warning: desktop notification: {problem}")
    return warnings


def post_json(url: str, payload: dict) -> str:
    """POST payload as JSON; "" on a 2xx answer, else why not (one line)."""
    data = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "loradesk"})
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as answer:
            status = answer.status
    except urllib.error.HTTPError as e:
        return f"the server answered {e.code} {e.reason}"
    except (urllib.error.URLError, OSError, ValueError) as e:  # refused, DNS, timeout, a malformed URL
        return f"not sent ({getattr(e, 'reason', e)})"
    return "" if 200 <= status < 300 else f"the server answered {status}"


def _summary(payload: dict) -> str:
    text = f"{payload.get('run', '')}: {payload.get('state', '')}"
    if payload.get("best_val_loss") is not None:
        text += f", best validation loss {payload['best_val_loss']:.4g}"
    return text


def desktop_command(title: str, text: str, system: str | None = None) -> tuple[list[str], dict] | None:
    """The command (and the environment entries it reads) that shows a notification on this OS; None where there
    is none. Title and text travel as environment variables, never inside a script, so no run name can inject code."""
    system = system or platform.system()
    env = {"LORADESK_TITLE": title, "LORADESK_TEXT": text}
    if system == "Darwin" and shutil.which("osascript"):
        # AppleScript's `system attribute` reads an environment variable
        script = ('display notification (system attribute "LORADESK_TEXT") '
                  'with title (system attribute "LORADESK_TITLE")')
        return ["osascript", "-e", script], env
    if system == "Windows":
        shell = shutil.which("powershell") or shutil.which("pwsh")
        if shell is None:
            return None
        script = ("Add-Type -AssemblyName System.Windows.Forms; $n = New-Object System.Windows.Forms.NotifyIcon; "
                  "$n.Icon = [System.Drawing.SystemIcons]::Information; $n.Visible = $true; "
                  "$n.ShowBalloonTip(10000, $env:LORADESK_TITLE, $env:LORADESK_TEXT, 'Info'); "
                  "Start-Sleep -Seconds 5; $n.Dispose()")
        return [shell, "-NoProfile", "-NonInteractive", "-Command", script], env
    if shutil.which("notify-send"):  # Linux and the BSDs with libnotify
        return ["notify-send", "--app-name=loradesk", title, text], {}
    return None


def desktop_notification(title: str, text: str) -> str:
    """Show it where the OS can; "" when shown or when there is no notifier (skipped silently), else why not."""
    found = desktop_command(title, text)
    if found is None:
        return ""
    cmd, extra = found
    try:
        done = subprocess.run(cmd, env={**os.environ, **extra}, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=DESKTOP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{cmd[0]} did not run ({e})"
    if done.returncode and done.stderr.strip():  # e.g. notify-send without a session bus (over ssh)
        return f"{cmd[0]}: {done.stderr.decode(errors='replace').strip().splitlines()[-1]}"
    return ""
