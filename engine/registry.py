"""The sagas an engine knows, by name and version."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from engine.definition import Saga
from engine.errors import DefinitionError, UnknownSaga


class Registry:
    """Saga definitions by name; new instances start on the highest version."""

    def __init__(self, sagas: Iterable[Saga] = ()) -> None:
        self._by_name: dict[str, dict[int, Saga]] = {}
        for saga in sagas:
            self.add(saga)

    def add(self, saga: Saga) -> None:
        """Register ``saga`` after checking it as a whole."""
        saga.validate()
        versions = self._by_name.setdefault(saga.name, {})
        known = versions.get(saga.version)
        if known is not None and known is not saga:
            raise DefinitionError(saga.name, None, f"version {saga.version} is registered twice")
        versions[saga.version] = saga

    def latest(self, name: str) -> Saga:
        versions = self._by_name.get(name)
        if not versions:
            raise UnknownSaga(name, self.names())
        return versions[max(versions)]

    def get(self, name: str, version: int) -> Saga:
        saga = self._by_name.get(name, {}).get(version)
        if saga is None:
            raise UnknownSaga(f"{name} v{version}", self.names())
        return saga

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __iter__(self) -> Iterator[Saga]:
        return (s for versions in self._by_name.values() for s in versions.values())
