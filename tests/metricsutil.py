"""
Reading the Prometheus text the proxy serves, for tests: what a scraper
would see, parsed with C{prometheus_client}'s own parser.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(sample name, sorted labels) -> value."""


def samplesOf(text: bytes) -> Samples:
    """
    Every sample of an exposition.

    @raise AssertionError: a series appears twice (a scraper would reject it).
    """
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def firstValue(text: bytes, name: str, **labels: str) -> float:
    """
    The value of the first sample C{name} whose labels include C{labels};
    0 when there is none (a counter never incremented is not served).
    """
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
