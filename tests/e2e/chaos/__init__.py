"""The reliability suites' own apps and helpers: a crashable orchestrator, participants that ride out a
database restart, and the test-side harness (kills, service restarts, dead-letter reading, checks).

Apps run as ``python -m tests.e2e.chaos.<app>``; they reuse the e2e workload (`tests.e2e.workload`) and the
participants' effect tables (`tests.e2e.db`), so the end-to-end checks of `tests.e2e.test_orders` apply.
"""
