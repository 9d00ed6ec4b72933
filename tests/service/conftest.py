from tests.service.fixtures import channel, raw_vm, service, stub  # noqa: F401
