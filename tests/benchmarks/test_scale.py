"""The scale benchmark's extrapolation: a power law through the measured sizes."""

from benchmarks.scale import extrapolate


def _run(n: int, power: float, n_trees: int = 3) -> dict:
    value = 2e-3 * n**power
    return {"P@1": 0.5, "train_s": n_trees * value, "train_cpu_s": n_trees * value,
            "n_trees": n_trees,
            "peak_rss_mb": value,
            "ensemble_mb_per_tree": value, "model_mb": value, "latency_p50_ms": value}


def test_a_power_law_is_read_back_exactly_at_the_target_size() -> None:
    results = {str(n): {"ours": _run(n, 1.5), "pecos": _run(n, 0.5, 1)} for n in (5000, 50000)}
    table = extrapolate(results, 1_000_000)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert len(rows) == 5
    for cells in rows:
        assert cells[1] == f"{2e-3 * 1e6**1.5:,.1f}" and cells[2] == "1.50"
        assert cells[3] == f"{2e-3 * 1e6**0.5:,.1f}" and cells[4].rstrip(" |") == "0.50"


def test_a_figure_older_runs_lack_is_extrapolated_from_the_runs_that_have_it() -> None:
    results = {str(n): {"ours": _run(n, 1.0), "pecos": _run(n, 1.0, 1)} for n in (5000, 50000)}
    del results["5000"]["ours"]["train_cpu_s"]
    cpu_row = extrapolate(results, 1_000_000).splitlines()[3]
    assert cpu_row.startswith("| training CPU s per tree | – | – | 2,000.0 | 1.00")


def test_a_library_with_one_measured_size_is_not_extrapolated() -> None:
    results = {"5000": {"ours": _run(5000, 1.0), "pecos": _run(5000, 1.0)},
               "50000": {"ours": _run(50000, 1.0), "pecos": {"missing": {"reason": "x"}}}}
    rows = extrapolate(results, 1_000_000).splitlines()[2:]
    assert all(row.rstrip(" |").endswith("– | –") for row in rows)


def test_only_each_librarys_default_tree_count_is_extrapolated() -> None:
    """A run with another tree count (ours with 1 tree at a large size) stays out of the line
    through the default builds."""
    results = {str(n): {"ours": _run(n, 1.0), "pecos": _run(n, 1.0, 1)} for n in (5000, 50000)}
    results["200000"] = {"ours": _run(200000, 2.0, n_trees=1), "pecos": _run(200000, 1.0, 1)}
    rows = [line.split(" | ") for line in extrapolate(results, 1_000_000).splitlines()[2:]]
    assert all(cells[2] == "1.00" for cells in rows)
