from tests.engine.conftest import one_torch_thread  # noqa: F401 - the engine tests' fixture, here too
