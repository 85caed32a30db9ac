"""Gradio demo of dit_sparse: dense vs sparse side by side, with a picture of what was skipped."""
