"""``knitwatch bench``: the benchmark commands (they print numbers; they are not tests)."""

from __future__ import annotations

import argparse

from knitwatch.daemon.bench import accuracy, detection, learn, model, pipeline, position, soak, switch
from knitwatch.daemon.cli.common import add_group


def register(sub: argparse._SubParsersAction) -> None:
    bsub = add_group(sub, "bench", "benchmarks that print numbers (not tests)", "bench_command")
    pipeline.register(bsub)
    model.register(bsub)
    accuracy.register_accuracy(bsub)
    detection.register(bsub)
    position.register(bsub)
    soak.register(bsub)
    switch.register(bsub)
    learn.register(bsub)
