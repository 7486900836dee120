from engine import Saga, SagaEngine, SagaState, Settings


def test_run_inline_completes(store_url: str) -> None:
    saga = Saga("one")
    saga.add_step("a", lambda ctx: {"ok": True})
    eng = SagaEngine([saga], settings=Settings(database_url=store_url))
    try:
        inst = eng.run("one", {"n": 1})
        assert inst.state is SagaState.COMPLETED
        assert eng.get(inst.id).steps[0].output == {"ok": True}
    finally:
        eng.close()
