"""The oracle bound prices rows in the latency column the servers used, not always the primary one."""

import pytest

from slimserve.loadtest.report import Record, oracle_accuracy
from slimserve.models.schema import read_table
from slimserve.server.settings import DEMO_BUNDLE

TABLE = DEMO_BUNDLE / "subnets.json"


def _sent(budget_ms: float) -> Record:
    return Record(0.0, 0.0, 1.0, 200, budget_ms, 0, 0, "s0", 0.1, 0.9, 0.5, 1)


def test_on_a_gpu_a_tight_budget_affords_the_widest_row_where_the_cpu_column_would_not() -> None:
    table = read_table(TABLE)
    accuracy = {row.id: row.accuracy for row in table.subnets}
    cpu = {row.id: row.latency["cpu-2t"][1].p50_ms for row in table.subnets}
    gpu = {row.id: row.latency["cuda0"][1].p50_ms for row in table.subnets}
    overhead, budget = 3.0, 6.0
    # the premise, from the demo table: every row fits the budget on the GPU, s7 does not on the CPU
    assert max(gpu.values()) + overhead <= budget < cpu["s7"] + overhead
    best_on_cpu = max(accuracy[s] for s in accuracy if cpu[s] + overhead <= budget)

    records = [_sent(budget), _sent(budget)]
    assert oracle_accuracy(records, TABLE, overhead, "cuda0") == pytest.approx(max(accuracy.values()))
    assert oracle_accuracy(records, TABLE, overhead, "cpu-2t") == pytest.approx(best_on_cpu)
    assert best_on_cpu < max(accuracy.values())
    assert oracle_accuracy(records, TABLE, overhead) == oracle_accuracy(records, TABLE, overhead, table.primary_device)


def test_a_budget_nothing_fits_counts_zero_and_an_unknown_column_is_named() -> None:
    assert oracle_accuracy([_sent(0.5), _sent(0.5)], TABLE, 3.0, "cuda0") == 0.0
    with pytest.raises(ValueError, match="no latency column 'tpu0'"):
        oracle_accuracy([_sent(6.0)], TABLE, 3.0, "tpu0")
