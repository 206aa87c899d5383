"""Reading the Prometheus text format that Triton's metrics page serves (the one parser)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_samples(text: str) -> Iterator[Sample]:
    """Every sample of ``text``; comments and malformed lines are skipped."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            labels_text, _, tail = rest.rpartition("}")
            labels = {key: value.replace('\\"', '"').replace("\\\\", "\\") for key, value in _LABEL.findall(labels_text)}
        else:
            name, _, tail = line.partition(" ")
            labels = {}
        fields = tail.split()
        if not fields:
            continue
        try:
            value = float(fields[0])  # a timestamp may follow
        except ValueError:
            continue
        yield Sample(name.strip(), labels, value)


def sample_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0.0 when absent)."""
    return sum(
        sample.value
        for sample in parse_samples(text)
        if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
    )
