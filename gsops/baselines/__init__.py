"""Baseline adapters and stand-ins that the perf harness compares against: SORSA, LoLDU, PEFT BOFT helpers."""
