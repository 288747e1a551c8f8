"""The Gradio page: one module per tab, each holding its handlers beside its layout."""
