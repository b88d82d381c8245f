"""bench/bench_compile.py on the CPU (aot_eager, a few steps): the rows it reports show the
problem it measures (recompiles on the default path) and the fix (one graph)."""
from dataclasses import replace

from bench import bench_compile


def test_rows_count_graphs_and_ratios():
    s = replace(bench_compile.PRESETS["quick"], steps=2, warmup=3, inner_steps=1, backend="aot_eager")
    rows = {r["row"]: r for r in bench_compile.run_all(s, "cpu")}
    assert rows["misa compiled"]["unique_graphs"] > 2  # each switch changes requires_grad: new graphs
    assert rows["misa compile_friendly compiled"]["unique_graphs"] == 1
    assert rows["adamw compiled"]["unique_graphs"] == 1
    assert all(r["graph_breaks"] == 0 for r in rows.values())
    for label, row in rows.items():
        assert row["ms_per_step"] > 0 and (row["vs_eager"] == 1.0) == label.endswith("eager"), label
    table = bench_compile.format_table(list(rows.values()))
    assert "| misa compile_friendly compiled |" in table
