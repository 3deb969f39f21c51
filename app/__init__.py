"""The Gradio app of OuroMamba Studio: layout and wiring only; every computation lives in :mod:`core`."""
