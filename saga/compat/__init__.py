"""Compatibility layers for code ported from other saga libraries (`saga.compat.minos`)."""

__all__: list[str] = []
