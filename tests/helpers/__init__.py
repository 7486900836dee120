"""Shared test sagas, participants and pure-core drivers."""
