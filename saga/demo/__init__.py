"""The demo: an order saga with inventory, payment and shipping participants (``kafka-saga demo``)."""

from saga.demo.order import CRASH_SWITCH, ORDER_SAGA, ORDER_SAGA_NAME, CrashSwitch, SimulatedCrash

__all__ = ["CRASH_SWITCH", "ORDER_SAGA", "ORDER_SAGA_NAME", "CrashSwitch", "SimulatedCrash"]
