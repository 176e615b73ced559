"""Scripts that measure (results in BENCHMARKS.md). A package only so that `benchmarks.support`
can be imported by the benchmarks and by the tests; benchmarks never import from tests/."""
