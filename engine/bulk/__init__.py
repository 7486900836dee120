"""Bulk recovery: one operator action over every instance a filter matches, paced and stoppable.

- :mod:`.model`: the filter, the operation, its items and their outcomes, the limits;
- :mod:`.runner`: works through an operation's items at a rate, halting on failures;
- :mod:`.recovery`: the facade the console and CLI use (dry run, create, run, stop).

The records live in the store (:mod:`engine.store.bulk`).
"""
