"""loradesk's browser UI: Gradio only, over trainer's public API (never the reverse)."""
