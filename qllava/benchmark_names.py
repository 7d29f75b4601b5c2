"""The names of the benchmarks qllava scores: a leaf module that the recipe (which checks `eval.benchmark` when a
recipe is loaded) and the scorers (which implement each benchmark) both import, so the recipe, which every module
builds on, knows no benchmark's code."""

BENCHMARK_NAMES = ("scienceqa", "pope", "vqa", "mme")
"""In the order `qllava eval --help` lists them; scorers.BENCHMARKS holds one entry per name, in this order."""
