"""The examples' old names, kept in a checkout: ``-A examples.travel_booking`` still works.

The examples live in :mod:`engine.examples`, so the wheel carries them and
``saga demo`` finds them wherever the engine is installed. Each module here
puts the engine's module in its place in ``sys.modules``: both names are one
module object, so a saga is never defined twice in one process. This package
is not in the wheel.
"""
