from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from slimserve.server.settings import GPU_FRONTENDS, Settings, default_frontends
from slimserve.server.telemetry import LoadSample, NvmlProbe, Telemetry, load_factor


def test_defaults_are_safe() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.policy == "adaptive"
    assert settings.bundle.name == "demo"


def test_environment_variables_with_the_prefix_configure_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMSERVE_MAX_BATCH", "8")
    monkeypatch.setenv("SLIMSERVE_POLICY", "static:s3")
    settings = Settings()
    assert settings.max_batch == 8 and settings.policy == "static:s3"


def test_front_ends_default_to_one_on_the_cpu_and_to_the_spare_cores_on_a_gpu() -> None:
    assert default_frontends("cpu", cores=16, inference_process=True) == 1  # inference's threads want the cores
    assert default_frontends("cuda:0", cores=16, inference_process=True) == GPU_FRONTENDS
    assert default_frontends("cuda", cores=3, inference_process=True) == 2  # one core left to inference
    assert default_frontends("cuda", cores=1, inference_process=True) == 1
    assert default_frontends("cuda", cores=16, inference_process=False) == 1  # the one HTTP process infers
    assert Settings(frontends=5, device="cuda").frontend_processes == 5  # asked for: as asked
    assert Settings().frontend_processes == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"default_budget_ms": 100.0, "max_budget_ms": 50.0}, "exceeds max_budget_ms"),
        ({"max_queue": 4, "max_batch": 8}, "at least max_batch"),
        ({"policy": "fastest"}, "policy must be"),
        ({"device": "tpu"}, "device must be"),
        ({"port": 0}, "port"),
        ({"safety_margin_ms": 200.0}, "safety_margin_ms"),
        ({"infeasible_action": "panic"}, "infeasible_action"),
        ({"frontends": 2, "inference_process": False}, "frontends > 1 needs inference_process"),
    ],
)
def test_contradictory_or_malformed_settings_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


class FakeNvml:
    def __init__(self, fail_init: bool = False, fail_read: bool = False) -> None:
        self.fail_init, self.fail_read = fail_init, fail_read

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        if self.fail_read:
            raise RuntimeError("GPU is lost")
        return SimpleNamespace(gpu=40, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(used=2 * 2**30, total=80 * 2**30)


def test_nvml_probe_reads_utilization_and_memory() -> None:
    probe = NvmlProbe(0, nvml=FakeNvml())
    assert probe.available
    assert probe.sample() == (40.0, 2048.0, 81920.0)
    sample = Telemetry(gpu=probe).sample_once()
    assert sample.gpu_percent == 40.0 and sample.gpu_memory_total_mb == 81920.0


def test_no_gpu_degrades_to_cpu_only_telemetry() -> None:
    probe = NvmlProbe(0, nvml=FakeNvml(fail_init=True))
    assert not probe.available and probe.sample() is None
    sample = Telemetry(gpu=probe).sample_once()
    assert sample.gpu_percent is None and 0.0 <= sample.cpu_percent <= 100.0
    lost = NvmlProbe(0, nvml=FakeNvml(fail_read=True))
    assert lost.sample() is None and not lost.available  # a GPU that disappears stops being polled


def test_real_nvml_binding_degrades_cleanly_on_this_machine() -> None:
    probe = NvmlProbe(0)  # nvidia-ml-py is installed; without a driver it must not raise
    assert probe.sample() is None or len(probe.sample()) == 3


def test_load_factor_follows_processor_sharing() -> None:
    assert load_factor(LoadSample(cpu_percent=30, process_cpu_percent=30), 1.0) == 1.0  # all ours
    assert load_factor(LoadSample(cpu_percent=80, process_cpu_percent=30), 1.0) == pytest.approx(2.0)
    assert load_factor(LoadSample(cpu_percent=100, process_cpu_percent=0), 1.0) == pytest.approx(4.0)  # capped
    assert load_factor(LoadSample(cpu_percent=80, process_cpu_percent=30), 0.0) == 1.0
    gpu_busy = LoadSample(cpu_percent=10, process_cpu_percent=10, gpu_percent=90)
    assert load_factor(gpu_busy, 1.0, gpu_busy_own=0.4) == pytest.approx(2.0)


def test_the_server_starts_from_the_column_of_its_kind_of_device() -> None:
    from slimserve.server.engine import matching_column

    devices = {"cpu-2t": SimpleNamespace(device="cpu", threads=2), "cuda0": SimpleNamespace(device="cuda:0", threads=2)}
    bundle = SimpleNamespace(table=SimpleNamespace(devices=devices))
    assert matching_column(bundle, Settings(threads=2)) == "cpu-2t"  # type: ignore[arg-type]
    assert matching_column(bundle, Settings(threads=1)) is None  # type: ignore[arg-type]  # a CPU's speed depends on them
    assert matching_column(bundle, Settings(device="cuda:1", threads=1)) == "cuda0"  # type: ignore[arg-type]


def test_a_named_latency_column_is_used_or_refused_with_the_columns_there_are() -> None:
    from slimserve.models.schema import BundleError
    from slimserve.server.engine import matching_column

    devices = {
        "cpu-2t": SimpleNamespace(device="cpu", threads=2),
        "cpu-2t-spin": SimpleNamespace(device="cpu", threads=2),
        "cuda0": SimpleNamespace(device="cuda:0", threads=2),
    }
    bundle = SimpleNamespace(path="b", table=SimpleNamespace(devices=devices))
    assert matching_column(bundle, Settings(latency_column="cpu-2t-spin")) == "cpu-2t-spin"  # type: ignore[arg-type]
    with pytest.raises(
        BundleError, match=r"'cpu-3t' is not a cpu column of its table \(its cpu columns: cpu-2t, cpu-2t-spin\)"
    ):
        matching_column(bundle, Settings(latency_column="cpu-3t"))  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="'cuda0' is not a cpu column"):  # another device's speed
        matching_column(bundle, Settings(latency_column="cuda0"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="latency_column"):
        Settings(latency_column="cpu 2t; rm")
