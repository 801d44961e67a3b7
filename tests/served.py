"""launch.py's main() as a user runs it, but returning once the server answers: a real Gradio app on a loopback
port (uvicorn, its proxy-header handling and Gradio's own routes included), closed by the caller."""
from __future__ import annotations

import contextlib
import functools


@contextlib.contextmanager
def served(monkeypatch, tmp_path, *flags: str):
    """Yields the launched Blocks (its .local_url answers); FORWARDED_ALLOW_IPS is restored afterwards."""
    import gradio as gr

    import launch
    launched = []
    real_launch = gr.Blocks.launch

    @functools.wraps(real_launch)  # the same signature: launch options may depend on what launch accepts
    def launch_and_return(self, **kwargs):
        launched.append(self)
        return real_launch(self, prevent_thread_lock=True, **kwargs)

    monkeypatch.setattr(gr.Blocks, "launch", launch_and_return)
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")  # uvicorn's default; whatever launch sets is undone
    launch.main(["--no-browser", "--port", "7930", "--data-dir", str(tmp_path / "datasets"),
                 "--runs-dir", str(tmp_path / "runs"), "--adapters-dir", str(tmp_path / "adapters"), *flags])
    try:
        yield launched[0]
    finally:
        launched[0].close()
