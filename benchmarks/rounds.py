"""What every benchmark here shares: alternate the compared sides over several
rounds in one run (so a burst of load from other jobs hits both sides alike),
report the median ratio with its min-max spread, print one JSON line per figure.
"""
import json
import statistics
import time


def alternate(sides, rounds):
    """{name: [seconds of each round]}: one call of every side per round, the
    order reversed every other round. Call each side once before (warm-up,
    compilation) yourself."""
    seconds = {name: [] for name in sides}
    names = list(sides)
    for round_index in range(rounds):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            sides[name]()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def spread(values):
    """{median, min, max} of a list of numbers."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio(numerator, denominator):
    """Per-round ratio numerator[i] / denominator[i] as {median, min, max}."""
    return spread([a / b for a, b in zip(numerator, denominator)])


def emit(figure, **fields):
    """One figure as one JSON line on stdout."""
    print(json.dumps({"figure": figure, **fields}, sort_keys=True), flush=True)
