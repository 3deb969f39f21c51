"""Test-wide settings: offline, quiet, and Triton kernels interpreted on the CPU (set before any import)."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# what the app saves (Synthesize sets, the Quantize run log) goes to a scratch folder, not into results/
_SCRATCH = tempfile.mkdtemp(prefix="ouromamba-tests-")
os.environ.setdefault("OUROMAMBA_SETS_DIR", os.path.join(_SCRATCH, "sets"))
os.environ.setdefault("OUROMAMBA_RUNS_DIR", os.path.join(_SCRATCH, "runs"))
