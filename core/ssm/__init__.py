"""Selective scan (S6) implementations and the one dispatch point the model calls."""

from core.ssm.scan import (
    SCAN_IMPLEMENTATIONS,
    selective_scan,
    selective_scan_fast,
    selective_scan_ref,
)

__all__ = ["SCAN_IMPLEMENTATIONS", "selective_scan", "selective_scan_fast", "selective_scan_ref"]
