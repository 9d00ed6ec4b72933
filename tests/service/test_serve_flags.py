"""`pkvm-sim serve` flag validation, logs and SIGTERM during a heavy batch (real process)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2

from tests.service.fixtures import bearer
from tests.service.tenants import OpenStream, Stub, heavy_batch, refusal

SERVE = [sys.executable, "-m", "pkvm_sim.cli", "serve", "--metrics-listen", "off"]


@pytest.mark.parametrize("flags", [
    ["--listen", "127.0.0.1:99999"], ["--listen", "127.0.0.1:-1"], ["--listen", "nohost"],
    ["--metrics-listen", "127.0.0.1:70000"], ["--grace-seconds", "nan"],
    ["--grace-seconds", "-1"], ["--grace-seconds", "inf"], ["--vm-lease-seconds", "0.01"],
    ["--vm-lease-seconds", "5e-324"], ["--stream-idle-seconds", "-5"], ["--max-vms", "-1"],
    ["--max-pages-per-op", "0"], ["--log-level", "LOUD"], ["--quota-hyp-pages", "many"],
])
def test_bad_flags_exit_2_with_a_message(flags: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # In process (the CLI's own entry point): a subprocess per flag costs an interpreter start
    # each; the test below runs one for real.
    from pkvm_sim.cli import main

    assert main([*SERVE[3:], "--listen", "127.0.0.1:0", *flags]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("pkvm-sim serve:") and "Traceback" not in stderr


def test_a_bad_flag_exits_2_with_a_message_from_a_real_process() -> None:
    result = subprocess.run([*SERVE, "--listen", "127.0.0.1:0", "--grace-seconds", "nan"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert result.stderr.startswith("pkvm-sim serve:") and "Traceback" not in result.stderr


def test_env_and_toml_set_limits(tmp_path: object) -> None:
    from pathlib import Path

    from pkvm_sim.service import serve

    path = Path(str(tmp_path)) / "pkvm.toml"
    path.write_text("[server]\nquota_hyp_pages = 7\nmax_streams = 3\n")
    parser = __import__("argparse").ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--max-streams", "9"])
    _, values = serve.resolve(args, environ={"PKVM_SIM_QUOTA_SLICE_PAGES": "99",
                                             "PKVM_SIM_MAX_STREAMS": "5"})
    settings = serve.settings_from(values)
    assert settings.limits.quota_hyp_pages == 7  # file
    assert settings.limits.quota_slice_pages == 99  # env
    assert settings.limits.max_streams == 9  # flag over env over file


def test_logs_and_sigterm_during_a_heavy_batch(tmp_path: object) -> None:
    from pathlib import Path

    token_file = Path(str(tmp_path)) / "token"
    token_file.write_text("client-secret")
    process = subprocess.Popen(
        [*SERVE, "--listen", "127.0.0.1:0", "--grace-seconds", "2",
         "--client-token-file", str(token_file), "--quota-hyp-pages", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        port = re.search(r"listening on 127\.0\.0\.1:(\d+)$", ready.strip())
        assert port, ready
        with grpc.insecure_channel(f"127.0.0.1:{port.group(1)}") as channel:
            stub = Stub(channel)
            vm = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=512),
                               metadata=bearer("client-secret"))
            other = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=1),
                                  metadata=bearer("client-secret"))
            stub.DestroyVM(pb2.DestroyVMRequest(handle=other.vm.handle),
                           metadata=bearer(other.token))
            stream = OpenStream(stub, bearer(vm.token))
            stream.requests.put(heavy_batch(vm.vm))  # about 12 s of work
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            partial = next(stream.call)
            assert 0 < partial.completed < 4096
            assert partial.errors[-1].reason == "SHUTTING_DOWN"
            assert refusal(lambda: next(stream.call)) == (grpc.StatusCode.UNAVAILABLE,
                                                          "SHUTTING_DOWN")
            # It ends by itself, cleanly, having cut the ~12 s batch short (above).
            assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stderr is not None
    log = process.stderr.read()
    assert "configuration: profile=" in log and "client_token_file=" in log
    assert log.count(" created: ") == 2 and log.count(" destroyed: ") == 1
    for secret in ("client-secret", vm.token, other.token):
        assert secret not in log
