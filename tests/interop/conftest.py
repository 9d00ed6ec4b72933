from tests.service.fixtures import service  # noqa: F401
