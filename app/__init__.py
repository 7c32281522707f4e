"""The process `rahf-serve` starts: engine + API + Gradio UI, assembled in one place."""
