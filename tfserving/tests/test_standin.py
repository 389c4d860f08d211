"""The stand-in's command line and how it finds versions (its gRPC API is tested in tests/)."""
from tfserving.standin import parse_flags
from tfserving.versions import list_versions


def test_accepts_tensorflow_model_server_flags():
    flags = parse_flags(["--port=8500", "--rest_api_port=0", "--model_name=cifar10", "--model_base_path=/m",
                         "--file_system_poll_wait_seconds=5", "--enable_batching", "--monitoring_config_file=x"])
    assert (flags.port, flags.model_name, flags.model_base_path) == (8500, "cifar10", "/m")
    assert flags.file_system_poll_wait_seconds == 5
    assert flags.enable_batching is True


def test_versions_are_complete_integer_directories(tmp_path):
    for name in ("1", "3", "10", ".staging-11", "tmp", "12"):
        (tmp_path / name).mkdir()
        if name != "12":  # still being written: no saved_model.pb yet
            (tmp_path / name / "saved_model.pb").write_bytes(b"")
    assert list_versions(tmp_path) == [1, 3, 10]
    assert list_versions(tmp_path / "missing") == []
